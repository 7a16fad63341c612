"""``--tune``: the search grid, the subset, and choices that reach training, survive a rerun and resume."""

import json

import numpy as np
import pytest
import yaml
from test_cli import tailtune

from tailtune.config import load_config
from tailtune.errors import TailtuneError
from tailtune.systems import parse_system
from tailtune.tune import grid, subset


def test_the_grid_searches_what_the_name_leaves_open_default_first():
    cfg = load_config("smoke", ["tune.lr_factors=[0.5,1,2]", "tune.weightings=[none,sqrt_inverse]"])
    # smoke: train.lr 1e-3, train.weighting sqrt_inverse; the default comes first in each list
    assert grid(parse_system("encoder-lora-weighted"), cfg) == [
        (1e-3, "sqrt_inverse"), (5e-4, "sqrt_inverse"), (2e-3, "sqrt_inverse"),
        (1e-3, "none"), (5e-4, "none"), (2e-3, "none"),
    ]
    assert grid(parse_system("encoder-lora-logit_adjusted"), cfg) == [
        (1e-3, "logit_adjusted"), (5e-4, "logit_adjusted"), (2e-3, "logit_adjusted"),
    ]
    # full fine-tuning starts from its paper's rate, not train.lr
    assert [lr for lr, _ in grid(parse_system("encoder-full"), cfg)] == [2e-5, 1e-5, 4e-5]
    assert grid(parse_system("encoder-lora-weighted@lr=3e-4"), cfg) == [(3e-4, "sqrt_inverse"), (3e-4, "none")]
    assert grid(parse_system("encoder-lora@lr=3e-4"), cfg) == []  # nothing left to search
    assert grid(parse_system("encoder-head"), cfg) == []  # head-only training has no backbone lr
    assert {lr for lr, _ in grid(parse_system("encoder-head-weighted"), cfg)} == {cfg.train.lr}
    # a one-point grid that is not the default is that point; it was ignored ([]), so the system
    # trained at 1e-3 while an -weighted one beside it used the 0.5x
    half = load_config("smoke", ["tune.lr_factors=[0.5]"])
    assert grid(parse_system("encoder-lora"), half) == [(5e-4, "none")]
    other = load_config("smoke", ["tune.lr_factors=[1.0]", "tune.weightings=[logit_adjusted]"])
    assert grid(parse_system("encoder-lora-weighted"), other) == [(1e-3, "logit_adjusted")]
    assert grid(parse_system("encoder-lora"), load_config("smoke", ["tune.lr_factors=[1.0]"])) == []


def test_the_subset_is_stratified_and_keeps_every_class():
    y = np.repeat(np.arange(4), [600, 300, 90, 3])
    rows = subset(y, 100, seed=0)
    assert len(rows) == 100 and np.all(np.diff(rows) > 0)
    counts = np.bincount(y[rows], minlength=4)
    assert counts.tolist() == [60, 30, 9, 1]
    assert np.array_equal(subset(y, 5000, seed=0), np.arange(len(y)))
    assert np.array_equal(subset(y, 100, seed=0), rows)  # seeded


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.lr_factors=[]", "lr_factors must be a non-empty"),
        ("tune.lr_factors=[0]", "lr_factors must be a non-empty"),
        ("tune.weightings=[nosuch]", "unknown class weighting 'nosuch'"),
        ("tune.max_rows=1", "max_rows must be >= 2"),
        ("tune.chosen=[{system: encoder-nope, lr: 0.1, weighting: none, val_macro_f1: 0.5}]", "not in systems"),
        ("tune.chosen=[{system: encoder-lora}]", "config key 'tune.chosen.lr' is required"),
    ],
)
def test_bad_tune_settings_are_refused(override, message):
    with pytest.raises(TailtuneError, match=message):
        load_config("smoke", [override])


def _trials(out):
    return json.loads((out / "tune.json").read_text())["trials"]


def test_tune_chooses_on_validation_writes_the_choice_and_trains_with_it(tmp_path):
    out = tmp_path / "tuned"
    args = ("run", "smoke", "--systems", "tfidf-logreg,encoder-lora-weighted,encoder-lora@lr=1e-3", "--tune",
            "tune.lr_factors=[1,4]", "tune.weightings=[sqrt_inverse,logit_adjusted]", "--out", out, "--no-report")
    first = tailtune(*args, check=True)
    trials = _trials(out)
    assert len(trials) == 4  # 2 lrs x 2 weightings for the -weighted system; the other names its lr
    best = max(trials.values(), key=lambda t: t["val_macro_f1"])
    chosen = yaml.safe_load((out / "config.yaml").read_text())["tune"]["chosen"]
    assert chosen == [{"system": "encoder-lora-weighted", "lr": best["lr"], "weighting": best["weighting"],
                       "val_macro_f1": round(best["val_macro_f1"], 4)}]
    system = json.loads((out / "systems" / "encoder-lora-weighted" / "metrics.json").read_text())["system"]
    assert (system["lr"], system["weighting"], system["tuned"]) == (best["lr"], best["weighting"], True)
    assert "chosen: lr" in first.stdout

    # Rerun: same run (the choice does not make config.yaml "different"), nothing retrained.
    again = tailtune(*args, check=True)
    assert again.stdout.count("done already") == 3 and _trials(out) == trials

    # Killed after some trials: the search reads them back instead of training them again.
    # Make another trial the best and drop the choice and the system, as if killed mid-search.
    other = next(name for name, t in trials.items() if (t["lr"], t["weighting"]) != (best["lr"], best["weighting"]))
    stored = json.loads((out / "tune.json").read_text())
    stored["trials"][other]["val_macro_f1"] = 2.0
    (out / "tune.json").write_text(json.dumps(stored))
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["tune"]["chosen"] = []
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    import shutil

    shutil.rmtree(out / "systems" / "encoder-lora-weighted")
    resumed = tailtune(*args, check=True)
    assert "val macro-F1 2.000" in resumed.stdout
    system = json.loads((out / "systems" / "encoder-lora-weighted" / "metrics.json").read_text())["system"]
    assert (system["lr"], system["weighting"]) == (trials[other]["lr"], trials[other]["weighting"])
    assert {k: v["seconds"] for k, v in _trials(out).items()} == {k: v["seconds"] for k, v in trials.items()}


def test_a_config_with_chosen_values_trains_with_them_without_searching(tmp_path):
    out = tmp_path / "given"
    tailtune(
        "run", "smoke", "--systems", "encoder-lora-weighted", "--out", out, "--no-report",
        "tune.chosen=[{system: encoder-lora-weighted, lr: 0.0005, weighting: logit_adjusted, val_macro_f1: 0.5}]",
        check=True,
    )
    assert not (out / "tune.json").exists()
    system = json.loads((out / "systems" / "encoder-lora-weighted" / "metrics.json").read_text())["system"]
    assert (system["lr"], system["weighting"]) == (5e-4, "logit_adjusted")
    tailtune("report", out, check=True)
    assert "lr 0.0005 (tuned)" in (out / "report.html").read_text()
