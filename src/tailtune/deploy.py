"""Deploy trained systems: load any system folder as a predictor, export merged weights, stream predictions.

- :func:`load_predictor` turns any system folder of a run (fine-tuned, ``tfidf-logreg``,
  probe) or a folder written by :func:`export_merged` into a :class:`Predictor` with
  ``classes_`` and ``predict_proba(texts) -> (N, C)``. LoRA adapters are merged into the base
  weights on load (``merged=False`` keeps them apart, for comparisons).
- :func:`export_merged` writes a fine-tuned system with its adapter merged in, either as an
  ordinary transformers folder (``format="hf"``: loads with
  ``AutoModelForSequenceClassification.from_pretrained`` and nothing from tailtune) or in
  tailtune's own layout (``format="tailtune"``: merged backbone + head, read by
  ``TextClassifier.load`` without peft). Every export is reloaded and its logits compared with
  the unmerged system before the folder appears.
- :func:`predict_file` classifies a CSV / JSONL / Parquet file of any size in constant
  memory and writes predictions in the input's order.

A stock transformers class is used only where it computes exactly what tailtune computes.
Decoders map onto ``<Family>ForSequenceClassification``, which pools the last token that is
not ``pad_token_id`` and applies a bias-free linear ``score``; tailtune pools the last real
token from the attention mask, and its decoder heads are bias-free too (heads saved before
that had a bias). The two agree when (1) the system pools "last", (2) the head has no bias
(or a zero one) and (3) no text ends in the pad token. Decoders pad
with eos when they have no pad token; transformers would then pool one token early on a
text that itself ends in eos. tailtune's tokenizers never append eos, and read "<|im_end|>"
typed in a text as characters (``split_special_tokens``, saved with the tokenizer, so the
export's tokenizer does the same); the export check includes texts that end in each special
token's string, so a system saved before that is refused rather than exported wrong. BERT-style heads
(tanh pooler) and ModernBERT's (dense + activation + LayerNorm before the classifier) have no
exact equivalent of a linear head on the pooled vector, so those exports are refused with
``format="tailtune"`` as the alternative.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from tailtune import rundir
from tailtune.errors import NoTokens, TailtuneError, first_line

# Largest |merged - unmerged| logit allowed on export, in fp32. Merging reorders float sums
# (W x + B A x s vs (W + B A s) x), which moves logits by ~1e-6 on real models.
MERGE_TOLERANCE = 1e-4
EXPORT_INFO = "tailtune_export.json"


# ----------------------------------------------------------------------------- predictors


class Predictor:
    """Anything that classifies texts. ``kind``: finetune | probe | tfidf | generate | export.

    ``predict_proba(texts)`` returns (N, C) probabilities, columns in ``classes_`` order.
    ``info`` describes the system (backbone, method, ...), ``params`` counts its parameters.
    """

    kind: str
    classes_: list[str]
    info: dict
    params: int

    def predict_proba(self, texts: list[str], progress: Callable | None = None) -> np.ndarray:
        raise NotImplementedError

    def predict(self, texts: list[str]) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(texts).argmax(axis=1)]


class TorchPredictor(Predictor):
    """A torch model run in length-sorted batches (``classifier.run_forward``).

    ``model`` returns logits (a tailtune ``PooledClassifier`` or a transformers
    ``...ForSequenceClassification``); with ``head`` (a scikit-learn pipeline, for probes) the
    pooled features go through the head instead.
    """

    def __init__(
        self,
        model,
        tokenizer,
        classes,
        *,
        kind,
        max_length,
        batch_size,
        precision,
        head=None,
        info=None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.classes_ = list(classes)
        self.kind = kind
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision
        self.head = head
        self.info = info or {}

    @property
    def params(self) -> int:
        from tailtune.classifier import count_params

        head = 0 if self.head is None else self.head[-1].coef_.size + self.head[-1].intercept_.size
        return count_params(self.model)[1] + head

    def logits(self, texts: list[str], progress: Callable | None = None) -> np.ndarray:
        """(N, C) logits in input order."""
        from tailtune.classifier import run_forward, tokenize

        ids = tokenize(self.tokenizer, texts, self.max_length)
        return run_forward(self.model, self.tokenizer, ids, self.batch_size, self.precision, "logits", progress)

    def predict_proba(self, texts: list[str], progress: Callable | None = None) -> np.ndarray:
        from tailtune.classifier import run_forward, single_threaded_blas, softmax, tokenize

        if self.head is None:
            return softmax(self.logits(texts, progress))
        ids = tokenize(self.tokenizer, texts, self.max_length)
        features = run_forward(self.model, self.tokenizer, ids, self.batch_size, self.precision, "features", progress)
        # The head's BLAS on one thread, next to torch's threads: left multi-threaded (likely
        # oversubscribing the cores), a probe ran 1.24x slower than the same encoder with a
        # LoRA head (8.66 vs 6.92 ms/example, batch 32; 7.01 with this).
        with single_threaded_blas():
            return pipeline_proba(self.head, features, len(self.classes_))


class SklearnPredictor(Predictor):
    """A scikit-learn text pipeline (the TF-IDF baseline)."""

    def __init__(self, pipeline, classes, info=None):
        self.pipeline = pipeline
        self.classes_ = list(classes)
        self.kind = "tfidf"
        self.info = info or {}

    @property
    def params(self) -> int:
        return self.pipeline[-1].coef_.size + self.pipeline[-1].intercept_.size

    def predict_proba(self, texts: list[str], progress: Callable | None = None) -> np.ndarray:
        from tailtune.backbones import check_encodable, check_readable

        check_readable(texts)  # as the tokenizers' systems check: an empty text gets no label
        check_encodable(texts)  # ... and a lone surrogate is not text
        proba = pipeline_proba(self.pipeline, texts, len(self.classes_))
        if progress is not None:
            progress(len(texts))
        return proba


def pipeline_proba(pipeline, inputs, n_classes: int) -> np.ndarray:
    """(N, n_classes) probabilities of a scikit-learn pipeline fitted on class indices: the
    pipeline only knows the classes it saw in training (its ``classes_``); the others get 0."""
    proba = np.zeros((len(inputs), n_classes))
    if len(inputs):  # scikit-learn refuses 0 rows
        proba[:, pipeline[-1].classes_] = pipeline.predict_proba(inputs)
    return proba


def load_meta(folder: Path) -> dict:
    """The ``tailtune.json`` of a model folder (one line when it is damaged)."""
    from tailtune.classifier import read_meta

    return read_meta(folder)


def resolve_system(path: str | Path) -> tuple[str, Path]:
    """(kind, folder holding the model files) for ``<run>/systems/<name>``, its ``model/`` or an export."""
    path = Path(path)
    if not path.exists():
        failed = path.parent / f".{path.name}.failed" / "reason.txt"
        if failed.is_file():  # the run tried it: say why there is no model
            reason = failed.read_text(encoding="utf-8").strip().splitlines()
            raise TailtuneError(
                f"{path.name} failed in this run, so it has no model: {reason[0] if reason else 'no reason recorded'} "
                f"(see {failed})"
            )
        if (path.parent / f".{path.name}.partial").is_dir():
            raise TailtuneError(
                f"{path.name} is still being trained, or its training was interrupted: "
                "no model yet (the run's command finishes it)"
            )
        raise TailtuneError(f"system folder not found: {path}")
    for folder in (path / "model", path):
        meta = folder / "tailtune.json"
        if meta.is_file():
            return load_meta(folder).get("kind", "finetune"), folder
    if (path / EXPORT_INFO).is_file() and (path / "config.json").is_file():
        return "export", path
    finished = sorted(p.name for p in (path / "systems").glob("*") if (p / "model" / "tailtune.json").is_file())
    if finished:  # a run directory: name what to pass instead
        raise TailtuneError(
            f"{path} is a run directory; pass one of its systems, e.g. {path / 'systems' / finished[0]} "
            f"({', '.join(finished)})"
        )
    raise TailtuneError(
        f"{path} is not a tailtune system folder (expected <run>/systems/<name>, its model/ "
        "folder, or a folder written by tailtune export)"
    )


def load_predictor(
    path: str | Path,
    *,
    merged: bool = True,
    precision: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
) -> Predictor:
    """Load any system folder as a :class:`Predictor`.

    ``merged`` folds LoRA adapters into the base weights (no added latency); ``precision``
    is auto | fp32 | bf16 | fp16 (auto: bf16 only where the device computes it natively);
    ``device`` is auto | cpu | cuda; ``batch_size`` defaults to the system's eval batch size.
    """
    from tailtune.classifier import damaged_model
    from tailtune.config import check_precision

    check_precision(precision)  # for every kind, also those that ignore it
    kind, folder = resolve_system(path)
    if kind not in LOADERS:
        raise TailtuneError(f"{folder} holds a system of unknown kind '{kind}'")
    device = pick_device(device)
    with damaged_model(folder):
        return LOADERS[kind](folder, merged=merged, precision=precision, device=device, batch_size=batch_size)


def finished_systems(run_dir: str | Path, only: list[str] | None = None) -> list[str]:
    """Names of the run's systems with status ok, in comparison order (``only``: a subset)."""

    from tailtune.run import check_finished_run, read_comparison

    run_dir = Path(run_dir)
    check_finished_run(run_dir)
    comparison = read_comparison(run_dir)
    names = comparison.loc[comparison["status"] == "ok", "system"].tolist()
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise TailtuneError(
                f"no finished system named {', '.join(unknown)} in {run_dir} (finished: {', '.join(names)})"
            )
        names = [n for n in names if n in only]
    if not names:
        raise TailtuneError(f"{run_dir} has no system with status ok")
    return names


def pick_device(device: str):
    """torch.device for auto | cpu | cuda (auto: CUDA when there is one)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise TailtuneError(f"device must be auto, cpu or cuda, got '{device}'")
    if device != "cpu" and not torch.cuda.is_available():
        raise TailtuneError(f"device '{device}' asked for, but this machine has no CUDA GPU (use cpu or auto)")
    return torch.device(device)


def pick_precision(precision: str, device) -> str:
    """fp32 | bf16 | fp16 for ``precision`` on ``device``; auto = what the device does natively."""
    from tailtune.train import cpu_has_fast_bf16, resolve_precision

    if precision == "auto" and device.type == "cpu":  # a CUDA machine may still run on its CPU
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return resolve_precision(precision)


def merge_backbone(backbone):
    """The backbone with its LoRA adapter folded into the base weights (peft ``merge_and_unload``)."""
    return backbone.merge_and_unload() if hasattr(backbone, "merge_and_unload") else backbone


def _load_finetuned(folder: Path, *, merged, precision, device, batch_size) -> Predictor:
    from tailtune import methods
    from tailtune.classifier import TextClassifier

    clf = TextClassifier.load(folder)
    model = clf.model_
    if merged and methods.get(clf.method).mergeable:
        model.backbone = merge_backbone(model.backbone)
    meta = load_meta(folder)
    info = {"backbone": clf.backbone.name, "method": meta.get("merged_from", clf.method)}
    return TorchPredictor(
        model.to(device),
        clf.tokenizer_,
        clf.classes_,
        kind="finetune",
        max_length=clf.backbone.max_length,
        batch_size=batch_size or clf.backbone.eval_batch_size,
        precision=pick_precision(precision, device),
        info=info,
    )


def _load_probe(folder: Path, *, merged, precision, device, batch_size) -> Predictor:
    import joblib

    from tailtune import backbones
    from tailtune.classifier import ProbeClassifier
    from tailtune.config import BackboneConfig

    meta = load_meta(folder)
    bb = meta["backbone"]
    backbone = backbones.Backbone.from_saved(bb, meta["pooling"])
    probe = ProbeClassifier(BackboneConfig(name=bb["spec"], pooling=meta["pooling"], max_length=meta["max_length"]))
    probe.load_encoder(backbone)
    info = {"backbone": bb["spec"], "method": "probe"}
    return TorchPredictor(
        probe.model_.to(device),
        probe.tokenizer_,
        meta["classes"],
        kind="probe",
        max_length=meta["max_length"],
        batch_size=batch_size or probe.backbone.eval_batch_size,
        precision=pick_precision(precision, device),
        head=joblib.load(folder / "probe.joblib"),
        info=info,
    )


def _load_tfidf(folder: Path, **_) -> Predictor:
    import joblib

    meta = load_meta(folder)
    info = {"backbone": None, "method": "logreg"}
    return SklearnPredictor(joblib.load(folder / "pipeline.joblib"), meta["classes"], info)


def _load_export(folder: Path, *, merged, precision, device, batch_size) -> Predictor:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tailtune.backbones import quiet_transformers

    quiet_transformers()
    meta = rundir.read_json_or_fail(folder / EXPORT_INFO, "the export is damaged; export it again")
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    info = {"backbone": meta["backbone"], "method": meta["method"]}
    return TorchPredictor(
        model.to(device),
        tokenizer,
        classes,
        kind="export",
        max_length=meta["max_length"],
        batch_size=batch_size or 64,
        precision=pick_precision(precision, device),
        info=info,
    )


def _load_generate(folder: Path, **kwargs) -> Predictor:
    from tailtune.generate import load_predictor

    return load_predictor(folder, **kwargs)


LOADERS: dict[str, Callable[..., Predictor]] = {
    "finetune": _load_finetuned,
    "probe": _load_probe,
    "tfidf": _load_tfidf,
    "export": _load_export,
    "generate": _load_generate,
}


def quantize_int8(predictor: TorchPredictor) -> TorchPredictor:
    """A CPU copy of ``predictor`` with the backbone's ``nn.Linear`` layers dynamically quantised to int8.

    The head stays fp32: it is small, and tailtune's forward reads its weight dtype.
    """
    import copy
    import warnings

    import torch

    if hasattr(predictor, "quantized"):  # not a TorchPredictor (decoder-generate): it knows its own model
        return predictor.quantized()
    model = copy.deepcopy(predictor.model).cpu()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency.
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(
            getattr(model, "backbone", model), {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )
    return TorchPredictor(
        model,
        predictor.tokenizer,
        predictor.classes_,
        kind=predictor.kind,
        max_length=predictor.max_length,
        batch_size=predictor.batch_size,
        precision="fp32",
        head=predictor.head,
        info=predictor.info,
    )


# ----------------------------------------------------------------------------- export

# Why a family's stock ...ForSequenceClassification cannot hold a linear head on tailtune's
# pooled vector exactly (decoders can: see the module docstring).
NO_STOCK_HEAD = {
    "bert": "BertForSequenceClassification classifies tanh(dense(CLS)) from its pooler, not the "
    "{pooling}-pooled hidden state that this head reads",
    "roberta": "RobertaForSequenceClassification classifies dense + tanh of the first token, not the "
    "{pooling}-pooled hidden state that this head reads",
    "modernbert": "ModernBertForSequenceClassification puts dense + activation + LayerNorm between the "
    "pooled vector and the classifier, and the LayerNorm's input-dependent scaling has no exact identity",
}
NO_STOCK_HEAD["xlm-roberta"] = NO_STOCK_HEAD["roberta"]


def hf_classifier(clf):
    """The stock transformers classifier equal to ``clf`` (merged in place), and the bias it cannot hold.

    Returns ``(model, bias)``: ``model`` is a ``<Family>ForSequenceClassification`` with the
    merged backbone and the head's weight; ``bias`` (C,) is what the bias-free stock ``score``
    leaves out (the logits differ by exactly it). Raises :class:`TailtuneError` where no stock
    class pools the way ``clf`` does.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    backbone = clf.backbone_
    if not backbone.is_decoder:
        reason = NO_STOCK_HEAD.get(
            backbone.model_type,
            f"no stock {backbone.model_type} sequence classifier is known to pool like tailtune",
        )
        raise TailtuneError(f"{reason.format(pooling=clf.pooling_)}; use --format tailtune")
    if clf.pooling_ != "last":
        raise TailtuneError(
            f"stock {backbone.model_type} sequence classifiers pool the last token, but this system "
            f"pools with '{clf.pooling_}'; use --format tailtune, or train it with decoder.pooling=last"
        )
    tokenizer = clf.tokenizer_
    config = AutoConfig.from_pretrained(backbone.path)
    config.num_labels = len(clf.classes_)
    config.id2label = dict(enumerate(clf.classes_))
    config.label2id = {c: i for i, c in enumerate(clf.classes_)}
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = None
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    clf.model_.backbone = merge_backbone(clf.model_.backbone)
    head = clf.model_.score
    with torch.no_grad():
        getattr(model, model.base_model_prefix).load_state_dict(clf.model_.backbone.state_dict())
        model.score.weight.copy_(head.weight)
    bias = np.zeros(len(clf.classes_)) if head.bias is None else head.bias.detach().cpu().numpy()
    return model.eval(), bias


def save_hf(model, clf, out: Path) -> None:
    """Save stock ``model`` (from :func:`hf_classifier`) with ``clf``'s tokenizer, set up as tailtune runs it."""
    model.save_pretrained(out)
    tokenizer = clf.tokenizer_
    tokenizer.model_max_length = clf.backbone.max_length  # so truncation=True cuts where tailtune does
    tokenizer.save_pretrained(out)
    # save_pretrained keeps the padding side the tokenizer was created with, not the one set later.
    config_file = out / "tokenizer_config.json"
    saved = json.loads(config_file.read_text())
    saved["padding_side"] = tokenizer.padding_side
    config_file.write_text(json.dumps(saved, indent=2))


def _write_hf(clf, out: Path, tolerance: float) -> dict:
    model, bias = hf_classifier(clf)
    if np.abs(bias).max() > tolerance:
        raise TailtuneError(
            f"the stock {type(model).__name__} has no bias in its score layer, and this head's "
            f"per-class bias (max |b| {np.abs(bias).max():.3g}) cannot be folded into the weights "
            "exactly; use --format tailtune"
        )
    save_hf(model, clf, out)
    tokenizer = clf.tokenizer_
    return {
        "class": type(model).__name__,
        "pad_token_id": tokenizer.pad_token_id,
        "pad_is_eos": tokenizer.pad_token_id == tokenizer.eos_token_id,
    }


def _write_tailtune(clf, out: Path, tolerance: float) -> dict:
    # Saved as a "full" system: TextClassifier.load reads the merged backbone from backbone/.
    merged_from = clf.method
    clf.model_.backbone = merge_backbone(clf.model_.backbone)
    clf.method = "full"
    clf.save(out)
    meta = load_meta(out)
    meta["merged_from"] = merged_from
    (out / "tailtune.json").write_text(json.dumps(meta, indent=2))
    return {"class": "tailtune TextClassifier (method full)"}


EXPORT_FORMATS: dict[str, Callable] = {"hf": _write_hf, "tailtune": _write_tailtune}


def export_check_texts() -> list[str]:
    """Texts for export checks: complaint-like, of varied lengths, one beyond any max_length."""
    from tailtune.demo import make_demo_corpus

    texts = make_demo_corpus(n_classes=6, max_count=3, min_count=2, seed=11)["Consumer complaint narrative"].tolist()
    return [*texts[:14], "refund", " ".join(texts) * 4]


def _reloaded_logits(fmt: str, folder: Path, texts: list[str]) -> np.ndarray:
    """Logits of the exported folder, loaded the way its users will load it."""
    import torch

    if fmt == "hf":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            return model(**batch).logits.float().numpy()
    from tailtune.classifier import TextClassifier

    clf = TextClassifier.load(folder)
    clf.precision_ = "fp32"
    return clf.predict_logits(texts)


def export_merged(
    system_dir: str | Path,
    outdir: str | Path,
    *,
    fmt: str = "hf",
    tolerance: float = MERGE_TOLERANCE,
    texts: list[str] | None = None,
) -> dict:
    """Write fine-tuned ``system_dir`` with its adapter merged into ``outdir``; return the record.

    The export is reloaded from disk and its fp32 logits compared with the unmerged system on
    ``texts`` (default :func:`export_check_texts`); above ``tolerance`` nothing is written. The record,
    with the measured ``max_abs_logit_diff``, is saved as ``<outdir>/tailtune_export.json``.
    """
    from tailtune import methods
    from tailtune.backbones import quiet_transformers
    from tailtune.classifier import TextClassifier

    if fmt not in EXPORT_FORMATS:
        raise TailtuneError(f"unknown export format '{fmt}' (formats: {', '.join(EXPORT_FORMATS)})")
    if not 0 <= tolerance < np.inf:
        raise TailtuneError(f"--tolerance must be a finite number, 0 or more, got {tolerance:g}")
    kind, folder = resolve_system(system_dir)
    if kind != "finetune":
        raise TailtuneError(
            f"{system_dir} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} system: there is no adapter to merge; "
            "use tailtune predict on it directly"
        )
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise TailtuneError(f"--merged {outdir} is a file; name a new or empty folder")
    if outdir.exists() and any(outdir.iterdir()):
        raise TailtuneError(f"export folder {outdir} already exists and is not empty")
    check_parent_writable(outdir, "--merged")
    quiet_transformers()
    clf = TextClassifier.load(folder)
    if not methods.get(clf.method).mergeable:
        raise TailtuneError(
            f"method '{clf.method}' cannot be merged into the base weights; serve the system as it is "
            "(tailtune predict / serve)"
        )
    # texts typed to end in a control token: a stock decoder class skips a final pad (= eos) token
    texts = texts or [*export_check_texts(), *(f"refund {t}" for t in clf.tokenizer_.all_special_tokens)]
    clf.precision_ = "fp32"
    reference = clf.predict_logits(texts)  # (N, C) unmerged
    source_method = clf.method
    outdir.parent.mkdir(parents=True, exist_ok=True)
    rundir.remove_stale(outdir)
    tmp = rundir.temp_dir(outdir)
    try:
        written = EXPORT_FORMATS[fmt](clf, tmp, tolerance)
        diff = float(np.abs(_reloaded_logits(fmt, tmp, texts) - reference).max())
        if not diff <= tolerance:
            raise TailtuneError(
                f"merged export disagrees with the unmerged system: max |logit diff| {diff:.2e} > tolerance {tolerance:g}"
            )
        record = {
            "format": fmt,
            "source": str(Path(system_dir).resolve()),
            "method": source_method,
            "backbone": clf.backbone.name,
            "model_type": clf.backbone_.model_type,
            "is_decoder": clf.backbone_.is_decoder,
            "pooling": clf.pooling_,
            "max_length": clf.backbone.max_length,
            "classes": len(clf.classes_),
            **written,
            "check": {
                "texts": len(texts),
                "precision": "fp32",
                "tolerance": tolerance,
                "max_abs_logit_diff": diff,
            },
        }
        rundir.write_json(tmp / EXPORT_INFO, record)
        if outdir.exists():
            outdir.rmdir()  # empty, as checked above; a file that appeared since is not deleted
        rundir.replace_dir(tmp, outdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


# ----------------------------------------------------------------------------- streaming predict

ENCODING_HINT = ("--encoding", "--encoding cp1252")


def open_table(
    path: Path, chunk_size: int, encoding: str = "utf-8", quoting: int | None = None
) -> tuple[Iterator, int]:
    """(iterator of (frame, progress position), progress total) for a data file.

    ``encoding`` applies to CSV, TSV and JSON lines; a TSV is read with ``quoting``, by default
    what :func:`tailtune.data.tsv_quoting` decides (a caller that also needs it passes it in).

    Positions are bytes read for text files and rows for Parquet and JSON, so the bar has a total
    without a pass over the file. A JSON file (one array or object) cannot be read in pieces:
    it is read whole, then handed out ``chunk_size`` rows at a time.
    """
    from tailtune.data import (
        check_no_implicit_index,
        decode_error,
        file_kind,
        jsonl_frames,
        read_json,
        text_codec,
        tsv_quoting,
    )

    codec = text_codec(encoding, ENCODING_HINT[0])
    kind = file_kind(path, "input")
    if kind == "json":
        try:
            whole = read_json(path, codec)
        except UnicodeDecodeError:
            raise decode_error(path, codec, ENCODING_HINT) from None
        except ValueError as exc:  # json.JSONDecodeError is one
            raise TailtuneError(f"could not read {path} as json: {first_line(exc)}") from None

        def pieces():
            for start in range(0, len(whole), chunk_size):
                piece = whole.iloc[start : start + chunk_size].reset_index(drop=True)
                yield piece, start + len(piece)

        return pieces(), len(whole)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own error types for a corrupt file
            raise TailtuneError(f"could not read {path} as parquet: {first_line(exc)}") from None

        def batches():
            done = 0
            for batch in parquet.iter_batches(batch_size=chunk_size):
                done += batch.num_rows
                # integer_object_nulls: a nullable int64 id stays an int (to_pandas makes it float64)
                yield batch.to_pandas(integer_object_nulls=True), done

        return batches(), parquet.metadata.num_rows

    import csv

    import pandas as pd

    if quoting is None:
        quoting = tsv_quoting(path, codec, ENCODING_HINT) if kind == "tsv" else csv.QUOTE_MINIMAL
    raw = open(path, "rb")  # noqa: SIM115 - closed when the iterator finishes
    text = io.TextIOWrapper(raw, encoding=codec, newline="")

    def frames():
        try:  # read_csv decodes the header when it is created: inside the try too
            if kind == "jsonl":
                reader = jsonl_frames(text, chunk_size)
            else:
                reader = pd.read_csv(
                    text,
                    sep="\t" if kind == "tsv" else ",",
                    dtype=str,  # ids and texts exactly as written
                    keep_default_na=False,
                    chunksize=chunk_size,
                    quoting=quoting,
                )
            for frame in reader:
                if kind != "jsonl":
                    check_no_implicit_index(frame, path)
                yield frame, raw.tell()
        except UnicodeDecodeError:
            raise decode_error(path, codec, ENCODING_HINT) from None
        except (ValueError, pd.errors.ParserError) as exc:
            raise TailtuneError(f"could not read {path} as {kind}: {first_line(exc)}") from None
        finally:
            raw.close()

    return frames(), path.stat().st_size


class _Sink:
    """Appends prediction frames to an open binary file as CSV, JSON lines or Parquet."""

    KINDS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}

    def __init__(self, f, kind: str):
        self.f, self.kind, self.first, self.writer = f, kind, True, None

    def write(self, frame) -> None:
        if self.kind == "csv":
            self.f.write(frame.to_csv(index=False, header=self.first).encode("utf-8"))
        elif self.kind == "jsonl":
            self.f.write(
                frame.to_json(orient="records", lines=True, force_ascii=False).rstrip("\n").encode("utf-8") + b"\n"
            )
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.f, table.schema)
            self.writer.write_table(table.cast(self.writer.schema))
        self.first = False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pick_column(columns, requested: str | None, defaults: tuple[str, ...], role: str) -> str | None:
    """``requested`` (which must exist), else the first of ``defaults`` present; text is required."""
    import pandas as pd

    from tailtune.data import require_column

    if requested is not None:
        require_column(pd.DataFrame(columns=columns), requested, role)
        return requested
    found = [c for c in defaults if c in columns]
    if found:
        return found[0]
    if role == "text":
        require_column(pd.DataFrame(columns=columns), defaults[0], role)
    return None


def prediction_frame(
    predictor: Predictor,
    frame,
    text_col: str,
    id_col: str | None,
    k: int = 1,
    progress: Callable | None = None,
):
    """The output rows of ``predict`` for one input ``frame``, in its order.

    Columns: ``id_col`` (as strings, when given), ``label``, ``confidence`` and, for ``k`` > 1,
    ``label_2, confidence_2, ...``; confidences are rounded to 6 decimals. Rows with an empty
    text, or one that has no tokens for the model's tokenizer, get an empty label and no
    confidence. ``progress(rows)`` is called as rows finish.
    """
    import pandas as pd

    from tailtune.classifier import top_k
    from tailtune.data import blank, string_column

    # JSON lines need not share keys: a chunk may lack the text or id column the first one had
    missing = pd.Series(pd.NA, index=frame.index, dtype="string")
    texts = string_column(frame, text_col, "text").fillna("") if text_col in frame.columns else missing.fillna("")
    real = ~blank(texts)
    labels = np.full((len(frame), k), "", dtype=object)
    conf = np.full((len(frame), k), np.nan)
    if real.any():
        try:
            proba = predictor.predict_proba(texts[real].tolist(), progress=progress)
        except NoTokens as exc:  # a text the tokenizer reads as nothing: unlabelled, like an empty one
            real[np.flatnonzero(real)[exc.rows]] = False
            proba = predictor.predict_proba(texts[real].tolist(), progress=progress) if real.any() else None
        if proba is not None:
            labels[real], conf[real] = top_k(proba, predictor.classes_, k)
    if progress is not None and not real.all():
        progress(int((~real).sum()))
    out = pd.DataFrame(index=range(len(frame)))
    if id_col is not None:
        # a string column even when a chunk has no id at all: an all-missing object column became
        # Parquet's null type, which the next chunk's (or Ray part's) strings could not join
        out[id_col] = (string_column(frame, id_col, "id") if id_col in frame.columns else missing).array
    for i in range(k):
        suffix = "" if i == 0 else f"_{i + 1}"
        out[f"label{suffix}"] = labels[:, i]
        out[f"confidence{suffix}"] = conf[:, i].round(6)
    return out


def check_output_file(path: Path, *, overwrite: bool, flag: str = "--output") -> None:
    """Before any work: ``path`` names a file that can be written, and is not one already there
    (unless ``overwrite``); a folder, a folder that is a file, or one without write permission
    is refused here, not after every row has been predicted."""
    if path.is_dir():
        raise TailtuneError(f"{flag} {path} is a folder; name a file")
    if path.exists() and not overwrite:
        raise TailtuneError(f"{flag} {path} already exists; pass --overwrite to replace it")
    check_parent_writable(path, flag)


def check_parent_writable(path: Path, flag: str) -> None:
    """Before any work: ``path``'s folder can be made and written in (the missing folders are
    made when the result is renamed into place); one of them being a file is refused here."""
    base, problem = rundir.write_problem(path.parent)
    if problem == "is a file":
        raise TailtuneError(f"{flag} {path}: {base} is a file, not a folder")
    if problem is not None:
        raise TailtuneError(f"{flag} {path}: cannot write in {base} ({problem})")


def input_columns(
    path: Path, first, text_column: str | None, id_column: str | None, encoding: str, scan: bool
) -> tuple[list[str], str, str | None]:
    """(columns, text column, id column or None) of the input file ``path`` whose first chunk is
    the frame ``first`` (None or no rows: an error). The text and id columns are the ones named,
    else the defaults (:func:`pick_column`). JSON lines need not share keys: with ``scan`` every
    line is read for them, not the first chunk's alone."""
    from tailtune.config import DataConfig
    from tailtune.data import READERS

    if first is None or len(first) == 0:
        raise TailtuneError(f"input file has no rows: {path}")
    columns = [str(c) for c in first.columns]
    if scan and READERS.get(path.suffix.lower()) == "jsonl":
        columns = jsonl_keys(path, encoding)
    defaults = DataConfig()
    text_col = pick_column(columns, text_column, (defaults.text_column, "text"), "text")
    id_col = pick_column(columns, id_column, (defaults.id_column, "id"), "id")
    return columns, text_col, id_col


def check_top_k(k: int, n_classes: int) -> None:
    if k > n_classes:
        raise TailtuneError(f"--top-k {k} is more than the system's {n_classes} classes")


def predict_file(
    system_dir: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    text_column: str | None = None,
    id_column: str | None = None,
    k: int = 1,
    chunk_size: int = 4096,
    batch_size: int | None = None,
    precision: str = "auto",
    console=None,
    label_column: str | None = None,
    encoding: str = "utf-8",
    overwrite: bool | None = None,
) -> dict:
    """Classify every row of ``input_path`` with the system in ``system_dir``; write ``output_path``.

    ``encoding`` is the input's text encoding (CSV, TSV, JSON lines). An existing
    ``output_path`` is refused unless ``overwrite``.

    ``precision`` (auto | fp32 | bf16 | fp16) as in :func:`load_predictor`: auto is bf16 where the
    device computes it natively, which can flip a near-tie against the run's fp32 predictions.

    With ``label_column`` (true labels in the input), the label set is checked against the
    model's before anything is predicted: when no label of the first chunk is one the model
    knows, it is an error (wrong column or wrong model). The result then also holds
    ``unknown_labels`` {label: rows} over the whole file and ``accuracy`` on rows whose label
    the model knows.

    Reads ``chunk_size`` rows at a time, so memory does not grow with the file. Output rows
    follow the input's order: the id column (when the input has one), ``label``,
    ``confidence`` and, for ``k`` > 1, ``label_2, confidence_2, ...``. Rows with an empty text,
    or one the tokenizer reads as no token, get an empty label and no confidence. The output
    (.csv, .jsonl or .parquet) appears only when complete. Returns {"rows", "unlabelled",
    "seconds", "output", "text_column", "id_column"}.
    """
    from tailtune.data import label_series
    from tailtune.rundir import atomic_write

    input_path, output_path = Path(input_path), Path(output_path)
    resolve_system(system_dir)  # a bad folder fails before any data is read
    if output_path.exists() and input_path.exists() and output_path.samefile(input_path):
        raise TailtuneError(f"--output is the input file {input_path}; write the predictions elsewhere")
    out_kind = _Sink.KINDS.get(output_path.suffix.lower())
    if out_kind is None:
        raise TailtuneError(f"output must end in {', '.join(_Sink.KINDS)}: {output_path}")
    for flag, value in (("--chunk-size", chunk_size), ("--top-k", k), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise TailtuneError(f"{flag} must be at least 1, got {value}")
    check_output_file(output_path, overwrite=bool(overwrite))
    frames, total = open_table(input_path, chunk_size, encoding)
    first = next(frames, None)
    columns, text_col, id_col = input_columns(
        input_path,
        first and first[0],
        text_column,
        id_column,
        encoding,
        scan=text_column is None or id_column is None or label_column is not None,
    )

    def truth_of(frame):
        # a chunk of JSON lines without the label key has no labels (it was "column not found",
        # after the chunks before it had been predicted)
        frame = frame.reindex(columns=[*frame.columns, *(c for c in columns if c not in frame.columns)])
        return label_series(frame, label_column).fillna("").str.strip()

    if label_column is not None:
        truth_of(first[0])  # names a missing column before the model loads
    predictor = load_predictor(system_dir, batch_size=batch_size, precision=precision)
    known = set(predictor.classes_)
    if label_column is not None:
        _check_label_set(truth_of(first[0]), known, label_column)
    unknown: dict[str, int] = {}
    scored = [0, 0]  # rows with a known label, correct predictions among them
    check_top_k(k, len(predictor.classes_))
    started = time.perf_counter()
    rows = unlabelled = 0

    def write(f) -> None:
        nonlocal rows, unlabelled
        sink = _Sink(f, out_kind)
        with _progress(console, total) as advance:
            position = 0
            for frame, new_position in itertools.chain([first], frames):
                step = (new_position - position) / max(len(frame), 1)
                out = prediction_frame(
                    predictor,
                    frame,
                    text_col,
                    id_col,
                    k,
                    progress=lambda n, step=step: advance(n * step, n),
                )
                if label_column is not None:
                    real = out["confidence"].notna().to_numpy()  # rows with a text
                    truth = truth_of(frame).to_numpy()
                    seen = np.array([t in known for t in truth], dtype=bool)
                    for t in truth[~seen & (truth != "")]:
                        unknown[t] = unknown.get(t, 0) + 1
                    scored[0] += int((seen & real).sum())
                    scored[1] += int(((out["label"].to_numpy() == truth) & seen & real).sum())
                sink.write(out)
                position = new_position
                rows += len(frame)
                unlabelled += int(out["confidence"].isna().sum())
        sink.close()

    rundir.remove_stale(output_path)
    atomic_write(output_path, write, binary=True)
    result = {
        "rows": rows,
        "unlabelled": unlabelled,
        "seconds": time.perf_counter() - started,
        "output": str(output_path),
        "text_column": text_col,
        "id_column": id_col,
    }
    if label_column is not None:
        result["unknown_labels"] = dict(sorted(unknown.items(), key=lambda kv: -kv[1]))
        result["accuracy"] = scored[1] / scored[0] if scored[0] else None
    return result


def jsonl_keys(path: Path, encoding: str) -> list[str]:
    """Every key of a JSON lines file, in order of first appearance.

    Its lines need not share keys, so the id (or text) column is looked for in all of them, not
    in the first chunk: ids that first appear after it were left out of the output. A pass
    that only parses is a small cost next to predicting the same rows.
    """
    frames, _ = open_table(path, 65536, encoding)
    return list(dict.fromkeys(str(c) for frame, _ in frames for c in frame.columns))


def _check_label_set(labels, known: set[str], column: str) -> None:
    """Pre-flight: the input's labels must overlap the model's, or the column/model is wrong."""
    present = set(labels) - {""}
    if present and not present & known:
        example = ", ".join(repr(x) for x in sorted(present)[:3])
        raise TailtuneError(
            f"none of the labels in column '{column}' (e.g. {example}) is a class of this model "
            f"({len(known)} classes, e.g. {sorted(known)[0]!r}); wrong --label-column or wrong model?"
        )


class _progress:
    """``with _progress(console, total) as advance: advance(units, rows)``; silent without a console."""

    def __init__(self, console, total: float):
        self.console, self.total = console, total

    def __enter__(self):
        if self.console is None:
            return lambda units, rows: None
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("predicting"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rows]:,} rows"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.bar.start()
        self.task = self.bar.add_task("predicting", total=self.total, rows=0)

        def advance(units: float, rows: int) -> None:
            done = self.bar.tasks[0].fields["rows"] + rows
            self.bar.update(self.task, advance=units, rows=done)

        return advance

    def __exit__(self, *exc):
        if self.console is not None:
            if exc[0] is None:
                self.bar.update(self.task, completed=self.total)
            self.bar.stop()
