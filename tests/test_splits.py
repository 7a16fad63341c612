"""Repeated split seeds: seed folders, the per-seed table, the summary and its paired differences."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from tailtune.errors import TailtuneError
from tailtune.splits import PER_SEED, SUMMARY, check_out, parse_seeds, summarise

SYSTEMS = "tfidf-logreg,encoder-probe"


def tailtune(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "tailtune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_parse_seeds():
    assert parse_seeds("3, 0,1") == [3, 0, 1]
    for text, message in [
        ("0", "at least 2"),
        ("0,x", "non-negative integers"),
        ("0,-1", "non-negative"),
        ("0,,1", "non-negative"),
        ("2,2", "twice"),
        ("0,4294967296", "seed 4294967296 is above 4294967295"),
    ]:
        with pytest.raises(TailtuneError, match=message):
            parse_seeds(text)


def test_summary_pairs_by_seed_and_skips_failed_seeds():
    frame = pd.DataFrame(
        [
            # system, seed, status, accuracy, macro_f1, zero_f1_classes
            ("base", 0, "ok", 0.70, 0.40, 3),
            ("base", 1, "ok", 0.72, 0.50, 2),
            ("base", 2, "ok", 0.74, 0.45, 2),
            ("ft", 0, "ok", 0.80, 0.50, 1),
            ("ft", 1, "failed", np.nan, np.nan, np.nan),
            ("ft", 2, "ok", 0.78, 0.42, 2),
        ],
        columns=["system", "seed", "status", "accuracy", "macro_f1", "zero_f1_classes"],
    )
    s = summarise(frame, "base").set_index("system")
    assert s.loc["base", "macro_f1_mean"] == pytest.approx(0.45)
    assert s.loc["base", "macro_f1_sd"] == pytest.approx(0.05)
    assert (s.loc["base", "macro_f1_min"], s.loc["base", "macro_f1_max"]) == (0.40, 0.50)
    assert s.loc["base", "macro_f1_diff_mean"] == 0 and s.loc["base", "seeds_higher"] == 0
    # ft finished on seeds 0 and 2 only: its numbers and the pairing use those two
    assert (s.loc["ft", "seeds"], s.loc["ft", "finished"], s.loc["ft", "seeds_paired"]) == (3, 2, 2)
    assert s.loc["ft", "macro_f1_mean"] == pytest.approx(0.46)
    # paired: (0.50 - 0.40, 0.42 - 0.45) = (+0.10, -0.03), not 0.46 - 0.45
    assert s.loc["ft", "macro_f1_diff_mean"] == pytest.approx(0.035)
    assert s.loc["ft", "macro_f1_diff_sd"] == pytest.approx(np.std([0.10, -0.03], ddof=1))
    assert s.loc["ft", "seeds_higher"] == 1


def test_out_holding_other_things_is_refused(tmp_path):
    check_out(tmp_path / "new")  # not there yet: fine
    out = tmp_path / "splits"
    (out / "seed-0").mkdir(parents=True)
    (out / ".splits.csv.abc.tmp").write_text("")  # a killed atomic write
    check_out(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TailtuneError, match="holds other files"):
        check_out(out)
    (out / "notes.txt").unlink()
    (out / "config.yaml").write_text("out: x\n")
    with pytest.raises(TailtuneError, match="holds a single run"):
        check_out(out)


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("splits") / "run"
    result = tailtune("run", "smoke", f"systems={SYSTEMS}", "--out", out, "--split-seeds", "0,1", "--no-report")
    assert result.returncode == 0, result.stderr
    return out, result


def test_split_seeds_run_one_plain_run_per_seed(split_run):
    out, result = split_run
    test_ids = []
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["data"]["seed"] == seed and cfg["out"] == str(run)
        test_ids.append(set(pd.read_csv(run / "systems" / "tfidf-logreg" / "predictions.csv")["id"]))
    assert test_ids[0] != test_ids[1]  # the seed really drew another split

    per_seed = pd.read_csv(out / PER_SEED)
    for seed in (0, 1):
        comparison = pd.read_csv(out / f"seed-{seed}" / "comparison.csv").set_index("system")
        rows = per_seed[per_seed["seed"] == seed].set_index("system")
        assert rows.index.tolist() == SYSTEMS.split(",")
        for m in ("accuracy", "macro_f1", "zero_f1_classes"):
            assert np.allclose(rows[m], comparison.loc[rows.index, m])

    summary = pd.read_csv(out / SUMMARY).set_index("system")
    probe = per_seed[per_seed["system"] == "encoder-probe"].set_index("seed")["macro_f1"]
    base = per_seed[per_seed["system"] == "tfidf-logreg"].set_index("seed")["macro_f1"]
    assert summary.loc["encoder-probe", "macro_f1_mean"] == pytest.approx(probe.mean())
    assert summary.loc["encoder-probe", "macro_f1_diff_mean"] == pytest.approx((probe - base).mean())
    assert (summary["reference"] == "tfidf-logreg").all()
    assert "systems over 2 split seeds (0, 1)" in result.stdout
    for name in SYSTEMS.split(","):  # named whole in the summary table
        assert f"│ {name} " in result.stdout


def test_split_seeds_rerun_resumes_and_adds_a_seed(split_run):
    out, _ = split_run
    before = pd.read_csv(out / PER_SEED)
    result = tailtune("run", "smoke", f"systems={SYSTEMS}", "--out", out, "--split-seeds", "0,1,2", "--no-report")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("done already") == 4  # seeds 0 and 1 kept, seed 2 trained
    after = pd.read_csv(out / PER_SEED)
    assert after[after["seed"] < 2].reset_index(drop=True).equals(before)
    assert sorted(after["seed"].unique()) == [0, 1, 2]


def test_split_seeds_bad_input_is_one_line(split_run, tmp_path):
    out, _ = split_run
    cases = [
        (["--out", tmp_path / "a", "--split-seeds", "0,0"], "lists a seed twice"),
        (["--out", out / "seed-0", "--split-seeds", "0,1"], "holds a single run"),
        # a review: "exists, is not empty and is not a tailtune run directory"
        (["--out", out], "holds one run per split seed; add --split-seeds to resume or extend them"),
        (
            ["--out", out, "--split-seeds", "0,1", "train.epochs=9"],
            "holds split seeds run with a different config (seed-0: train.epochs: 2.0 in the run, 9.0 now)",
        ),
    ]
    for args, message in cases:
        result = tailtune("run", "smoke", f"systems={SYSTEMS}", *args, "--no-report")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "a").exists()
    result = tailtune("report", out)
    assert result.returncode == 2 and "pass one of them" in result.stderr


def test_split_seeds_with_tune_tune_each_seed(tmp_path):
    out = tmp_path / "run"
    result = tailtune(
        "run",
        "smoke",
        "systems=tfidf-logreg,encoder-lora",
        "tune.lr_factors=[1,4]",
        "--out",
        out,
        "--split-seeds",
        "0,1",
        "--tune",
        "--no-report",
    )
    assert result.returncode == 0, result.stderr
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        assert (run / "tune.json").is_file()
        chosen = yaml.safe_load((run / "config.yaml").read_text())["tune"]["chosen"]
        assert [c["system"] for c in chosen] == ["encoder-lora"]
    assert set(pd.read_csv(out / PER_SEED)["seed"]) == {0, 1}


def test_seeds_paired_counts_only_seeds_where_the_reference_finished_too():
    frame = pd.DataFrame(
        [
            ("base", 0, "ok", 0.70, 0.40, 3),
            ("base", 1, "failed", np.nan, np.nan, np.nan),
            ("ft", 0, "ok", 0.80, 0.50, 1),
            ("ft", 1, "ok", 0.78, 0.42, 2),
        ],
        columns=["system", "seed", "status", "accuracy", "macro_f1", "zero_f1_classes"],
    )
    s = summarise(frame, "base").set_index("system")
    # ft finished on both seeds, but only seed 0 has a reference to pair with
    assert (s.loc["ft", "finished"], s.loc["ft", "seeds_paired"]) == (2, 1)
    assert s.loc["ft", "macro_f1_diff_mean"] == pytest.approx(0.10)
    assert np.isnan(s.loc["ft", "macro_f1_diff_sd"]) and s.loc["ft", "seeds_higher"] == 1


def test_the_largest_seed_is_accepted():
    from tailtune.config import MAX_SEED

    assert parse_seeds(f"0,{MAX_SEED}") == [0, MAX_SEED]


def test_a_seed_comparison_without_a_metric_column_is_one_line(tmp_path):
    """A review: a seed's comparison.csv without 'status' or a metric was KeyError, an internal error."""
    from tailtune.splits import per_seed, seed_dir

    seed_dir(tmp_path, 0).mkdir(parents=True)
    path = seed_dir(tmp_path, 0) / "comparison.csv"
    path.write_text("system,accuracy,macro_f1,zero_f1_classes\ntfidf-logreg,0.5,0.25,3\n")  # no status: ok
    assert per_seed(tmp_path, [0]).to_dict("records") == [
        {"system": "tfidf-logreg", "seed": 0, "status": "ok", "accuracy": 0.5, "macro_f1": 0.25, "zero_f1_classes": 3}
    ]
    path.write_text("system,status,accuracy\ntfidf-logreg,ok,0.5\n")
    with pytest.raises(
        TailtuneError, match=r"comparison.csv has no 'macro_f1', 'zero_f1_classes' columns; run the same"
    ):
        per_seed(tmp_path, [0])
