"""An interrupted run resumes and ends with the numbers of an uninterrupted one.

The CLI tests kill a real ``tailtune run`` (SIGKILL, and Ctrl-C) at several moments, check
after each kill that no output file is half-written, restart the same command and compare
the final files with those of a run that was never interrupted. The library tests do the
same for :func:`tailtune.train.fit` in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

FINETUNED = ["encoder-lora", "encoder-lora-balanced_sampling", "decoder-lora"]
SYSTEMS = ["tfidf-logreg", *FINETUNED]
# The smoke preset with an evaluation, hence a checkpoint, every 2 of the 8 steps per epoch,
# and 3 epochs without early stopping: 12 resume points per fine-tuned system.
RUN = [
    "run",
    "smoke",
    "train.eval_per_epoch=4",
    "train.epochs=3",
    "train.early_stopping_patience=100",
    "--systems",
    ",".join(SYSTEMS),
    "--no-report",
]
HEADERS = {
    "comparison.csv": "system,status,accuracy,macro_f1,weighted_f1,zero_f1_classes,trainable_params,"
    "total_params,train_seconds,note",
    "per_class.csv": "label,tier,train_count,support,precision,recall,f1",
    "predictions.csv": "id,label,prediction,confidence",
}
# Differ between an interrupted and an uninterrupted run by design: time, and where it resumed.
VOLATILE = ("train_seconds", "resumed_at_steps", "seconds_before_resume")


def _start(out: Path, logs: Path) -> subprocess.Popen:
    """Start ``tailtune run``; its stdout and stderr go to ``logs/<n>.out`` and ``logs/<n>.err``."""
    # A killed run cannot remove its temporary folders: keep them under the test's own folder.
    env = {**os.environ, "COLUMNS": "120", "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(logs)}
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.err")))
    with open(logs / f"{n}.out", "w") as stdout, open(logs / f"{n}.err", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tailtune.cli", *RUN, "--out", str(out)], stdout=stdout, stderr=stderr, env=env
        )
    proc.stderr_path = logs / f"{n}.err"
    return proc


def _run_until(out: Path, logs: Path, condition, sig=signal.SIGKILL, timeout: float = 300) -> subprocess.Popen:
    """Start the run and send ``sig`` the moment ``condition(out)`` holds; fail if it never does."""
    proc = _start(out, logs)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                hit = condition(out)
            except (OSError, ValueError):  # a folder vanished or a file is being written: look again
                hit = False
            if hit:
                proc.send_signal(sig)
                proc.wait(timeout=60)
                return proc
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError(f"the run ended or timed out before the kill point (exit {proc.returncode})")


def _finish(out: Path, logs: Path) -> None:
    proc = _start(out, logs)
    assert proc.wait(timeout=300) == 0, proc.stderr_path.read_text()


def _checkpoints(out: Path, system: str, complete: bool = True) -> list[tuple[int, dict | None]]:
    """(step, selection) of the system's checkpoints; incomplete ones only with ``complete=False``."""
    found = []
    for folder in (out / "systems" / f".{system}.partial" / "checkpoints").glob("checkpoint-*"):
        selection = folder / "selection.json"
        if selection.exists():
            found.append((int(folder.name.split("-")[1]), json.loads(selection.read_text())))
        elif not complete:
            found.append((int(folder.name.split("-")[1]), None))
    return found


def _assert_outputs_whole(out: Path) -> None:
    """Every output file parses in full; hidden work folders (``.<name>.partial``) are exempt."""
    n_test = json.loads((out / "data.json").read_text())["splits"]["test"] if (out / "data.json").exists() else None
    for path in out.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(out).parts):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            assert yaml.safe_load(path.read_text()), path
        elif path.suffix == ".csv":
            assert path.read_text().splitlines()[0] == HEADERS[path.name], path
            frame = pd.read_csv(path)
            if path.name == "predictions.csv":
                assert len(frame) == n_test, path
    for system_dir in (out / "systems").glob("[!.]*"):
        # a visible system folder is always complete
        for name in ("metrics.json", "per_class.csv", "predictions.csv", "model/tailtune.json"):
            assert (system_dir / name).is_file(), system_dir / name


def _without_volatile(value):
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def _assert_same_results(out: Path, reference: Path) -> None:
    for name in SYSTEMS:
        a, b = out / "systems" / name, reference / "systems" / name
        # identical predictions and confidences, not merely close ones
        assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes(), name
        assert (a / "per_class.csv").read_bytes() == (b / "per_class.csv").read_bytes(), name
        metrics = json.loads((a / "metrics.json").read_text())
        expected = json.loads((b / "metrics.json").read_text())
        # the whole training history (losses, validation scores, best step) included
        assert _without_volatile(metrics) == _without_volatile(expected), name
    comparison = pd.read_csv(out / "comparison.csv").drop(columns="train_seconds")
    pd.testing.assert_frame_equal(comparison, pd.read_csv(reference / "comparison.csv").drop(columns="train_seconds"))
    assert not list((out / "systems").glob(".*")), "work folders left behind"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("uninterrupted")
    _finish(base / "run", base / "logs")
    return base / "run"


def test_killed_at_any_moment_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    out, logs = tmp_path / "run", tmp_path / "logs"
    partial = out / "systems" / ".encoder-lora.partial"

    # 1. Fine-tuning has started, no checkpoint yet: it will start over.
    _run_until(out, logs, lambda o: partial.exists())
    assert not _checkpoints(out, "encoder-lora", complete=False)
    _assert_outputs_whole(out)
    # 2. The first checkpoint folder appears: killed while (or just after) writing it.
    _run_until(out, logs, lambda o: _checkpoints(o, "encoder-lora", complete=False))
    _assert_outputs_whole(out)
    # 3. At the end of epoch 1 (step 8 of 24): resumes at the start of epoch 2.
    _run_until(out, logs, lambda o: any(step >= 8 for step, _ in _checkpoints(o, "encoder-lora")))
    _assert_outputs_whole(out)
    # 4. In the middle of epoch 2 of class-balanced sampling: replays the rest of its draw.
    _run_until(out, logs, lambda o: any(step >= 10 for step, _ in _checkpoints(o, "encoder-lora-balanced_sampling")))
    _assert_outputs_whole(out)
    # 5. Training finished, the system's files not yet written.
    _run_until(out, logs, lambda o: any(sel["done"] for _, sel in _checkpoints(o, "decoder-lora")))
    assert (out / "systems" / ".decoder-lora.partial").exists()
    _assert_outputs_whole(out)

    _finish(out, logs)
    _assert_outputs_whole(out)
    _assert_same_results(out, uninterrupted)
    for name in FINETUNED:  # every fine-tuned system really resumed from a checkpoint
        history = json.loads((out / "systems" / name / "metrics.json").read_text())["system"]["training"]
        assert history.get("resumed_at_steps"), name


def test_ctrl_c_stops_with_one_line_and_resumes(tmp_path, uninterrupted):
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = _run_until(out, logs, lambda o: _checkpoints(o, "encoder-lora"), sig=signal.SIGINT)
    assert proc.returncode == 130
    stderr = (logs / "0.err").read_text()
    assert "Traceback" not in stderr + (logs / "0.out").read_text()
    assert stderr.strip().splitlines() == [
        "interrupted: finished work is kept; run the same command again to resume"
    ], stderr
    assert _checkpoints(out, "encoder-lora")
    _assert_outputs_whole(out)

    _finish(out, logs)
    _assert_same_results(out, uninterrupted)


# ----------------------------------------------------------------------------- library


@pytest.fixture()
def corpus(small_frame):
    frame = small_frame.sample(frac=1.0, random_state=0)
    texts, labels = frame["Consumer complaint narrative"].tolist(), frame["Issue"].tolist()
    return texts[:80], labels[:80], texts[80:], labels[80:], sorted(set(labels))


def _classifier(arch: str, weighting: str, patience: int = 100):
    from tailtune.classifier import TextClassifier
    from tailtune.config import BackboneConfig, MethodConfig, TrainConfig

    return TextClassifier(
        BackboneConfig(name=f"tiny:{arch}", max_length=32, batch_size=8, eval_batch_size=32),
        "lora",
        MethodConfig(rank=2, alpha=4),
        TrainConfig(
            epochs=4,
            lr=1e-2,
            head_lr=1e-1,
            precision="fp32",
            head_init="random",
            eval_per_epoch=2,
            early_stopping_patience=patience,
        ),
        weighting=weighting,
    )


def _fit(corpus, arch, weighting, work_dir=None, patience=100):
    texts, labels, val_texts, val_labels, classes = corpus
    return _classifier(arch, weighting, patience).fit(
        texts, labels, val_texts=val_texts, val_labels=val_labels, classes=classes, work_dir=work_dir
    )


def interrupt_at_step(monkeypatch, n: int, fit) -> None:
    """Run ``fit()`` with a Ctrl-C at the ``n``-th training step, as a user's would arrive."""
    from transformers import Trainer

    step = Trainer.training_step
    calls = []

    def interrupting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        fit()
    monkeypatch.setattr(Trainer, "training_step", step)


@pytest.mark.parametrize(("arch", "weighting"), [("bert", "none"), ("qwen2", "balanced_sampling")])
def test_fit_resumed_mid_epoch_equals_uninterrupted_fit(tmp_path, monkeypatch, corpus, arch, weighting):

    texts = corpus[2]
    reference = _fit(corpus, arch, weighting)
    again = _fit(corpus, arch, weighting, work_dir=tmp_path / "other")  # checkpointing changes nothing
    np.testing.assert_array_equal(again.predict_logits(texts), reference.predict_logits(texts))

    # 10 steps per epoch, a checkpoint every 5, a loss logged every 2 (40 steps / 20): interrupted
    # at step 18, it resumes from step 15, between two logs, in the middle of epoch 2.
    interrupt_at_step(monkeypatch, 18, lambda: _fit(corpus, arch, weighting, work_dir=tmp_path / "ckpt"))
    resumed = _fit(corpus, arch, weighting, work_dir=tmp_path / "ckpt")

    assert resumed.history_["resumed_at_steps"] == [15]
    np.testing.assert_array_equal(resumed.predict_logits(texts), reference.predict_logits(texts))
    assert _without_volatile(resumed.history_) == _without_volatile(reference.history_)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["checkpoint-40"]  # only the latest is kept


def test_fit_after_early_stop_is_not_trained_further(tmp_path, corpus):
    first = _fit(corpus, "bert", "none", work_dir=tmp_path, patience=1)
    assert first.history_["stopped_early"] and first.history_["evals"][-1]["step"] < first.history_["steps"]
    again = _fit(corpus, "bert", "none", work_dir=tmp_path, patience=1)  # found the finished checkpoint
    assert again.history_["resumed_at_steps"] == [first.history_["evals"][-1]["step"]]
    assert _without_volatile(again.history_) == _without_volatile(first.history_)
    np.testing.assert_array_equal(again.predict_logits(corpus[2]), first.predict_logits(corpus[2]))


def test_fit_refuses_checkpoints_of_another_fit(tmp_path, corpus):
    """A finished fit's checkpoint stays in work_dir; another fit there returned that model."""
    from tailtune.errors import TailtuneError

    _fit(corpus, "bert", "none", work_dir=tmp_path)
    texts, labels, val_texts, val_labels, classes = corpus
    other_rows = (texts[:60], labels[:60], val_texts, val_labels, classes)
    with pytest.raises(TailtuneError, match="holds checkpoints of another fit"):
        _fit(other_rows, "bert", "none", work_dir=tmp_path)
    other_settings = _classifier("bert", "none")
    other_settings.train.lr = 1e-3
    with pytest.raises(TailtuneError, match="holds checkpoints of another fit"):
        other_settings.fit(
            texts, labels, val_texts=val_texts, val_labels=val_labels, classes=classes, work_dir=tmp_path
        )


def test_resume_point_skips_a_half_written_checkpoint(tmp_path):
    from tailtune.train import SELECTION_FILE, _resume_point

    for step in (4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-4" / SELECTION_FILE).write_text("{}")
    assert _resume_point(tmp_path) == tmp_path / "checkpoint-4"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]  # the half-written one is gone
    assert _resume_point(tmp_path / "checkpoint-4") is None


@pytest.mark.parametrize("damage", ["trainable.safetensors", "optimizer.pt", "selection.json"])
def test_resume_point_passes_over_a_checkpoint_that_cannot_be_read(tmp_path, damage):
    """A torn file in the newest complete checkpoint failed every later run ("internal error
    SafetensorError", "PytorchStreamReader failed ..."), and nothing said to delete it."""
    import torch
    from rich.console import Console
    from safetensors.torch import save_file

    from tailtune.train import SELECTION_FILE, _resume_point

    for step in (4, 8):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.ones(64)}, folder / "trainable.safetensors")
        torch.save({"state": torch.ones(64)}, folder / "optimizer.pt")
        (folder / SELECTION_FILE).write_text(json.dumps({"step": step}))
    file = tmp_path / "checkpoint-8" / damage
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    console = Console(record=True, width=200)
    assert _resume_point(tmp_path, console=console) == tmp_path / "checkpoint-4"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]
    assert f"checkpoint-8 is damaged ({damage}: " in console.export_text()


def test_a_checkpoint_is_on_disk_before_it_is_marked_complete(tmp_path, synced, corpus):
    """Only selection.json was fsynced: after a power loss a checkpoint marked complete could hold
    files the page cache had not written yet."""
    from tailtune.train import SELECTION_FILE

    _fit(corpus, "bert", "none", work_dir=tmp_path)
    folder = tmp_path / "checkpoint-40"
    marker = next(
        i
        for i, path in enumerate(synced)
        if Path(path).parent == folder and Path(path).name.startswith(f".{SELECTION_FILE}.")
    )
    before = {Path(path).name for path in synced[:marker] if Path(path).parent == folder}
    assert before >= {p.name for p in folder.iterdir()} - {SELECTION_FILE}
    after = synced[marker + 1 :]
    assert str(folder) in after and str(tmp_path) in after
