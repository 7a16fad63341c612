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
        (1e-3, "sqrt_inverse"),
        (5e-4, "sqrt_inverse"),
        (2e-3, "sqrt_inverse"),
        (1e-3, "none"),
        (5e-4, "none"),
        (2e-3, "none"),
    ]
    assert grid(parse_system("encoder-lora-logit_adjusted"), cfg) == [
        (1e-3, "logit_adjusted"),
        (5e-4, "logit_adjusted"),
        (2e-3, "logit_adjusted"),
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
        ("tune.max_rows=1", "^tune.max_rows must be a number >= 2, got 1$"),
        ("tune.epochs=0", "^tune.epochs must be a number > 0, got 0"),
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
    args = (
        "run",
        "smoke",
        "--systems",
        "tfidf-logreg,encoder-lora-weighted,encoder-lora@lr=1e-3",
        "--tune",
        "tune.lr_factors=[1,4]",
        "tune.weightings=[sqrt_inverse,logit_adjusted]",
        "--out",
        out,
        "--no-report",
    )
    first = tailtune(*args, check=True)
    trials = _trials(out)
    assert len(trials) == 4  # 2 lrs x 2 weightings for the -weighted system; the other names its lr
    best = max(trials.values(), key=lambda t: t["val_macro_f1"])
    chosen = yaml.safe_load((out / "config.yaml").read_text())["tune"]["chosen"]
    assert chosen == [
        {
            "system": "encoder-lora-weighted",
            "lr": best["lr"],
            "weighting": best["weighting"],
            "val_macro_f1": round(best["val_macro_f1"], 4),
        }
    ]
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
        "run",
        "smoke",
        "--systems",
        "encoder-lora-weighted",
        "--out",
        out,
        "--no-report",
        "tune.chosen=[{system: encoder-lora-weighted, lr: 0.0005, weighting: logit_adjusted, val_macro_f1: 0.5}]",
        check=True,
    )
    assert not (out / "tune.json").exists()
    system = json.loads((out / "systems" / "encoder-lora-weighted" / "metrics.json").read_text())["system"]
    assert (system["lr"], system["weighting"]) == (5e-4, "logit_adjusted")
    tailtune("report", out, check=True)
    assert "lr 0.0005 (tuned)" in (out / "report.html").read_text()


def test_the_subset_depends_on_the_seed():
    y = np.repeat(np.arange(4), [600, 300, 90, 3])
    assert not np.array_equal(subset(y, 100, seed=0), subset(y, 100, seed=1))


def _tiny_prepared():
    import pandas as pd

    from tailtune.data import Prepared

    classes = ["a", "b", "c"]
    train = ["a"] * 30 + ["b"] * 8 + ["c"] * 2
    rows = [(f"t{i}", f"train text {i}", c, "train") for i, c in enumerate(train)]
    rows += [(f"v{i}", f"val text {i}", c, "val") for i, c in enumerate(classes)]
    frame = pd.DataFrame(rows, columns=["id", "text", "label", "split"])
    frame["y"] = frame["label"].map({c: i for i, c in enumerate(classes)})
    return Prepared(
        frame,
        classes,
        np.array([30, 8, 2]),
        ["common", "mid", "rare"],
        ["rare", "mid", "common"],
        summary={"splits": {"train": 40, "val": 3, "test": 0}},
    )


def test_a_trial_trains_on_the_subset_for_tune_epochs_and_scores_its_best_epoch(monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    from tailtune import systems, tune

    cfg = load_config("smoke")
    assert cfg.tune.epochs != cfg.train.epochs
    data = _tiny_prepared()
    seen = {}

    @dataclasses.dataclass
    class Recipe:
        epochs: object

    class FakeClassifier:
        def __init__(self):
            self.train, self.backbone = Recipe(cfg.train.epochs), Recipe(7)

        def fit(self, texts, labels, **kw):
            seen.update(
                texts=texts, labels=labels, epochs=self.train.epochs, backbone_epochs=self.backbone.epochs, **kw
            )
            self.history_ = {"evals": [{"val_macro_f1": 0.2}, {"val_macro_f1": 0.6}, {"val_macro_f1": 0.4}]}

    def prepare(spec, ctx, lr, scheme):
        seen["prepared"] = (spec.name, lr, scheme)
        return FakeClassifier(), "probe head", None, None

    monkeypatch.setattr(systems, "prepare_finetune", prepare)
    ctx = SimpleNamespace(cfg=cfg, data=data, console=None, backbone=lambda slot: f"{slot} backbone")
    rows = np.array([0, 5, 31, 39])
    f1 = tune._trial(parse_system("encoder-lora"), ctx, 2e-3, "inverse", rows)
    assert f1 == 0.6  # the best epoch's score, not the last one's (0.4)
    assert seen["prepared"] == ("encoder-lora", 2e-3, "inverse")
    train = data.split("train")
    assert seen["texts"] == train["text"].iloc[rows].tolist()  # the stratified subset only
    assert seen["labels"] == ["a", "a", "b", "c"]
    assert seen["epochs"] == cfg.tune.epochs and seen["backbone_epochs"] is None
    assert seen["head_init"] == "probe head" and seen["backbone"] == "encoder backbone"
    assert seen["val_labels"] == ["a", "b", "c"]


def test_search_takes_the_best_trial_first_on_ties_and_retrains_only_for_another_setup(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tailtune import tune

    score = {(1e-3, "none"): 0.40, (5e-4, "none"): 0.55, (2e-3, "none"): 0.70, (1e-3, "inverse"): 0.70}
    calls = []
    monkeypatch.setattr(tune, "grid", lambda spec, cfg: list(score))

    def trial(spec, ctx, lr, scheme, rows):
        calls.append((lr, scheme))
        return score[(lr, scheme)]

    monkeypatch.setattr(tune, "_trial", trial)
    data = _tiny_prepared()
    spec = parse_system("encoder-lora-weighted")
    cfg = load_config("smoke")
    ctx = SimpleNamespace(cfg=cfg, data=data, console=None)
    (choice,) = tune.search(cfg, [parse_system("tfidf-logreg"), spec], ctx, tmp_path)
    # 0.70 twice: the earlier grid point wins; the chosen score is the chosen trial's
    assert (choice.system, choice.lr, choice.weighting, choice.val_macro_f1) == (spec.name, 2e-3, "none", 0.7)
    assert sorted(calls) == sorted(score)
    stored = json.loads((tmp_path / "tune.json").read_text())["trials"].values()
    assert {(t["lr"], t["weighting"]): t["val_macro_f1"] for t in stored} == score
    # a rerun reads every trial back
    assert tune.search(cfg, [spec], ctx, tmp_path) == [choice] and len(calls) == 4
    # another tune.epochs is another setup: its trials are trained, not read back
    longer = load_config("smoke", ["tune.epochs=2"])
    tune.search(longer, [spec], SimpleNamespace(cfg=longer, data=data, console=None), tmp_path)
    assert len(calls) == 8
    # a cut tune.json: its trials are trained again (it was an internal JSONDecodeError)
    (tmp_path / "tune.json").write_text((tmp_path / "tune.json").read_text()[:40])
    assert tune.search(cfg, [spec], ctx, tmp_path) == [choice] and len(calls) == 12
    assert len(json.loads((tmp_path / "tune.json").read_text())["trials"]) == 4
