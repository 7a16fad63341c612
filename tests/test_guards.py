"""Collapse never goes silent: the post-training guards on a broken recipe and on a working one."""

from __future__ import annotations

import types

import numpy as np
import pytest

from tailtune.classifier import TextClassifier
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig
from tailtune.systems import GuardFailure, _guards


@pytest.fixture(scope="module")
def data(small_frame):
    """Train/val split of the small demo corpus, shaped like ``tailtune.data.Prepared`` for the guards."""
    frame = small_frame.rename(columns={"Consumer complaint narrative": "text", "Issue": "label"})
    classes = sorted(frame["label"].unique())
    val = frame.groupby("label").head(2)
    train = frame.drop(val.index)
    splits = {"train": train, "val": val}
    index = {c: i for i, c in enumerate(classes)}
    return types.SimpleNamespace(
        classes=classes,
        texts=lambda name: splits[name]["text"].tolist(),
        labels=lambda name: splits[name]["label"].tolist(),
        y=lambda name: splits[name]["label"].map(index).to_numpy(),
    )


def _fit(data, tmp_path, lpft: bool = True, **train):
    clf = TextClassifier(
        BackboneConfig(name="tiny:bert", max_length=32, batch_size=8, eval_batch_size=32),
        "lora",
        MethodConfig(rank=4, alpha=8),
        TrainConfig(
            precision="fp32",
            warmup_ratio=0.0,
            early_stopping_patience=100,
            head_init="probe" if lpft else "random",
            **train,
        ),
    )
    probe = _probe(data) if lpft else None
    clf.fit(
        data.texts("train"),
        data.labels("train"),
        val_texts=data.texts("val"),
        val_labels=data.labels("val"),
        classes=data.classes,
        head_init=(probe.W_, probe.b_) if lpft else None,
        start_val_f1=probe.val_macro_f1_ if lpft else None,
    )
    clf.save(tmp_path / "model")
    logits = clf.predict_logits(data.texts("val"))
    return clf, logits, probe.val_macro_f1_ if lpft else None


def _probe(data):
    """LP-FT start: the probe on the tiny model's frozen features, as a run would fit it."""
    from tailtune.classifier import ProbeClassifier

    index = {c: i for i, c in enumerate(data.classes)}
    probe = ProbeClassifier(BackboneConfig(name="tiny:bert", max_length=32))
    y = {s: np.array([index[c] for c in data.labels(s)]) for s in ("train", "val")}
    return probe.fit_features(
        probe.features(data.texts("train")), y["train"], data.classes, val=(probe.features(data.texts("val")), y["val"])
    )


def test_learning_rate_zero_is_flagged(data, tmp_path):
    clf, logits, start = _fit(data, tmp_path, epochs=2, lr=0.0, head_lr=0.0)
    warnings = _guards(clf, logits, tmp_path / "model", data, probe_val_f1=start)
    assert any("never beat its LP-FT start" in w for w in warnings), warnings


def test_a_recipe_that_collapses_fails_the_system(data, tmp_path):
    # No LP-FT start on a random tiny backbone: the fresh head learns the majority class only.
    clf, logits, _ = _fit(data, tmp_path, lpft=False, epochs=6, lr=2e-3, head_lr=2e-2)
    with pytest.raises(GuardFailure, match="collapsed: predicts one class"):
        _guards(clf, logits, tmp_path / "model", data, probe_val_f1=None)


def test_a_working_recipe_raises_no_collapse_warning(data, tmp_path):
    clf, logits, start = _fit(data, tmp_path, epochs=2, lr=1e-3, head_lr=1e-3)
    warnings = _guards(clf, logits, tmp_path / "model", data, probe_val_f1=start)
    assert not [w for w in warnings if "predicts only" in w or "collapsed" in w], warnings
    assert len(np.unique(logits.argmax(axis=1))) > len(data.classes) // 2
    # Past its start but below a better balanced probe, an unweighted system is told why.
    clf.history_ = {**clf.history_, "best_step": 1}
    below = _guards(clf, logits, tmp_path / "model", data, probe_val_f1=1.0)
    assert any(
        "below its own (class-balanced) probe's 1.000: its loss (weighting 'none') is not class-balanced" in w
        for w in below
    ), below


def test_one_class_for_every_row_fails_the_system(data, tmp_path):
    clf, logits, start = _fit(data, tmp_path, epochs=1, lr=0.0, head_lr=0.0)
    collapsed = np.zeros_like(logits)
    collapsed[:, 3] = 1.0
    with pytest.raises(GuardFailure, match=f"collapsed: predicts one class \\('{data.classes[3]}'\\)"):
        _guards(clf, collapsed, tmp_path / "model", data, probe_val_f1=start)


def test_a_system_predicting_few_classes_is_warned(data, tmp_path):
    """Fails when the "predicts only k of C classes" coverage warning never fires (systems._guards)."""
    from tailtune.systems import COVERAGE_WARNING

    clf, logits, start = _fit(data, tmp_path, epochs=1, lr=0.0, head_lr=0.0)
    n = len(data.classes)
    few = int(np.ceil(COVERAGE_WARNING * n)) - 1  # the most classes that still warn
    narrow = np.zeros_like(logits)
    narrow[np.arange(len(narrow)), np.arange(len(narrow)) % few] = 1.0
    warnings = _guards(clf, narrow, tmp_path / "model", data, probe_val_f1=None)
    assert any(f"predicts only {few} of {n} classes" in w for w in warnings), warnings
    wide = np.zeros_like(logits)
    wide[np.arange(len(wide)), np.arange(len(wide)) % (few + 1)] = 1.0  # at the threshold: no warning
    assert not [w for w in _guards(clf, wide, tmp_path / "model", data, probe_val_f1=None) if "predicts only" in w]
