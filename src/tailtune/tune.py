"""``tailtune run --tune``: choose each fine-tuned system's learning rate (and weighting) on validation.

For every head-based fine-tuned system of the run (``<slot>-<method>...``; decoder-generate is
not searched) the grid is ``tune.lr_factors`` times the system's own learning rate (unless its
name sets ``@lr=``) crossed with ``tune.weightings`` (only for ``-weighted`` systems: the
others name their weighting). Each trial is the system's own recipe (LP-FT start, precision,
length-grouped batches) trained for ``tune.epochs`` on a stratified subset of at most
``tune.max_rows`` training rows, and is scored by the best validation macro-F1 its training
reaches (the LP-FT start itself does not count, so a learning rate that learns nothing cannot
win by standing still). Ties go to the earlier grid point, and the grid starts at the
system's default. The choices are written into the run's ``config.yaml`` (``tune.chosen``),
every trial into ``<out>/tune.json``; a rerun reads finished trials from there, so an
interrupted search resumes trial by trial.

The search uses the validation split that also selects epochs and checkpoints, so a tuned
system's validation score is optimistic; the test split is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from rich.markup import escape

from tailtune import rundir
from tailtune.config import Config, TuneChoice

TUNE_FILE = "tune.json"


def grid(spec, cfg: Config) -> list[tuple[float, str]]:
    """(lr, weighting) trials of ``spec``, its default first; [] when the only point is the default
    (the name fixes both, or the grid is the default alone). A one-point grid elsewhere
    (``tune.lr_factors=[0.5]``) is one trial, so it is used and recorded like any choice."""
    from tailtune import methods
    from tailtune.classifier import TextClassifier

    method_cfg, train_cfg, bb_cfg, lr = spec.configs(cfg)
    scheme = spec.scheme(cfg)
    base_lr = TextClassifier(bb_cfg, spec.method, method_cfg, train_cfg, lr=lr).learning_rate()
    searched = lr is None and methods.get(spec.method).uses_lr  # head-only training has no lr to search
    lrs = _default_first([base_lr * f for f in cfg.tune.lr_factors], base_lr) if searched else [base_lr]
    schemes = _default_first(list(cfg.tune.weightings), scheme) if spec.weighting == "config" else [scheme]
    if lrs == [base_lr] and schemes == [scheme]:  # one point, the default: nothing to choose
        return []
    return [(float(f"{x:.3g}"), s) for s in schemes for x in lrs]


def _default_first(values: list, default) -> list:
    return sorted(values, key=lambda v: v != default)  # stable: the rest keep their order


def subset(y: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Sorted row indices of a stratified sample of at most ``max_rows`` rows; every class keeps >= 1."""
    if len(y) <= max_rows:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    share = max_rows / len(y)
    picked = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        picked.append(rng.choice(rows, size=max(1, int(round(share * len(rows)))), replace=False))
    return np.sort(np.concatenate(picked))


def search(cfg: Config, specs, ctx, out: Path) -> list[TuneChoice]:
    """Run (or read back) every trial and return the chosen values, one per searched system."""
    from tailtune.distributed import is_main

    path = out / TUNE_FILE
    done = _read_trials(path)
    data = ctx.data
    rows = subset(data.y("train"), cfg.tune.max_rows, cfg.train.seed)
    key = json.dumps(
        {"rows": int(len(rows)), "epochs": cfg.tune.epochs, "seed": cfg.train.seed, "splits": data.summary["splits"]},
        sort_keys=True,
    )
    if done.get("key") != key:
        done = {"key": key, "trials": {}}
    chosen = []
    for spec in specs:
        if spec.kind != "finetune":
            continue
        trials = grid(spec, cfg)
        if not trials:
            continue
        if ctx.console is not None:
            ctx.console.rule(f"[bold]tune {escape(spec.name)}[/] ({len(trials)} trials on {len(rows)} training rows)")
        scores = []
        for lr, scheme in trials:
            name = f"{spec.name} lr={lr:g} weighting={scheme}"
            if name not in done["trials"]:
                started = time.perf_counter()
                f1 = _trial(spec, ctx, lr, scheme, rows)
                done["trials"][name] = {
                    "system": spec.name,
                    "lr": lr,
                    "weighting": scheme,
                    "val_macro_f1": f1,
                    "seconds": round(time.perf_counter() - started, 1),
                }
                if is_main():
                    _record(out, key, name, done["trials"][name])
            trial = done["trials"][name]
            scores.append(trial["val_macro_f1"])
            if ctx.console is not None:
                ctx.console.print(
                    f"  lr {lr:g}, weighting {scheme}: val macro-F1 {trial['val_macro_f1']:.3f} ({trial['seconds']:.0f} s)"
                )
        best = int(np.argmax(scores))  # the first of equal scores: the grid starts at the default
        lr, scheme = trials[best]
        chosen.append(TuneChoice(spec.name, lr, scheme, round(float(scores[best]), 4)))
        if ctx.console is not None:
            ctx.console.print(f"  chosen: lr {lr:g}, weighting {scheme}")
    return chosen


def _record(out: Path, key: str, name: str, trial: dict) -> None:
    """Add one trial to tune.json, read again under the run's lock: ``train --system X --tune``
    jobs in one run directory each add their own (writing the whole file lost the others')."""
    path = out / TUNE_FILE
    with rundir.locked(out):
        on_disk = _read_trials(path)
        if on_disk.get("key") != key:
            on_disk = {"key": key, "trials": {}}
        on_disk["trials"][name] = trial
        rundir.write_json(path, on_disk)


def _trial(spec, ctx, lr: float, scheme: str, rows: np.ndarray) -> float:
    """Best validation macro-F1 that ``spec`` reaches with ``lr`` and ``scheme`` on the ``rows`` of train."""
    from tailtune.systems import prepare_finetune

    data = ctx.data
    clf, head_init, _, _ = prepare_finetune(spec, ctx, lr, scheme)
    clf.train = dataclasses.replace(clf.train, epochs=ctx.cfg.tune.epochs)
    clf.backbone = dataclasses.replace(clf.backbone, epochs=None)  # tune.epochs, not the backbone's
    train = data.split("train").iloc[rows]
    clf.fit(
        train["text"].tolist(),
        train["label"].tolist(),
        val_texts=data.texts("val"),
        val_labels=data.split("val")["label"].tolist(),
        classes=data.classes,
        head_init=head_init,
        backbone=ctx.backbone(spec.slot),
        console=ctx.console,
    )
    return float(max(e["val_macro_f1"] for e in clf.history_["evals"]))


def _read_trials(path: Path) -> dict:
    """tune.json, or {} when it is missing or damaged (cut, not JSON): the trials it held are
    run again, as for a run killed before writing it; it was an internal error."""
    try:
        done = rundir.read_json(path)
    except (OSError, ValueError):
        return {}
    return done if isinstance(done, dict) and isinstance(done.get("trials", {}), dict) else {}
