"""The bad-input matrix (docs/input-checks.md): what a user sees for each kind of awkward input.

Errors: exit code 2, one line ``error: ...`` naming the problem, no traceback, no run
directory. Inputs that should work: the run finishes and *reports* what it did (data.json and
the terminal). Runs use the smoke preset's tiny models, in process, so they take seconds.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tailtune.config import DataConfig
from tailtune.data import prepare

TEXT = "Consumer complaint narrative"


def tailtune(*args):
    from tailtune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_error(result, out: Path, *needles: str) -> str:
    """Exit 2, one line starting 'error: ' that contains every needle, no traceback, no run dir."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    return lines[0]


def run_smoke(data: Path, out: Path, *overrides: str, systems: str = "tfidf-logreg"):
    return tailtune("run", "smoke", *overrides, "--data", data, "--out", out, "--systems", systems, "--no-report")


# ----------------------------------------------------------------------------- encodings


@pytest.fixture()
def cp1252_csv(tmp_path, small_frame):
    """The small corpus saved the way old Excel exports are: cp1252, with accents on row 3."""
    frame = small_frame.copy()
    frame.loc[1, TEXT] = "le caf\u00e9 na\u00efve " + frame.loc[1, TEXT]
    path = tmp_path / "excel.csv"
    path.write_bytes(frame.to_csv(index=False).encode("cp1252"))
    return path


def test_non_utf8_file_is_an_error_naming_file_line_and_the_encoding_option(tmp_path, cp1252_csv):
    out = tmp_path / "run"
    line = assert_error(
        run_smoke(cp1252_csv, out),
        out,
        str(cp1252_csv),
        "not valid UTF-8",
        "line 3",
        "byte offset",
        "data.encoding=cp1252",
    )
    assert "0xe9" in line
    inspect = tailtune("data", "inspect", cp1252_csv)
    assert inspect.exit_code == 2 and "--encoding" in inspect.stderr


def test_data_encoding_reads_a_non_utf8_file(tmp_path, cp1252_csv):
    result = run_smoke(cp1252_csv, tmp_path / "run", "data.encoding=cp1252")
    assert result.exit_code == 0, result.output
    assert "caf\u00e9 na\u00efve" in " ".join(
        prepare(DataConfig(path=str(cp1252_csv), encoding="cp1252")).frame["text"]
    )
    inspect = tailtune("data", "inspect", cp1252_csv, "--encoding", "cp1252")
    assert inspect.exit_code == 0, inspect.output


def test_mixed_encodings_name_the_first_bad_line(tmp_path, small_frame):
    path = tmp_path / "mixed.csv"
    good = small_frame.head(20).copy()
    good.loc[0, TEXT] = "r\u00e9sum\u00e9 " + good.loc[0, TEXT]  # UTF-8 accents on line 2
    bad = f'"na\u00efve {small_frame.loc[20, TEXT]}",{small_frame.loc[20, "Issue"]}\n'.encode("cp1252")
    path.write_bytes(good[[TEXT, "Issue"]].to_csv(index=False).encode() + bad)
    out = tmp_path / "run"
    assert_error(run_smoke(path, out), out, "mixes text encodings", "line 22", "re-save the file as UTF-8")


def test_unknown_encoding_name(tmp_path, small_csv):
    out = tmp_path / "run"
    assert_error(run_smoke(small_csv, out, "data.encoding=klingon"), out, "data.encoding 'klingon'")


# ----------------------------------------------------------------------------- files that must just work


@pytest.fixture()
def messy_csv(tmp_path, small_frame):
    """Valid but awkward: BOM, CRLF, quoted newlines, a huge text, NaN and empty labels,
    labels that differ only by case/spaces, and a class with a single row."""
    frame = small_frame[[TEXT, "Issue"]].copy()
    frame.loc[0, TEXT] = "first line\nsecond line, with a comma\r\nthird line"
    frame.loc[1, TEXT] = " ".join(["overdraft fee dispute"] * 20000)  # 60,000 words
    biggest = frame["Issue"].value_counts().index[0]
    extra = pd.DataFrame(
        {
            TEXT: [
                "label is NaN here",
                "label is empty here",
                "label is null here",
                "lonely text",
                "fee typed in lower case one",
                "fee typed in lower case two",
            ],
            "Issue": ["NaN", "", "null", "Lonely class", biggest.lower() + " ", biggest.lower() + " "],
        }
    )
    path = tmp_path / "messy.csv"
    path.write_bytes(pd.concat([frame, extra]).to_csv(index=False, lineterminator="\r\n").encode("utf-8-sig"))
    return path, biggest


def test_messy_but_valid_csv_runs_and_reports_what_it_did(tmp_path, messy_csv):
    path, biggest = messy_csv
    assert path.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in path.read_bytes()
    out = tmp_path / "run"
    result = run_smoke(path, out, systems="tfidf-logreg,encoder-probe")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "data.json").read_text())
    # BOM: the first column name is clean; CRLF + quoted newlines: every row read, none split
    assert data["text_column"] == TEXT and data["rows_read"] == len(pd.read_csv(path, encoding="utf-8-sig"))
    # NaN / empty labels: dropped, each counted under a reason
    assert data["dropped"]["na_label"] == 2 and data["dropped"]["empty_label"] == 1
    # case/space variants: reported, kept apart
    assert data["possible_duplicate_labels"] == [sorted([biggest, biggest.lower() + " "])]
    assert biggest in data["classes"] and biggest.lower() + " " in data["classes"]
    # a class with one row: dropped by min_class_count and named
    assert data["dropped_classes"] == ["Lonely class"]
    # huge text: kept, its truncation counted for the encoder
    assert data["text_words"]["max"] == 60000
    trunc = data["truncation"]["encoder"]
    assert trunc["max_length"] == 32 and trunc["texts_over"] >= 1 and trunc["longest_tokens"] > 60000
    stdout = " ".join(result.stdout.split())
    assert "possible duplicate labels" in stdout
    assert "Lonely class" in stdout
    assert "will be truncated" in stdout and "encoder max_length 32 tokens" in stdout
    assert "na_label 2" in stdout and "empty_label 1" in stdout


def test_texts_of_one_character_words_train_tfidf_on_character_ngrams(tmp_path, small_frame):
    """scikit-learn's TF-IDF words have 2+ characters: texts like "a 1 b" have none, and the
    system failed with "empty vocabulary". It now reads character n-grams and says so."""
    frame = small_frame.copy()
    codes = {label: i for i, label in enumerate(sorted(frame["Issue"].unique()))}
    # each class's texts are its own letter (a, b, ...) among shared digits
    frame[TEXT] = [
        f"{chr(ord('a') + codes[label])} {i % 10} {chr(ord('a') + codes[label])}"
        for i, label in enumerate(frame["Issue"])
    ]
    path = tmp_path / "letters.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "run"
    result = run_smoke(path, out, "data.label_column=Issue")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "systems" / "tfidf-logreg" / "metrics.json").read_text())
    assert metrics["accuracy"] == 1.0  # the letter gives the class away
    comparison = pd.read_csv(out / "comparison.csv")
    assert "character 1-4-grams" in comparison.loc[0, "note"]
    assert "character 1-4-grams" in " ".join(result.stdout.split())


def test_square_brackets_in_labels_and_paths_print_as_written(tmp_path, small_frame):
    """The terminal output is rich, which reads '[...]' as markup: a label '[/x] ...' stopped
    `data inspect` with an internal MarkupError, and the adapted modules' list
    '[attention..., ...]' vanished from every run's log. User text and paths print as written."""
    frame = small_frame[[TEXT, "Issue"]].copy()
    first, second = frame["Issue"].value_counts().index[:2]
    frame["Issue"] = frame["Issue"].replace({first: "[/x] Refund [bold]", second: "[red]Fees[/red]"})
    extra = pd.DataFrame({TEXT: ["lonely text"], "Issue": ["[Lonely] class"]})
    folder = tmp_path / "data [v2]"
    folder.mkdir()
    path = folder / "f.csv"
    pd.concat([frame, extra]).to_csv(path, index=False)

    inspect = tailtune("data", "inspect", path)
    assert inspect.exit_code == 0, inspect.output
    shown = " ".join(inspect.stdout.split())
    for text in ("[/x] Refund [bold]", "[red]Fees[/red]", "[Lonely] class", "data [v2]"):
        assert text in shown, text

    result = run_smoke(path, tmp_path / "run", systems="tfidf-logreg,encoder-lora")
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    assert "[Lonely] class" in shown and "data [v2]" in shown
    assert re.search(r"adapted: \d+ layers x \[\w", shown), shown


def test_a_run_can_gain_systems_but_not_lose_them(tmp_path, small_csv):
    """Adding a system to a finished run trains only the new one; the saved config keeps what
    --tune chose for the others. Leaving one out is refused: the directory would hold a system
    its config does not list."""
    import yaml

    out = tmp_path / "run"
    chosen = "tune.chosen=[{system: encoder-lora, lr: 0.002, weighting: none, val_macro_f1: 0.5}]"
    first = run_smoke(small_csv, out, chosen, systems="tfidf-logreg,encoder-lora")
    assert first.exit_code == 0, first.output
    before = (out / "systems" / "encoder-lora" / "predictions.csv").read_bytes()

    more = run_smoke(small_csv, out, systems="tfidf-logreg,encoder-lora,encoder-probe")
    assert more.exit_code == 0, more.output
    assert more.stdout.count("done already") == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["systems"] == ["tfidf-logreg", "encoder-lora", "encoder-probe"]
    assert saved["tune"]["chosen"] == [
        {"system": "encoder-lora", "lr": 0.002, "weighting": "none", "val_macro_f1": 0.5}
    ]
    assert pd.read_csv(out / "comparison.csv")["system"].tolist() == saved["systems"]
    assert (out / "systems" / "encoder-lora" / "predictions.csv").read_bytes() == before

    # A system not finished yet (its folder gone) is trained with what --tune chose, though
    # the command does not repeat the choice: the run's config.yaml holds it.
    shutil.rmtree(out / "systems" / "encoder-lora")
    again = run_smoke(small_csv, out, systems="tfidf-logreg,encoder-lora,encoder-probe")
    assert again.exit_code == 0, again.output
    metrics = json.loads((out / "systems" / "encoder-lora" / "metrics.json").read_text())
    assert metrics["system"]["lr"] == 0.002
    assert (out / "systems" / "encoder-lora" / "predictions.csv").read_bytes() == before

    config_before = (out / "config.yaml").read_text()
    fewer = run_smoke(small_csv, out, systems="encoder-probe")
    assert fewer.exit_code == 2
    assert "also has tfidf-logreg, encoder-lora" in fewer.stderr and "Traceback" not in fewer.output
    assert (out / "config.yaml").read_text() == config_before
    other = run_smoke(small_csv, out, "train.epochs=7", systems="tfidf-logreg,encoder-lora,encoder-probe")
    assert other.exit_code == 2 and "different config" in other.stderr


def test_train_jobs_fill_one_run_directory(tmp_path, small_csv, monkeypatch):
    """`tailtune train` trains only the systems it names and adds them to the run's, so one job
    per system fills one run directory. A job whose system fails exits 1 and leaves the reason in
    comparison.csv for the jobs after it; `tailtune run` with every system then resumes the run."""
    import yaml

    out = tmp_path / "run"

    def train(system: str):
        return tailtune("train", "smoke", "--data", small_csv, "--out", out, "--system", system)

    first = train("tfidf-logreg")
    assert first.exit_code == 0, first.output
    before = (out / "systems" / "tfidf-logreg" / "predictions.csv").read_bytes()

    _fail_system(monkeypatch, "encoder-probe", "out of memory, on purpose\nsecond line of the message")
    broken = train("encoder-probe")
    assert broken.exit_code == 1, broken.output
    assert broken.stderr.strip() == "failed: encoder-probe (the reasons are in comparison.csv)"
    monkeypatch.undo()

    second = train("encoder-lora")
    assert second.exit_code == 0, second.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["systems"] == ["tfidf-logreg", "encoder-probe", "encoder-lora"]
    comparison = pd.read_csv(out / "comparison.csv")
    assert comparison["system"].tolist() == saved["systems"]
    assert comparison["status"].tolist() == ["ok", "failed", "ok"]
    assert comparison["note"][1] == "out of memory, on purpose"
    assert (out / "systems" / "tfidf-logreg" / "predictions.csv").read_bytes() == before

    resumed = run_smoke(small_csv, out, systems="tfidf-logreg,encoder-probe,encoder-lora")
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout.count("done already") == 2
    assert pd.read_csv(out / "comparison.csv")["status"].tolist() == ["ok", "ok", "ok"]
    assert not (out / "systems" / ".encoder-probe.failed").exists()


def test_quoted_newlines_stay_inside_one_text(tmp_path, messy_csv):
    path, _ = messy_csv
    frame = prepare(DataConfig(path=str(path))).frame
    assert frame["text"].str.contains("second line, with a comma").sum() == 1
    assert frame["text"].str.contains("first line\nsecond line").any()


def test_a_label_never_appears_only_in_test(small_frame):
    """Classes below min_class_count are dropped; every kept class has a training row."""
    frame = pd.concat(
        [small_frame, pd.DataFrame({TEXT: ["one", "two a", "two b"], "Issue": ["Single", "Pair", "Pair"]})]
    )
    p = prepare(DataConfig(), frame=frame, source="test")
    assert p.summary["dropped_classes"] == ["Single"] and "Single" not in p.classes
    assert (p.train_counts >= 1).all()
    pair = p.frame[p.frame["label"] == "Pair"]["split"].value_counts().to_dict()
    assert pair == {"train": 1, "test": 1}


# ----------------------------------------------------------------------------- files that are errors


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("", ["data file is empty"]),
        ("\n\n\n", ["no rows or header"]),
        (f"{TEXT},Issue\n", ["header but no rows"]),
        (f"{TEXT},Issue\n ,A\n,B\n", ["no usable rows", f"text column '{TEXT}' is empty in all 2 rows"]),
        (f"{TEXT},Issue\nx,\ny,NaN\nz, \n", ["no usable rows", "label column 'Issue' is empty (or NaN)"]),
        (f"{TEXT},Issue\nx,A\ny,B\nz,C\n", ["all 3 classes have fewer than 2 rows"]),
        (f"{TEXT},Issue\nx,A\nx,B\n", ["conflicting labels"]),
    ],
)
def test_empty_or_unusable_files(tmp_path, content, needles):
    path = tmp_path / "f.csv"
    path.write_text(content)
    out = tmp_path / "run"
    assert_error(run_smoke(path, out), out, *needles)


def test_directory_instead_of_a_file(tmp_path):
    out = tmp_path / "run"
    assert_error(run_smoke(tmp_path, out), out, "is a directory", str(tmp_path))


# ----------------------------------------------------------------------------- output directory and disk


@pytest.fixture()
def readonly_dir(tmp_path):
    """A folder that really refuses new files, also for root (immutable flag); else skip."""
    path = tmp_path / "locked"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK):  # root ignores permission bits
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        (path / "probe").touch()
        (path / "probe").unlink()
        writable = True
    except OSError:
        writable = False
    try:
        if writable:
            pytest.skip("cannot make a read-only folder here")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_read_only_output_directory(tmp_path, small_csv, readonly_dir):
    out = readonly_dir / "run"
    assert_error(
        run_smoke(small_csv, out), out, "not writable: no file can be created in", str(out), "choose another --out"
    )


def _fail_system(monkeypatch, name: str, message: str) -> None:
    """Make system ``name`` raise RuntimeError(message) when it runs; the others run as usual."""
    from tailtune import systems as systems_lib

    real = systems_lib.run_system

    def failing(spec, *args, **kwargs):
        if spec.name == name:
            raise RuntimeError(message)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(systems_lib, "run_system", failing)


def _full_disk(monkeypatch, when):
    """Make the run directory's atomic writer hit ENOSPC mid-file for paths where ``when(path)``."""
    from tailtune import rundir

    real = rundir.atomic_write

    def atomic_write(path, write, binary=False):
        if not when(Path(path)):
            return real(path, write, binary)

        def half(f):
            f.write(b"half a file" if binary else "half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, half, binary)

    monkeypatch.setattr(rundir, "atomic_write", atomic_write)


def test_full_disk_at_the_first_write_leaves_no_run_directory(tmp_path, small_csv, monkeypatch):
    _full_disk(monkeypatch, lambda path: True)
    out = tmp_path / "run"
    assert_error(run_smoke(small_csv, out), out, "no space left on device", str(out / "config.yaml"))


def test_full_disk_during_a_system_keeps_finished_work_and_no_half_files(tmp_path, small_csv, monkeypatch):
    _full_disk(monkeypatch, lambda path: path.name == "metrics.json" and "encoder-probe" in str(path))
    out = tmp_path / "run"
    result = run_smoke(small_csv, out, systems="tfidf-logreg,encoder-probe")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device writing "), result.stderr
    assert "metrics.json" in lines[0] and "run the same command again" in lines[0]
    assert "Traceback" not in result.output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp") or "half a file" in p.read_bytes().decode(errors="ignore")]
    assert (out / "systems" / "tfidf-logreg" / "metrics.json").is_file()  # finished work kept
    assert not (out / "systems" / "encoder-probe").exists()
    assert not list(out.glob("systems/.encoder-probe*/staging"))
    monkeypatch.undo()
    again = run_smoke(small_csv, out, systems="tfidf-logreg,encoder-probe")
    assert again.exit_code == 0, again.output
    assert "done already" in again.stdout and (out / "systems" / "encoder-probe" / "metrics.json").is_file()


def test_full_disk_while_recording_a_failure_leaves_no_half_record(tmp_path, small_csv, monkeypatch):
    """A review: an empty .encoder-probe.failed/ was left, which comparison.csv read as a failure
    whose error.txt did not exist."""
    _fail_system(monkeypatch, "encoder-probe", "out of memory, on purpose")
    _full_disk(monkeypatch, lambda path: path.name == "error.txt")
    out = tmp_path / "run"
    result = run_smoke(small_csv, out, systems="tfidf-logreg,encoder-probe")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device writing "), result.stderr
    assert not list((out / "systems").glob("*encoder-probe.failed*"))  # no half record, no staging folder
    monkeypatch.undo()
    again = run_smoke(small_csv, out, systems="tfidf-logreg,encoder-probe")
    assert again.exit_code == 0, again.output
    assert pd.read_csv(out / "comparison.csv")["status"].tolist() == ["ok", "ok"]


def test_output_path_that_is_a_file(tmp_path, small_csv):
    taken = tmp_path / "taken"
    taken.write_text("not a run")
    result = run_smoke(small_csv, taken)
    assert result.exit_code == 2 and "exists and is not a directory" in result.stderr
    assert taken.read_text() == "not a run"
    out = taken / "run"
    assert_error(run_smoke(small_csv, out), out, f"cannot create output directory {out}", "is a file")


def test_a_run_is_not_resumed_on_changed_data(tmp_path, small_csv):
    """Finished systems were tested on the old split: new ones on other data would not compare."""
    out = tmp_path / "run"
    assert run_smoke(small_csv, out).exit_code == 0
    data_json = (out / "data.json").read_text()
    frame = pd.read_csv(small_csv)
    frame.loc[3, TEXT] = frame.loc[3, TEXT] + " (edited)"
    frame.to_csv(small_csv, index=False)
    changed = run_smoke(small_csv, out, systems="tfidf-logreg,encoder-probe")
    assert changed.exit_code == 2, changed.output
    assert changed.stderr.strip() == (
        f"error: {out} holds a run on other data: {small_csv} has changed since (rows, texts, labels or "
        "split); choose another --out, or restore the data the run was made with"
    )
    assert (out / "data.json").read_text() == data_json and not (out / "systems" / "encoder-probe").exists()
