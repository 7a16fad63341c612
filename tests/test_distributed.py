"""Two processes (torchrun, gloo on CPU) train to the numbers of one process with the same global batch.

Which one-process run is *exactly* the same training: accelerate deals the consecutive
per-process batches of the sampler's row order out to the processes in turn, and DDP averages
their gradients. So 2 processes x batch 8 see, per optimisation step, the same two batches of 8
that 1 process x batch 8 x ``grad_accum`` 2 does, and average the same two batch-mean losses.
One process x batch 16 would see the same 16 rows but average a class-weighted loss over all 16
at once, and pad them together. The training split (112 rows) is a multiple of the global
batch (16): at an uneven epoch end accelerate completes the last global batch with rows from
the epoch's start, which one process never sees. Dropout is off (in the tiny backbone and in
LoRA) because each process draws its own dropout masks.

What may differ is float rounding (an all-reduce sums gradients in another order than
accumulation), so: predictions, validation macro-F1 at every evaluation and the test metrics
are equal; losses agree to 1e-5 relative, confidences to 1e-5. (On the development machine
they were identical to the last digit written.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.distributed

SYSTEMS = ["tfidf-logreg", "encoder-probe", "encoder-lora", "encoder-lora-weighted"]
FINETUNED = ["encoder-lora", "encoder-lora-weighted"]

# Records, in each non-main worker, every file operation that changes something under the run
# directory (Python's audit hooks see open-for-writing, rename, remove, mkdir, rmtree).
AUDIT = textwrap.dedent("""
    import atexit, os, sys
    rank, out, log = os.environ.get("RANK"), os.environ.get("TT_AUDIT_OUT"), os.environ.get("TT_AUDIT_LOG")
    if rank not in (None, "0") and out and log:
        seen = []
        def hook(event, args):
            if event == "open":
                mode, flags = args[1], args[2]
                if not ((isinstance(mode, str) and set(mode) & set("wax+"))
                        or (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
                    return
                paths = args[:1]
            elif event == "os.rename":
                paths = args[:2]
            elif event in ("os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
                paths = args[:1]
            else:
                return
            for p in paths:
                if isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(out):
                    seen.append(event + " " + os.path.relpath(os.fsdecode(p), out))
        sys.addaudithook(hook)
        def dump():
            with open(os.path.join(log, "rank" + rank + ".txt"), "w") as f:
                f.write("\\n".join(seen))
        atexit.register(dump)
""")


def _tiny_bert_without_dropout(where: Path) -> Path:
    from tailtune.backbones import make_tiny

    folder = where / "bert-no-dropout"
    shutil.copytree(make_tiny("bert"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _args(out: Path, backbone: Path, *extra: str, systems: list[str] = SYSTEMS, command: str = "run") -> list[str]:
    # `train --system X` is `run --systems X --no-report`.
    chosen = ["--system", ",".join(systems)] if command == "train" else ["--systems", ",".join(systems), "--no-report"]
    return [
        sys.executable,
        "-m",
        "tailtune.cli",
        command,
        "smoke",
        f"encoder.name={backbone}",
        "encoder.batch_size=8",
        "encoder.eval_batch_size=8",
        "method.dropout=0",
        # 162 rows -> 112 / 25 / 25: 7 global batches of 16 per epoch; 25 validation rows do not
        # fill the last evaluation batch of the two processes, so accelerate pads it.
        "data.max_rows=162",
        "encoder.epochs=3",  # the smoke preset sets encoder.epochs, which train.epochs does not override
        "train.eval_per_epoch=2",
        "train.early_stopping_patience=100",
        *chosen,
        "--out",
        str(out),
        *extra,
    ]


def _env(**extra: str) -> dict:
    return {**os.environ, "COLUMNS": "120", "TOKENIZERS_PARALLELISM": "false", **extra}


def _run(out: Path, backbone: Path, *extra: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _args(out, backbone, *extra, **kwargs),
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=900,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def _audited_env(audit: Path, out: Path) -> dict:
    """Environment whose non-main workers log, into ``audit``, what they change under ``out``."""
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    pythonpath = os.pathsep.join(filter(None, [str(audit), os.environ.get("PYTHONPATH")]))
    return _env(PYTHONPATH=pythonpath, TT_AUDIT_OUT=str(out), TT_AUDIT_LOG=str(audit))


def _assert_rank1_only_made_checkpoint_folders(audit: Path) -> None:
    # Rank 1 writes its RNG state into each checkpoint (the Trainer's design: a resume restores
    # every process's RNG), through torch's C++ file writer, which the audit hook does not see;
    # what it sees is the folder being made for it.
    # Every process also runs the preflight's write probe (so all of them stop on the same
    # error); it lands in <out> when a run is made inside it (a split seed's folder), and is
    # removed at once.
    from tailtune.rundir import WRITE_PROBE

    writes = [w.split(" ", 1) for w in (audit / "rank1.txt").read_text().splitlines()]
    assert writes, "the audit hook saw nothing: it did not run"
    probes = [(event, path) for event, path in writes if Path(path).name.startswith(WRITE_PROBE)]
    assert sorted(p for e, p in probes if e == "open") == sorted(p for e, p in probes if e == "os.remove")
    for event, path in writes:
        if (event, path) not in probes:
            assert event == "os.mkdir" and Path(path).parent.name == "checkpoints", (event, path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process x batch 8 x grad_accum 2, and two processes x batch 8, the second audited."""
    base = tmp_path_factory.mktemp("distributed")
    backbone = _tiny_bert_without_dropout(base)
    one, two, audit = base / "one", base / "two", base / "audit"
    _run(one, backbone, "train.grad_accum=2")
    temp = base / "temp"
    temp.mkdir()
    env = {**_audited_env(audit, two), "TMPDIR": str(temp)}
    result = _run(two, backbone, "--processes", "2", env=env)
    # torchrun makes a torchelastic_* log folder per launch and leaves it; --processes must not.
    assert not list(temp.glob("torchelastic_*")), "the --processes launch left its log folder behind"
    return {"one": one, "two": two, "audit": audit, "backbone": backbone, "stdout": result.stdout}


def test_two_processes_equal_one_with_the_same_global_batch(runs):
    one, two, audit = runs["one"], runs["two"], runs["audit"]
    assert runs["stdout"].count("systems compared on the test split") == 1  # one process prints

    # Only rank 0 wrote into the run directory.
    assert _files(two) == _files(one)
    _assert_rank1_only_made_checkpoint_folders(audit)

    for name in SYSTEMS:
        a, b = one / "systems" / name, two / "systems" / name
        pa, pb = pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv")
        assert pa["prediction"].tolist() == pb["prediction"].tolist(), name
        assert (pa["confidence"] - pb["confidence"]).abs().max() <= 1e-5, name
        ma, mb = (
            json.loads((a / "metrics.json").read_text()),
            json.loads((b / "metrics.json").read_text()),
        )
        for key in ("accuracy", "macro_f1", "weighted_f1", "zero_f1_classes"):
            assert ma[key] == mb[key], (name, key)
    for name in FINETUNED:
        ha = json.loads((one / "systems" / name / "metrics.json").read_text())["system"]["training"]
        hb = json.loads((two / "systems" / name / "metrics.json").read_text())["system"]["training"]
        assert ha["steps"] == hb["steps"] == 21  # 7 steps of 16 rows per epoch, 3 epochs
        assert [e["step"] for e in ha["evals"]] == [e["step"] for e in hb["evals"]]
        assert [e["val_macro_f1"] for e in ha["evals"]] == [e["val_macro_f1"] for e in hb["evals"]], name
        assert ha["best_step"] == hb["best_step"]
        assert [x["step"] for x in ha["losses"]] == [x["step"] for x in hb["losses"]]
        for x, y in zip(ha["losses"], hb["losses"], strict=True):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (name, x["step"])


def _history(out: Path, name: str) -> dict:
    return json.loads((out / "systems" / name / "metrics.json").read_text())["system"]["training"]


def test_two_processes_resume_after_ctrl_c(tmp_path, runs):
    """Ctrl-C in the middle of epoch 2 of `tailtune train`, then `tailtune run`: the uninterrupted 2-process numbers."""
    name = "encoder-lora-weighted"
    out = tmp_path / "run"
    args = _args(out, runs["backbone"], "--processes", "2", systems=[name], command="train")
    checkpoints = out / "systems" / f".{name}.partial" / "checkpoints"

    def complete() -> list[int]:
        """Steps of the checkpoints whose selection file, written last, exists."""
        return [int(c.parent.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*/selection.json")]

    proc = subprocess.Popen(
        args,
        env=_env(TMPDIR=str(tmp_path)),  # a killed run cannot remove its temporary folders
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while proc.poll() is None and not any(step >= 8 for step in complete()):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the launcher and both workers get it
        assert proc.wait(timeout=300) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    step = max(complete())
    assert step < 21 and {"rng_state_0.pth", "rng_state_1.pth"} <= {
        f.name for f in (checkpoints / f"checkpoint-{step}").iterdir()
    }

    _run(out, runs["backbone"], "--processes", "2", systems=[name])
    resumed, reference = _history(out, name), _history(runs["two"], name)
    assert resumed["resumed_at_steps"] == [step]
    assert [e["val_macro_f1"] for e in resumed["evals"]] == [e["val_macro_f1"] for e in reference["evals"]]
    for x, y in zip(resumed["losses"], reference["losses"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), x["step"]
    a, b = (
        pd.read_csv(out / "systems" / name / "predictions.csv"),
        pd.read_csv(runs["two"] / "systems" / name / "predictions.csv"),
    )
    assert a["prediction"].tolist() == b["prediction"].tolist()
    assert (a["confidence"] - b["confidence"]).abs().max() <= 1e-5


def test_two_processes_tune_like_one(tmp_path, runs):
    """`--tune --processes 2`: every process runs the trials, only rank 0 writes tune.json, and
    trials, choice and the trained system equal one process with the same global batch."""
    name = "encoder-lora-weighted"
    tune = ["--tune", "tune.lr_factors=[1,4]", "tune.weightings=[none,sqrt_inverse]"]
    one, two, audit = tmp_path / "one", tmp_path / "two", tmp_path / "audit"
    _run(one, runs["backbone"], "train.grad_accum=2", *tune, systems=[name])
    env = _audited_env(audit, two)
    result = _run(two, runs["backbone"], "--processes", "2", *tune, systems=[name], env=env)
    assert result.stdout.count(f"tune {name}") == 1  # one process prints

    trials = [json.loads((out / "tune.json").read_text())["trials"] for out in (one, two)]
    assert len(trials[0]) == 4
    scores = [{k: t["val_macro_f1"] for k, t in trial.items()} for trial in trials]
    assert scores[0] == scores[1]
    chosen = [yaml.safe_load((out / "config.yaml").read_text())["tune"]["chosen"] for out in (one, two)]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 1
    _assert_rank1_only_made_checkpoint_folders(audit)
    a, b = (pd.read_csv(out / "systems" / name / "predictions.csv") for out in (one, two))
    assert a["prediction"].tolist() == b["prediction"].tolist()


def test_two_processes_split_seeds_like_one(tmp_path, runs):
    """`--split-seeds --processes 2`: every process runs each seed, one prints, only rank 0
    writes, and the per-seed table equals one process with the same global batch."""
    name = "encoder-lora"
    seeds = ["--split-seeds", "0,1"]
    one, two, audit = tmp_path / "one", tmp_path / "two", tmp_path / "audit"
    _run(one, runs["backbone"], "train.grad_accum=2", *seeds, systems=[name])
    env = _audited_env(audit, two)
    result = _run(two, runs["backbone"], "--processes", "2", *seeds, systems=[name], env=env)
    assert result.stdout.count("systems over 2 split seeds") == 1
    assert _files(two) == _files(one)
    _assert_rank1_only_made_checkpoint_folders(audit)
    a, b = (pd.read_csv(out / "splits.csv") for out in (one, two))
    assert a[["system", "seed", "status"]].equals(b[["system", "seed", "status"]])
    assert (a["macro_f1"] - b["macro_f1"]).abs().max() <= 1e-6


def test_relaunch_runs_in_place_when_nothing_to_launch(monkeypatch):
    from tailtune.distributed import relaunch
    from tailtune.errors import TailtuneError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert relaunch(1) is None
    with pytest.raises(TailtuneError, match="1 or more"):
        relaunch(0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a torchrun worker: go on, do not launch again
    assert relaunch(2) is None and relaunch(1) is None
    with pytest.raises(TailtuneError, match="launched with 2 processes"):
        relaunch(3)


def test_bad_input_under_processes_is_one_line_and_exit_2(tmp_path):
    """Each worker printed the error, then torchrun a ChildFailedError traceback and a table, and
    the command exited 1; without --processes it is one line and exit 2."""
    (tmp_path / "n.csv").write_text("text,Issue\nhi,a\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tailtune.cli",
            "run",
            "smoke",
            "--data",
            str(tmp_path / "n.csv"),
            "--out",
            str(tmp_path / "run"),
            "--systems",
            "tfidf-logreg",
            "--processes",
            "2",
        ],
        capture_output=True,
        text=True,
        env=_env(TMPDIR=str(tmp_path)),
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "error: text column 'Consumer complaint narrative' not found; columns are: text, Issue"
    )
    assert not (tmp_path / "run").exists()
