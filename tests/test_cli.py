"""Every CLI command run once as a user would: a subprocess, checked by exit code and outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

SMOKE_SYSTEMS = ["tfidf-logreg", "encoder-probe", "encoder-lora", "encoder-lora-weighted", "decoder-lora"]


def tailtune(*args, cwd=None, check=False, columns: str | None = "120"):
    """``columns=None``: no COLUMNS, so the output is sized as in a user's log or pipe."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"TOKENIZERS_PARALLELISM": "false"}
    if columns:
        env["COLUMNS"] = columns
    result = subprocess.run(
        [sys.executable, "-m", "tailtune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    result = tailtune("run", "smoke", "--out", out, check=True, columns=None)
    return out, result


def test_smoke_run_writes_the_whole_contract(smoke_run):
    out, result = smoke_run
    for name in ("config.yaml", "data.json", "comparison.csv", "report.html"):
        assert (out / name).is_file(), name
    data = json.loads((out / "data.json").read_text())
    comparison = pd.read_csv(out / "comparison.csv")
    assert comparison["system"].tolist() == SMOKE_SYSTEMS
    assert set(comparison.columns) >= {
        "accuracy",
        "macro_f1",
        "weighted_f1",
        "zero_f1_classes",
        "trainable_params",
        "total_params",
        "train_seconds",
    }
    n_test = data["splits"]["test"]
    ok = comparison[comparison["status"] == "ok"]
    assert ok["system"].tolist() == SMOKE_SYSTEMS, comparison[["system", "note"]]  # the smoke preset is seeded
    for name in ok["system"]:
        d = out / "systems" / name
        m = json.loads((d / "metrics.json").read_text())
        for key in (
            "accuracy",
            "macro_f1",
            "weighted_f1",
            "zero_f1_classes",
            "n_classes",
            "ci",
            "tiers",
            "trainable_params",
            "total_params",
            "train_seconds",
        ):
            assert key in m, (name, key)
        lo, hi = m["ci"]["macro_f1"]
        assert lo <= m["macro_f1"] <= hi
        assert set(m["tiers"]) == set(data["tiers"]["names"])
        per_class = pd.read_csv(d / "per_class.csv")
        assert list(per_class.columns) == ["label", "tier", "train_count", "support", "precision", "recall", "f1"]
        preds = pd.read_csv(d / "predictions.csv")
        assert list(preds.columns) == ["id", "label", "prediction", "confidence"]
        assert len(preds) == n_test
        # metrics.json agrees with the predictions file
        assert m["accuracy"] == pytest.approx((preds["label"] == preds["prediction"]).mean())
        assert (d / "model" / "tailtune.json").is_file()
    # systems are different models: their predictions differ
    a = pd.read_csv(out / "systems" / "tfidf-logreg" / "predictions.csv")["prediction"]
    b = pd.read_csv(out / "systems" / "encoder-probe" / "predictions.csv")["prediction"]
    assert (a != b).any()
    assert "systems compared on the test split" in result.stdout
    # Piped output (a log, CI) is not cut to 80 columns: every system is named whole in the table.
    for name in SMOKE_SYSTEMS:
        assert re.search(rf"^│ {re.escape(name)} +│", result.stdout, re.M), name


def test_finetuned_model_dir_reloads_with_identical_predictions(smoke_run):
    from tailtune.classifier import TextClassifier

    out, _ = smoke_run
    d = out / "systems" / "decoder-lora"
    clf = TextClassifier.load(d / "model")
    preds = pd.read_csv(d / "predictions.csv")
    frame = pd.read_csv(out / "systems" / "tfidf-logreg" / "predictions.csv")
    assert (frame["id"] == preds["id"]).all()
    from tailtune.config import load_config
    from tailtune.data import prepare

    test = prepare(load_config("smoke").data).split("test")
    assert clf.predict(test["text"].tolist()) == preds["prediction"].tolist()


def test_rerun_resumes_and_other_config_is_refused(smoke_run):
    out, _ = smoke_run
    before = (out / "comparison.csv").read_text()
    again = tailtune("run", "smoke", "--out", out, "--no-report", check=True)
    assert again.stdout.count("done already") == len(SMOKE_SYSTEMS)
    assert (out / "comparison.csv").read_text() == before
    refused = tailtune("run", "smoke", "train.epochs=5", "--out", out)
    assert refused.returncode == 2
    assert "different config (train.epochs: " in refused.stderr and ", 5.0 now)" in refused.stderr


def test_report_and_inspect_and_presets(smoke_run, small_csv):
    out, _ = smoke_run
    (out / "report.html").unlink()
    result = tailtune("report", out, check=True)
    assert (out / "report.html").is_file() and "report.html" in result.stdout
    inspect = tailtune("data", "inspect", small_csv, "--label-column", "Issue", check=True)
    assert "frequency tiers" in inspect.stdout and "problems found" in inspect.stdout
    assert "(seed 0)" in inspect.stdout
    # a preset and overrides split the data as `tailtune run` with them would
    inspect = tailtune("data", "inspect", small_csv, "smoke", "data.seed=5", "data.test_size=0.3", check=True)
    assert "(seed 5)" in inspect.stdout
    # paths and column names are text as typed, not YAML (" #2" was a comment, "a: b" a mapping)
    odd = small_csv.parent / "complaints #2 données 😀.csv"  # an emoji was written as two surrogates
    import pandas as pd

    pd.read_csv(small_csv).rename(columns={"Issue": "Issue: main"}).to_csv(odd, index=False)
    inspect = tailtune("data", "inspect", odd, "--label-column", "Issue: main", check=True)
    assert "complaints #2 données 😀.csv: " in inspect.stdout
    wrong = tailtune("data", "inspect", small_csv, "smoke", "data.sed=5")
    assert (
        wrong.returncode == 2
        and wrong.stderr.strip() == "error: unknown config key 'data.sed' (did you mean 'data.seed'?)"
    )
    presets = tailtune("presets", check=True)
    assert all(p in presets.stdout for p in ("demo", "smoke", "cpu-real", "cfpb-paper"))
    assert tailtune("--help", check=True).stdout


TEXT = "Consumer complaint narrative"


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--data", "missing.csv"], "data file not found"),
        ("a,b\nx,y\n", ["--data", "f.csv"], "text column"),
        (f"{TEXT},Product\nx,A\ny,B\n", ["--data", "f.csv"], "label column 'Issue' not found"),
        ("", ["--data", "f.csv"], "data file is empty"),
        (f"{TEXT},Issue\nx,A\ny,A\nz,A\n", ["--data", "f.csv"], "only 1 class"),
        (f"{TEXT},Issue\n  ,A\n,B\n", ["--data", "f.csv"], "no usable rows"),
        (None, ["nosuchpreset"], "unknown preset"),
        (None, ["train.epochz=2"], "unknown config key 'train.epochz'"),
        (None, ["--data", "."], "is a directory"),
        # typer's usage errors were a usage block and a boxed message
        (None, ["--bogus"], "No such option: --bogus (Possible options: --out); see 'tailtune run --help'"),
        (None, ["--bench=yes"], "Option '--bench' does not take a value"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(tmp_path, setup, args, message):
    if setup is not None:
        (tmp_path / "f.csv").write_text(setup)
    out = tmp_path / "run"
    result = (
        tailtune("run", "smoke", *args, "--out", out, cwd=tmp_path)
        if args[0] != "nosuchpreset"
        else tailtune("run", *args, "--out", out, cwd=tmp_path)
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_usage_errors_click_raises_without_context_name_the_command_help(tmp_path):
    """An option missing its value, or a flag given one: click gives no context, and the line had no hint."""
    for args, message in [
        (
            ["data", "inspect", "--text-column"],
            "Option '--text-column' requires an argument; see 'tailtune data inspect --help'",
        ),
        (["run", "--bench=1"], "Option '--bench' does not take a value; see 'tailtune run --help'"),
    ]:
        result = tailtune(*args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip() == f"error: {message}", result.stderr
    assert not any(tmp_path.iterdir())


def test_weighted_system_saves_weights_rarer_classes_weigh_more_and_its_metrics_differ(smoke_run):
    out, _ = smoke_run
    weights = out / "systems" / "encoder-lora-weighted" / "model" / "class_weights.json"
    w = json.loads(weights.read_text())
    data = json.loads((out / "data.json").read_text())
    counts = np.array([data["train_counts"][c] for c in w])
    values = np.array(list(w.values()))
    assert np.corrcoef(counts, values)[0, 1] < 0  # rarer classes weigh more
    plain, weighted = (
        json.loads((out / "systems" / name / "metrics.json").read_text())
        for name in ("encoder-lora", "encoder-lora-weighted")
    )
    assert plain["system"]["weighting"] == "none" and weighted["system"]["weighting"] == "sqrt_inverse"
    assert plain["macro_f1"] != weighted["macro_f1"]


def test_report_numbers_equal_metrics_json(smoke_run):
    out, _ = smoke_run
    html = (out / "report.html").read_text() if (out / "report.html").exists() else ""
    if not html:
        tailtune("report", out, check=True)
        html = (out / "report.html").read_text()
    for heading in ("Systems comparison", "Class weighting", "Per-class analysis", "Latency", "Next steps"):
        assert heading.lower() in html.lower(), heading
    assert html.count("<img") >= 4
    # each system's numbers in its own row and column of the systems table (anywhere in the page
    # was too loose: two systems shared an accuracy, and swapped columns passed)
    table = next(t for t in _html_tables(html) if t[0][:1] == ["system"] and "macro-F1" in t[0])
    header, rows = table[0], {row[0]: row for row in table[1:]}
    comparison = pd.read_csv(out / "comparison.csv")
    assert list(rows) == comparison["system"].tolist()
    for name in comparison.loc[comparison["status"] == "ok", "system"]:
        m = json.loads((out / "systems" / name / "metrics.json").read_text())
        for key, column in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("weighted_f1", "weighted-F1")):
            assert rows[name][header.index(column)] == f"{m[key]:.3f}", (name, key)
        assert rows[name][header.index("zero-F1 classes")] == str(m["zero_f1_classes"]), name
    assert not re.findall(r'(?:src|href)=["\']https?://', html)  # self-contained, offline


def _html_tables(html: str) -> list[list[list[str]]]:
    """Every table of ``html`` as rows of cells; a cell is its first line of text (the value,
    without the line under it: a CI, "of 12", a system's kind)."""
    from html.parser import HTMLParser

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr" and self.tables:
                self.tables[-1].append([])
            elif tag in ("td", "th") and self.tables:
                self.cell = []

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.tables[-1][-1].append(next((t.strip() for t in self.cell if t.strip()), ""))
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    parser = Tables()
    parser.feed(html)
    return parser.tables


def test_ctrl_c_says_whether_the_same_command_resumes(capsys):
    """predict, export and bench said 'run the same command again to resume'; they start over."""
    import typer

    from tailtune.cli import friendly

    def run():
        raise KeyboardInterrupt

    def predict():
        raise KeyboardInterrupt

    for fn, says in ((run, "run the same command again to resume"), (predict, "nothing was written")):
        with pytest.raises(typer.Exit) as stopped:
            friendly(fn)()
        assert stopped.value.exit_code == 130 and says in capsys.readouterr().err


@pytest.mark.parametrize("raised", ["ctrl-c", "ctrl-c inside an import", "import error"])
def test_a_ctrl_c_that_comes_out_as_another_error_is_still_an_interruption(monkeypatch, raised):
    """Ctrl-C during `export`'s imports once gave "error: internal error ImportError: initialization
    failed" and exit 1 (a review): the KeyboardInterrupt was in the ImportError's chain."""
    from typer.testing import CliRunner

    from tailtune import config
    from tailtune.cli import app

    def interrupted():
        if raised == "ctrl-c":
            raise KeyboardInterrupt
        try:
            if raised == "import error":
                raise ValueError("bad build")
            raise KeyboardInterrupt
        except BaseException as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(config, "available_presets", interrupted)
    result = CliRunner().invoke(app, ["presets"])
    if raised == "import error":  # a real one stays an internal error
        assert result.exit_code == 1 and result.stderr.startswith("error: internal error ImportError")
    else:
        assert result.exit_code == 130
        assert result.stderr.strip() == "interrupted: nothing was written (outputs appear only when complete)"


def test_output_piped_into_a_reader_that_stops_is_not_an_error(tmp_path):
    """`tailtune presets | head -1` printed "error: Broken pipe" once head had its line."""
    err = tmp_path / "err.txt"
    shell = f'"{sys.executable}" -m tailtune.cli presets 2>"{err}" | true; echo "${{PIPESTATUS[0]}}"'
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "0" and err.read_text() == ""


def test_the_tailtune_command_runs_main():
    """The console script called the Typer app directly, so main()'s handling below never ran
    for a user's `tailtune`, only for `python -m tailtune.cli`."""
    from importlib.metadata import entry_points
    from pathlib import Path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11)
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.findall(r"^tailtune = \"(.+)\"$", scripts, re.M) == ["tailtune.cli:main"]
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "tailtune"]
    assert script.value == "tailtune.cli:main"  # and the installed one, in case it predates the change


def test_a_ctrl_c_after_the_command_has_ended_prints_no_traceback():
    """A Ctrl-C during interpreter shutdown broke an atexit clean-up: "Exception ignored in atexit
    callback ... KeyboardInterrupt". The SIGINT here arrives from the last atexit callback."""
    code = (
        "import atexit, os, signal, sys\n"
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
        "sys.argv = ['tailtune', 'presets']\n"
        "from tailtune.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "smoke" in done.stdout and done.stderr == ""


def test_cli_defaults_are_the_librarys():
    """The CLI states its defaults in --help, so it repeats them: they must be the library's."""
    import inspect

    import typer.main

    from tailtune import bench, deploy
    from tailtune.cli import app

    commands = typer.main.get_command(app).commands
    options = {name: {p.name: p.default for p in commands[name].params} for name in ("bench", "export", "predict")}
    library = inspect.signature(bench.bench).parameters
    assert tuple(int(b) for b in options["bench"]["batch_sizes"].split(",")) == bench.DEFAULT_BATCH_SIZES
    for name in ("repeats", "max_texts", "price_per_hour"):
        assert options["bench"][name] == library[name].default, name
    assert options["export"]["tolerance"] == inspect.signature(deploy.export_merged).parameters["tolerance"].default
    predict = inspect.signature(deploy.predict_file).parameters
    for name in ("top_k", "chunk_size", "precision", "encoding"):
        assert options["predict"][name] == predict["k" if name == "top_k" else name].default, name


@pytest.mark.parametrize("command", ["run", "train", "sweep", "plan"])
def test_every_command_taking_a_preset_lists_the_presets_in_its_help(command):
    from tailtune.config import available_presets

    help_text = tailtune(command, "--help", check=True, columns="200").stdout
    assert f"Preset name ({', '.join(available_presets())}) or YAML path." in help_text
