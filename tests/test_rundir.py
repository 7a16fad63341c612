"""Several processes sharing one run directory: the lock, and config.yaml read again under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tailtune import rundir
from tailtune.config import Config, TuneChoice, dump
from tailtune.errors import TailtuneError
from tailtune.run import _save_config

TRY_LOCK = "import sys; from tailtune.rundir import locked\nwith locked(sys.argv[1], wait=False) as held: print(held)"


def _try_lock_elsewhere(folder: Path) -> str:
    """Whether another process gets the lock on ``folder`` without waiting: 'True' or 'False'."""
    return subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(folder)], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def test_locked_keeps_other_processes_out_until_released(tmp_path):
    with rundir.locked(tmp_path) as held:
        assert held
        assert _try_lock_elsewhere(tmp_path) == "False"
    assert _try_lock_elsewhere(tmp_path) == "True"
    assert os.listdir(tmp_path) == []  # no lock file left behind


def test_save_config_keeps_what_another_job_wrote_since(tmp_path):
    """Job 1 read an empty run directory; job 2 then wrote its system and tune choice. Job 1's
    write joins them instead of replacing them (the write that loses job 2's system)."""
    out = tmp_path / "run"
    out.mkdir()
    other = Config(out=str(out), systems=["encoder-lora"])
    other.tune.chosen = [TuneChoice(system="encoder-lora", lr=2e-3, weighting="none", val_macro_f1=0.5)]
    (out / "config.yaml").write_text(dump(other))

    joined = _save_config(out, Config(out=str(out), systems=["tfidf-logreg"]), keep_others=True)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["systems"] == joined.systems == ["encoder-lora", "tfidf-logreg"]
    assert saved["tune"]["chosen"][0]["lr"] == 2e-3

    with pytest.raises(TailtuneError, match="also has encoder-lora"):
        _save_config(out, Config(out=str(out), systems=["tfidf-logreg"]), keep_others=False)
    changed = Config(out=str(out), systems=["tfidf-logreg"])
    changed.train.epochs = 7
    with pytest.raises(TailtuneError, match="different config"):
        _save_config(out, changed, keep_others=True)


def test_train_jobs_at_the_same_time_fill_one_run_directory(tmp_path, small_csv):
    """Two `tailtune train` jobs started together into one new directory: both systems end up in
    config.yaml and comparison.csv, whichever job finishes last."""
    out = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tailtune.cli",
                "train",
                "smoke",
                "--data",
                str(small_csv),
                "--out",
                str(out),
                "--system",
                system,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for system in ("encoder-probe", "tfidf-logreg")
    ]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err
    systems = yaml.safe_load((out / "config.yaml").read_text())["systems"]
    assert sorted(systems) == ["encoder-probe", "tfidf-logreg"]
    comparison = pd.read_csv(out / "comparison.csv")
    assert comparison["system"].tolist() == systems and (comparison["status"] == "ok").all()


def test_a_config_built_in_python_resumes_its_own_run(tmp_path):
    """config.yaml reads `epochs: 3` back as 3.0; the Config that wrote it must still match it."""
    from tailtune.run import _check_run_dir

    out = tmp_path / "run"
    out.mkdir()
    cfg = Config(out=str(out), systems=["tfidf-logreg"])
    cfg.train.epochs = 2
    _save_config(out, cfg, keep_others=False)
    assert _check_run_dir(out, cfg).systems == ["tfidf-logreg"]


def test_a_system_another_process_is_training_is_refused(tmp_path, small_csv):
    """Two jobs on one system would delete each other's files: the second gets one line, exit 2."""
    from typer.testing import CliRunner

    from tailtune.cli import app

    out = tmp_path / "run"
    train = ["train", "smoke", "--data", str(small_csv), "--out", str(out), "--system"]
    assert CliRunner().invoke(app, [*train, "tfidf-logreg"]).exit_code == 0
    partial = out / "systems" / ".encoder-probe.partial"
    partial.mkdir(parents=True)
    before = (out / "config.yaml").read_text()
    with rundir.locked(partial):  # what a job training encoder-probe holds
        busy = CliRunner().invoke(app, [*train, "encoder-probe"])
        # one command for a new system and the busy one: refused, and it leaves the run as it was
        # (it wrote the new system into config.yaml, and the busy job's own command was then refused)
        both = CliRunner().invoke(
            app,
            [
                "run",
                "smoke",
                "--data",
                str(small_csv),
                "--out",
                str(out),
                "--systems",
                "tfidf-logreg,encoder-probe,encoder-lora",
            ],
        )
        assert both.exit_code == 2 and "another tailtune process is training encoder-probe" in both.stderr
        assert (out / "config.yaml").read_text() == before
        assert not (out / "systems" / ".encoder-lora.partial").exists()
    assert busy.exit_code == 2, busy.output
    assert busy.stderr.strip() == (
        f"error: another tailtune process is training encoder-probe in {out}; let it finish, "
        "or leave encoder-probe out of this command"
    )
    done = CliRunner().invoke(app, [*train, "encoder-probe"])
    assert done.exit_code == 0, done.output
    assert pd.read_csv(out / "comparison.csv")["system"].tolist() == ["tfidf-logreg", "encoder-probe"]


def test_run_from_python_checks_the_config_as_load_config_does(tmp_path, small_csv):
    """run(cfg) skipped every check of load_config: a 12/72/80 split ran, and an `out` Path left
    an empty run directory behind a yaml error."""
    from tailtune.config import load_config
    from tailtune.run import run

    cfg = load_config("smoke", [f"data.path={small_csv}", "systems=[tfidf-logreg]"])
    cfg.out = tmp_path / "run"  # a Path, as Python users write it
    cfg.data.val_size, cfg.data.test_size = 0.5, 0.6
    with pytest.raises(TailtuneError, match="val_size and data.test_size must be in"):
        run(cfg)
    assert not cfg.out.exists()
    cfg.data.val_size, cfg.data.test_size = 0.2, 0.2
    assert run(cfg, report=False) == cfg.out
    assert (cfg.out / "comparison.csv").exists()


def test_a_run_resumes_under_another_spelling_of_its_path_and_after_a_move(tmp_path, small_csv, monkeypatch):
    """`out` was part of the config comparison: --out t5 then --out /abs/t5, or the folder
    moved, was 'a run with a different config'."""
    from typer.testing import CliRunner

    from tailtune.cli import app

    monkeypatch.chdir(tmp_path)
    run = ["run", "smoke", "--data", str(small_csv), "--systems", "tfidf-logreg", "--no-report", "--out"]
    assert CliRunner().invoke(app, [*run, "t5"]).exit_code == 0
    again = CliRunner().invoke(app, [*run, str(tmp_path / "t5")])
    assert again.exit_code == 0 and "done already" in again.stdout, again.output
    (tmp_path / "t5").rename(tmp_path / "moved")
    moved = CliRunner().invoke(app, [*run, "moved"])
    assert moved.exit_code == 0 and "done already" in moved.stdout, moved.output


def test_tune_trials_of_two_jobs_both_stay_in_tune_json(tmp_path):
    """Each job read tune.json once and rewrote it whole: the other job's trials were lost."""
    import json

    from tailtune.tune import TUNE_FILE, _record

    (tmp_path / TUNE_FILE).write_text(json.dumps({"key": "k", "trials": {"a lr=1": {"val_macro_f1": 0.5}}}))
    _record(tmp_path, "k", "b lr=1", {"val_macro_f1": 0.4})
    assert set(json.loads((tmp_path / TUNE_FILE).read_text())["trials"]) == {"a lr=1", "b lr=1"}
    _record(tmp_path, "other rows", "c lr=1", {"val_macro_f1": 0.3})  # another search: starts over
    assert set(json.loads((tmp_path / TUNE_FILE).read_text())["trials"]) == {"c lr=1"}


def test_outputs_get_the_mode_any_new_file_gets(tmp_path):
    """mkstemp / mkdtemp make files 0600 and folders 0700: config.yaml, comparison.csv, metrics.json,
    predict's output, model/ and export folders all came out unreadable to the group (a review)."""
    old = os.umask(0o022)
    try:
        written = rundir.write_text(tmp_path / "comparison.csv", "system\n")
        assert written.stat().st_mode & 0o777 == 0o644
        existing = tmp_path / "out.csv"
        existing.write_text("old")
        assert rundir.write_text(existing, "new").stat().st_mode & 0o777 == 0o644  # was turned into 0600
        folder = rundir.temp_dir(tmp_path / "model")
        assert folder.stat().st_mode & 0o777 == 0o755
        # safetensors' save_file writes 0600 itself (head, adapter and export weights; a review)
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(folder / "head.safetensors"))
        assert (folder / "head.safetensors").stat().st_mode & 0o777 == 0o600
        rundir.replace_dir(folder, tmp_path / "model")
        assert (tmp_path / "model" / "head.safetensors").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert rundir.write_text(tmp_path / "private.csv", "x").stat().st_mode & 0o777 == 0o600  # the user's choice
    finally:
        os.umask(old)


def test_a_finished_system_with_a_missing_or_cut_file_is_trained_again(tmp_path, small_csv):
    """A finished system whose adapter weights were deleted was "done already (skipped)", and
    predict on it then failed with an internal error (a review)."""
    import json

    from typer.testing import CliRunner

    from tailtune.cli import app

    out = tmp_path / "run"
    command = [
        "run",
        "smoke",
        "--data",
        str(small_csv),
        "--out",
        str(out),
        "--systems",
        "tfidf-logreg,encoder-lora",
        "--no-report",
    ]
    assert CliRunner().invoke(app, command).exit_code == 0
    system = out / "systems" / "encoder-lora"
    files = json.loads((system / "files.json").read_text())
    weights = next(name for name in files if name.endswith(".safetensors"))
    expected = (system / "predictions.csv").read_text()
    (system / weights).unlink()
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0, again.output
    assert "encoder-lora is incomplete (a file is missing or cut); training it again" in again.output
    assert "tfidf-logreg" in again.output and (system / weights).is_file()
    assert (system / "predictions.csv").read_text() == expected
    (system / weights).write_bytes((system / weights).read_bytes()[:-8])  # cut
    assert "training it again" in CliRunner().invoke(app, command).output


def test_a_finished_folder_is_on_disk_before_it_is_renamed_into_place(tmp_path, synced):
    """save_pretrained and torch.save write unsynced: a power loss after the rename could leave a
    finished system whose weights were never written."""
    target = tmp_path / "systems" / "encoder-lora"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    tmp = rundir.temp_dir(target)
    (tmp / "model").mkdir()
    (tmp / "model" / "weights.bin").write_bytes(b"\0" * 64)
    (tmp / "metrics.json").write_text("{}")
    rundir.replace_dir(tmp, target)
    assert {p.name for p in target.iterdir()} == {"model", "metrics.json"}
    assert synced.index(str(tmp / "model" / "weights.bin")) < synced.index(str(tmp))
    assert str(tmp / "metrics.json") in synced
    assert synced[-1] == str(target.parent)  # the rename, once done
