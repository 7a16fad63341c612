"""Systems: the things a run compares, looked up by name.

Names follow one grammar:

- ``tfidf-logreg`` — the reference baseline (TF-IDF + logistic regression);
- ``<encoder|decoder>-probe`` — frozen backbone features + class-balanced logistic regression;
- ``decoder-generate[-logit_adjusted][@key=value+...]`` — the decoder LoRA-tuned to write the
  label, scored over every label (:mod:`tailtune.generate`); ``-logit_adjusted`` removes
  ``train.logit_tau`` x the log train prior from the scores;
- ``<encoder|decoder>-<method>[-weighted|-<scheme>][@key=value+...]`` — fine-tuned with a
  method from :mod:`tailtune.methods`; ``-weighted`` uses ``train.weighting`` (sqrt-inverse by
  default), ``-<scheme>`` names a strategy from :mod:`tailtune.weighting` directly (a loss
  weighting, ``logit_adjusted`` or ``balanced_sampling``). After ``@``, settings of this system
  only: the ``method`` section's keys (``rank``, ``alpha``, ``dropout``, ``targets`` with roles
  joined by ``|``, ``virtual_tokens``, ``bottleneck``) and ``lr``, ``head_lr``, ``epochs``;
  ``tailtune sweep`` writes such names, e.g. ``encoder-lora@rank=4+targets=attention``.

Each runner trains, saves its model under the folder it is given, and returns test-set
probabilities plus what the comparison needs (parameters, time, warnings).
"""

from __future__ import annotations

import json
import math
import time
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tailtune.errors import TailtuneError

SLOTS = ("encoder", "decoder")
BASELINES = ("tfidf-logreg",)
# A fine-tuned system that reaches fewer than this share of the classes on test is flagged.
COVERAGE_WARNING = 0.5


# Keys a system name may set after "@": the method's knobs, and these of the training recipe.
TRAIN_KEYS = ("lr", "head_lr", "epochs")


@dataclass(frozen=True)
class SystemSpec:
    name: str
    kind: str  # baseline | probe | finetune | generate
    slot: str | None = None  # encoder | decoder
    method: str | None = None
    weighting: str = "none"  # a scheme name, or "config" for train.weighting
    overrides: tuple = ()  # ((key, value), ...) from the name's "@key=value+key=value" part

    def configs(self, cfg):
        """(method config, train config, backbone config, lr or None) of this system: the run's, with its overrides."""
        import dataclasses

        set_ = dict(self.overrides)
        method = dataclasses.replace(cfg.method, **{k: v for k, v in set_.items() if k not in TRAIN_KEYS})
        train = dataclasses.replace(cfg.train, **{k: set_[k] for k in ("head_lr",) if k in set_})
        backbone = getattr(cfg, self.slot)
        if "epochs" in set_:  # the backbone's epochs win over train.epochs in training
            backbone = dataclasses.replace(backbone, epochs=set_["epochs"])
        return method, train, backbone, set_.get("lr")

    @property
    def identity(self) -> tuple:
        """What it trains, whatever the name's spelling: ``@lr=1e-4`` is ``@lr=0.0001``, and the
        order of its settings does not matter."""
        settings = sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.overrides)
        return self.kind, self.slot, self.method, self.weighting, tuple(settings)

    def scheme(self, cfg) -> str:
        """The weighting its name gives (``train.weighting`` for a ``-weighted`` system)."""
        return cfg.train.weighting if self.weighting == "config" else self.weighting

    def recipe(self, cfg) -> tuple[float | None, str]:
        """(lr or None for the method's default, weighting) of a fine-tuned system: what ``--tune``
        chose for it (``cfg.tune.chosen``), else its name's and the config's."""
        for choice in cfg.tune.chosen:
            if choice.system == self.name:
                return choice.lr, choice.weighting
        return self.configs(cfg)[3], self.scheme(cfg)


def _parse_overrides(name: str, text: str) -> tuple:
    """'rank=4+targets=attention|ffn' -> (("rank", 4), ("targets", ["attention", "ffn"]))."""
    import dataclasses

    from tailtune.config import MethodConfig

    allowed = [f.name for f in dataclasses.fields(MethodConfig)] + list(TRAIN_KEYS)
    hints = typing.get_type_hints(MethodConfig)
    whole = {key for key, kind in hints.items() if kind is int}  # rank=2.5 was an internal TypeError
    pairs = []
    for item in text.split("+"):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise TailtuneError(f"system '{name}': '{item}' must be key=value with key one of {', '.join(allowed)}")
        if key in dict(pairs):
            raise TailtuneError(f"system '{name}' sets {key} twice")
        if key == "targets":
            from tailtune.methods import ROLES

            roles = value.split("|")
            if any(r not in ROLES for r in roles):
                raise TailtuneError(f"system '{name}': targets must be roles joined by '|' from {', '.join(ROLES)}")
            pairs.append((key, roles))
            continue
        try:
            number = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise TailtuneError(f"system '{name}': {key} must be a number, got '{value}'")
        if key in whole and not isinstance(number, int):
            raise TailtuneError(f"system '{name}': {key} must be a whole number, got '{value}'")
        pairs.append((key, number))
    return tuple(pairs)


def settings_of(kind: str, method: str) -> set[str]:
    """The ``@key=value`` settings a system of ``kind`` and ``method`` uses."""
    from tailtune import methods

    uses = set(methods.get(method).uses) | set(TRAIN_KEYS)
    if not methods.get(method).uses_lr:
        uses.discard("lr")
    if kind == "generate":
        uses.discard("head_lr")  # the LM head writes the label; there is no classification head
    return uses


def _check_uses(name: str, kind: str, method: str, overrides: tuple) -> None:
    """Refuse a setting the system does not use: ``encoder-ia3@rank=64`` trained plain ia3 under
    another name, and a sweep crossing it made duplicate points."""
    uses = settings_of(kind, method)
    unused = [key for key, _ in overrides if key not in uses]
    if unused:
        raise TailtuneError(
            f"system '{name}': {method if kind == 'finetune' else kind} does not use {', '.join(unused)} "
            f"(its settings: {', '.join(sorted(uses))})"
        )


@dataclass
class Outcome:
    proba: np.ndarray  # (N_test, C)
    train_seconds: float
    trainable_params: int
    total_params: int
    info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def parse_system(name: str) -> SystemSpec:
    """Parse a system name (grammar in the module docstring)."""
    from tailtune import methods, weighting
    from tailtune.config import suggest

    if name in BASELINES:
        return SystemSpec(name, "baseline")
    base, at, settings = name.partition("@")
    slot, _, rest = base.partition("-")
    if slot in SLOTS and rest == "probe" and not at:
        return SystemSpec(name, "probe", slot)
    if base in ("decoder-generate", "decoder-generate-logit_adjusted"):  # the decoder writes the label
        scheme = "logit_adjusted" if base.endswith("logit_adjusted") else "none"
        overrides = _parse_overrides(name, settings) if at else ()
        _check_uses(name, "generate", "lora", overrides)
        return SystemSpec(name, "generate", "decoder", "lora", scheme, overrides)
    if slot in SLOTS and rest:
        method, _, suffix = rest.partition("-")
        if method in methods.METHODS:
            scheme = {"": "none", "weighted": "config"}.get(suffix, suffix)
            if scheme in ("none", "config") or scheme in weighting.names():
                overrides = _parse_overrides(name, settings) if at else ()
                _check_uses(name, "finetune", method, overrides)
                return SystemSpec(name, "finetune", slot, method, scheme, overrides)
    close = suggest(
        name,
        [
            *BASELINES,
            *(f"{s}-probe" for s in SLOTS),
            "decoder-generate",
            *(
                f"{s}-{m}{w}"
                for s in SLOTS
                for m in methods.METHODS
                for w in ("", "-weighted", *(f"-{n}" for n in weighting.names()))
            ),
        ],
    )
    raise TailtuneError(
        f"unknown system '{name}'{close}: use tfidf-logreg, <encoder|decoder>-probe, "
        f"<encoder|decoder>-<{'|'.join(methods.METHODS)}>[-weighted|-<scheme>][@key=value+...] or "
        f"decoder-generate[-logit_adjusted][@key=value+...] (the decoder writes the label; not for "
        f"encoders); schemes: {', '.join(weighting.names())}"
    )


# ----------------------------------------------------------------------------- shared context


class Context:
    """What the systems of one run share: config, data, resolved backbones, frozen features."""

    def __init__(self, cfg, data, console, cache_dir: Path):
        self.cfg = cfg
        self.data = data
        self.console = console
        self.cache_dir = cache_dir
        self._backbones: dict = {}
        self._probes: dict = {}

    def backbone(self, slot: str):
        from tailtune import backbones

        if slot not in self._backbones:
            self._backbones[slot] = backbones.resolve(getattr(self.cfg, slot).name)
        return self._backbones[slot]

    def probe(self, slot: str, splits: tuple[str, ...] = ("train", "val")):
        """The fitted probe of ``slot`` and its features for ``splits`` (computed once, cached on disk).

        Fine-tuning only needs train (to fit the LP-FT head) and val (its starting score);
        the probe system asks for test too. Features are the costly part on a decoder.
        """
        result = self._probes.get(slot)
        if result is None:
            from tailtune.classifier import ProbeClassifier

            bb_cfg = getattr(self.cfg, slot)
            # A decoder's head is bias-free (the stock HF layout), so its probe fits no intercept.
            probe = ProbeClassifier(bb_cfg, seed=self.cfg.train.seed, intercept=not self.backbone(slot).is_decoder)
            probe.backbone_ = self.backbone(slot)
            probe.pooling_ = bb_cfg.pooling if bb_cfg.pooling != "auto" else probe.backbone_.pooling
            result = self._probes[slot] = {"probe": probe, "features": {}, "seconds": 0.0, "fitted": False}
        started = time.perf_counter()
        feats = result["features"]
        missing = [s for s in splits if s not in feats]
        for split in missing:
            feats[split] = self._features(slot, split, result["probe"])
        if not result["fitted"]:
            result["probe"].fit_features(
                feats["train"], self.data.y("train"), self.data.classes, val=(feats["val"], self.data.y("val"))
            )
            result["fitted"] = True
        result["seconds"] += time.perf_counter() - started
        return result

    def _features(self, slot: str, split: str, probe) -> np.ndarray:
        """Frozen pooled features of one split, from the run's cache when the key matches."""
        from tailtune.rundir import atomic_write
        from tailtune.train import resolve_precision

        bb_cfg = getattr(self.cfg, slot)
        # Features computed in another precision (another machine: bf16 where native) are recomputed.
        # "split": special-token strings in a text are read as text (backbones.load_tokenizer), since 2026-12-02
        key = json.dumps(
            [vars(bb_cfg), self.data.summary["splits"], self.cfg.data.seed, resolve_precision("auto"), "split"],
            sort_keys=True,
        )
        cache = self.cache_dir / f"{slot}-{split}-features.npz"
        if cache.exists():
            try:
                with np.load(cache, allow_pickle=False) as stored:
                    if str(stored["key"]) == key:
                        return stored["features"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):  # damaged: computed again
                pass
        if not hasattr(probe, "model_"):
            probe.load_encoder(probe.backbone_)
        texts = self.data.texts(split)
        with _bar(self.console, f"  {slot} features ({split})", len(texts)) as advance:
            features = probe.features(texts, progress=advance)
        from tailtune.distributed import is_main

        if is_main():  # under torchrun every process computes the same features; one writes them
            atomic_write(cache, lambda f: np.savez(f, key=np.array(key), features=features), binary=True)
        return features


class _bar:
    """``with _bar(console, label, total) as advance:`` a rich progress bar (no-op without console)."""

    def __init__(self, console, label: str, total: int):
        self.console, self.label, self.total = console, label, total

    def __enter__(self):
        if self.console is None:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn(self.label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.progress.start()
        task = self.progress.add_task(self.label, total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc):
        if self.console is not None:
            self.progress.stop()


# ----------------------------------------------------------------------------- runners


def run_system(spec: SystemSpec, ctx: Context, model_dir: Path, work_dir: Path | None = None) -> Outcome:
    """Train ``spec`` and save it in ``model_dir``; fine-tuning keeps checkpoints in ``work_dir`` and resumes from them."""
    return RUNNERS[spec.kind](spec, ctx, model_dir, work_dir)


def _run_tfidf(spec: SystemSpec, ctx: Context, model_dir: Path, work_dir: Path | None = None) -> Outcome:
    import joblib
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from tailtune.classifier import single_threaded_blas
    from tailtune.deploy import SklearnPredictor, pipeline_proba

    t = ctx.cfg.tfidf
    data = ctx.data
    started = time.perf_counter()

    def pipeline(**vectorizer):
        return make_pipeline(
            TfidfVectorizer(sublinear_tf=True, max_features=t.max_features, **vectorizer),
            LogisticRegression(C=t.C, max_iter=2000, class_weight=t.class_weight, random_state=ctx.cfg.train.seed),
        )

    architecture, warnings = "tf-idf + logistic regression", []
    pipe = pipeline(ngram_range=(1, t.ngram_max))
    with single_threaded_blas():
        try:
            pipe.fit(data.texts("train"), data.y("train"))
        except ValueError as exc:
            if "empty vocabulary" not in str(exc):
                raise
            # scikit-learn's words are 2+ word characters: texts of single letters, digits or
            # symbols have none. Character n-grams (within word boundaries) read any text.
            pipe = pipeline(analyzer="char_wb", ngram_range=(1, 4))
            pipe.fit(data.texts("train"), data.y("train"))
            architecture = "tf-idf on character 1-4-grams + logistic regression"
            warnings.append(
                "the training texts have no word of 2 or more letters or digits: "
                "TF-IDF read character 1-4-grams instead of words"
            )
    seconds = time.perf_counter() - started
    predictor = SklearnPredictor(pipe, data.classes)
    proba = pipeline_proba(pipe, data.texts("test"), len(data.classes))
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipe, model_dir / "pipeline.joblib")
    (model_dir / "tailtune.json").write_text(json.dumps({"kind": "tfidf", "classes": data.classes}, indent=2))
    return Outcome(proba, seconds, predictor.params, predictor.params, {"architecture": architecture}, warnings)


def _run_probe(spec: SystemSpec, ctx: Context, model_dir: Path, work_dir: Path | None = None) -> Outcome:
    import joblib

    from tailtune.classifier import count_params
    from tailtune.train import resolve_precision

    result = ctx.probe(spec.slot, ("train", "val", "test"))
    probe = result["probe"]
    proba = probe.proba_from_features(result["features"]["test"])
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(probe.pipeline_, model_dir / "probe.joblib")
    (model_dir / "tailtune.json").write_text(
        json.dumps(
            {
                "kind": "probe",
                "classes": ctx.data.classes,
                "backbone": probe.backbone_.describe(),
                "pooling": probe.pooling_,
                "max_length": probe.backbone.max_length,
                "precision": resolve_precision("auto"),
            },
            indent=2,
        )
    )
    head = probe.W_.size + probe.b_.size
    if not hasattr(probe, "model_"):  # features came from the cache; count the backbone anyway
        probe.load_encoder(probe.backbone_)
    total = head + count_params(probe.model_.backbone)[1]
    return Outcome(
        proba,
        result["seconds"],
        head,
        total,
        {
            "architecture": probe.backbone_.model_type,
            "pooling": probe.pooling_,
            "precision": resolve_precision("auto"),
            "backbone_name": probe.backbone_.spec,
            "C": probe.C_,
            "val_macro_f1": probe.val_macro_f1_,
            "C_cv_macro_f1": {str(c): round(v, 4) for c, v in getattr(probe, "C_scores_", {}).items()},
        },
    )


def _run_finetune(spec: SystemSpec, ctx: Context, model_dir: Path, work_dir: Path | None = None) -> Outcome:
    from tailtune import methods

    cfg, data = ctx.cfg, ctx.data
    lr, scheme = spec.recipe(cfg)
    clf, head_init, start_val_f1, probe_val_f1 = prepare_finetune(spec, ctx, lr, scheme)
    method_cfg, bb_cfg = clf.method_config, clf.backbone
    if ctx.console is not None:
        ctx.console.print(
            f"  backbone {bb_cfg.name} ({ctx.backbone(spec.slot).model_type}), method {spec.method}, "
            f"weighting {scheme}, lr {clf.learning_rate():g}",
            markup=False,
        )
    clf.fit(
        data.texts("train"),
        data.split("train")["label"].tolist(),
        val_texts=data.texts("val"),
        val_labels=data.split("val")["label"].tolist(),
        classes=data.classes,
        head_init=head_init,
        start_val_f1=start_val_f1,
        backbone=ctx.backbone(spec.slot),
        console=ctx.console,
        work_dir=work_dir,
    )
    if ctx.console is not None:
        pct = 100 * clf.trainable_params_ / clf.total_params_
        from tailtune.backbones import describe_targets

        if clf.targets_:
            adapted = "all weights" if clf.targets_ == ["*"] else describe_targets(clf.targets_)
        else:  # prompt / prefix tuning add tokens, not modules
            adapted = "head only" if spec.method == "head" else f"{method_cfg.virtual_tokens} virtual tokens"
        ctx.console.print(
            f"  trainable {clf.trainable_params_:,} / {clf.total_params_:,} ({pct:.2f}%), "
            f"precision {clf.precision_}; adapted: {adapted}",
            markup=False,
        )
    texts = data.texts("test")
    with _bar(ctx.console, "  evaluating (test)", len(texts)) as advance:
        logits = clf.predict_logits(texts, progress=advance)
    clf.save(model_dir)
    warnings = _guards(clf, logits, model_dir, data, probe_val_f1)
    imb = clf.imbalance_
    for file, values in (
        ("class_weights.json", imb.class_weights),
        ("logit_offset.json", imb.logit_offset),
        ("class_sampling.json", imb.class_sampling),
    ):
        if values is not None:  # what the loss / sampler used, per class
            (model_dir / file).write_text(
                json.dumps(dict(zip(data.classes, map(float, values), strict=True)), indent=2)
            )
    from tailtune.classifier import softmax

    adapter_bytes = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file() and "tokenizer" not in f.parts)
    return Outcome(
        softmax(logits),
        clf.train_seconds_ + clf.history_.get("seconds_before_resume", 0.0),  # attempts before a resume count too
        clf.trainable_params_,
        clf.total_params_,
        {
            "architecture": clf.backbone_.model_type,
            "backbone_name": bb_cfg.name,
            "pooling": clf.pooling_,
            "precision": clf.precision_,
            "targets": clf.targets_,
            "adapter_bytes": adapter_bytes,
            "history": clf.history_,
            "probe_val_macro_f1": probe_val_f1,
            "lr": clf.learning_rate(),
            "mergeable": methods.get(spec.method).mergeable,
            "settings": dict(spec.overrides),
            "tuned": any(c.system == spec.name for c in cfg.tune.chosen),
        },
        warnings,
    )


def prepare_finetune(spec: SystemSpec, ctx: Context, lr: float | None, scheme: str):
    """(classifier, LP-FT head or None, its validation macro-F1, the probe's) of ``spec`` with ``lr``, ``scheme``."""
    from tailtune.classifier import TextClassifier, lpft_start

    cfg = ctx.cfg
    method_cfg, train_cfg, bb_cfg, _ = spec.configs(cfg)
    head_init = start_val_f1 = probe_val_f1 = None
    if cfg.train.head_init == "probe":
        result = ctx.probe(spec.slot)
        probe = result["probe"]
        probe_val_f1 = probe.val_macro_f1_
        counts = np.bincount(ctx.data.y("train"), minlength=len(ctx.data.classes))
        val = (result["features"]["val"], ctx.data.y("val"))
        head_init, start_val_f1 = lpft_start(probe, counts, scheme, cfg.train.logit_tau, val)
    clf = TextClassifier(bb_cfg, spec.method, method_cfg, train_cfg, weighting=scheme, lr=lr)
    return clf, head_init, start_val_f1, probe_val_f1


class GuardFailure(Exception):
    """A trained system is wrong in a way that makes its numbers meaningless."""


def check_coverage(pred: np.ndarray, classes: list, collapsed: str = "predicts one class") -> list[str]:
    """Test predictions ``pred`` (class indices) that name one class raise :class:`GuardFailure`
    ("collapsed: <collapsed> ..."); fewer than ``COVERAGE_WARNING`` of the classes give a warning."""
    n_pred = len(np.unique(pred))
    if n_pred == 1 and len(classes) > 1:
        raise GuardFailure(
            f"collapsed: {collapsed} ('{classes[pred[0]]}') for every test row; "
            "likely cause: learning rate too high or too few steps"
        )
    if n_pred / len(classes) < COVERAGE_WARNING:
        return [
            f"predicts only {n_pred} of {len(classes)} classes on test; "
            "likely cause: too few epochs for the tail, or try class weighting"
        ]
    return []


def _guards(clf, test_logits: np.ndarray, model_dir: Path, data, probe_val_f1) -> list[str]:
    """Post-training checks. Fatal ones raise :class:`GuardFailure`; others return warnings."""
    from tailtune.classifier import TextClassifier

    warnings = check_coverage(test_logits.argmax(axis=1), data.classes)
    losses = np.array([e["loss"] for e in clf.history_["losses"]])
    if len(losses) >= 4:
        # Batch losses are noisy, and with LP-FT they start low: compare quarter means.
        k = len(losses) // 4
        first, last = losses[:k].mean(), losses[-k:].mean()
        if not last < first:
            warnings.append(f"training loss did not decrease (first-quarter mean {first:.3f}, last {last:.3f})")
    best = clf.history_["best_val_macro_f1"]
    if probe_val_f1 is not None and clf.history_["best_step"] == 0:
        warnings.append(
            "fine-tuning never beat its LP-FT start on validation, so the kept model is the probe's "
            "head on the frozen backbone; likely cause: a learning rate so high that the start is lost, "
            "or so low (or so few steps) that nothing is learned"
        )
    elif probe_val_f1 is not None and best < probe_val_f1 - 1e-9:
        # The probe is class-balanced; a loss aiming at another prior can lose macro-F1 to it
        # while its accuracy rises (the LP-FT start is then below the probe already).
        cause = (
            f"its loss (weighting '{clf.weighting}') is not class-balanced like the probe's; "
            "try the -logit_adjusted or -inverse variant"
            if np.abs(clf.imbalance_.prior_shift(np.bincount(data.y("train"), minlength=len(data.classes)))).max()
            > 1e-6
            else "fine-tuning hurt"
        )
        warnings.append(f"val macro-F1 {best:.3f} below its own (class-balanced) probe's {probe_val_f1:.3f}: {cause}")
    # Reload from disk and compare: catches a head or adapter that was not saved (peft#310).
    texts = data.texts("val")[:16]
    reloaded = TextClassifier.load(model_dir)
    diff = np.abs(reloaded.predict_logits(texts) - clf.predict_logits(texts)).max()
    tol = 1e-3 if clf.precision_ == "fp32" else 5e-2
    if not diff <= tol:
        raise GuardFailure(f"reloaded model disagrees with the trained one (max logit diff {diff:.2e})")
    clf.history_["reload_max_logit_diff"] = float(diff)
    return warnings


def _run_generate(spec: SystemSpec, ctx: Context, model_dir: Path, work_dir: Path | None = None) -> Outcome:
    from tailtune.generate import run_system as run_generate

    return run_generate(spec, ctx, model_dir, work_dir)


RUNNERS = {"baseline": _run_tfidf, "probe": _run_probe, "finetune": _run_finetune, "generate": _run_generate}
