"""Text classifiers with a scikit-learn face: ``fit`` / ``predict`` / ``predict_proba`` / ``save`` / ``load``.

:class:`PooledClassifier` is the torch module: backbone -> pooling -> linear head ``score``.
Pooling reads positions from the attention mask, never from token ids, so it is right for
left or right padding and when the pad token equals the eos token (transformers#35909,
#35352). :class:`TextClassifier` wraps it with a tokenizer, a method and a training recipe;
:class:`ProbeClassifier` is the frozen-feature baseline (balanced logistic regression).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from tailtune import backbones, methods, rundir
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig
from tailtune.errors import TailtuneError, first_line

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- pooling


def _mean(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)


def _cls(hidden, mask):
    import torch

    first = mask.int().argmax(dim=1)  # (B,) first real token: 0 unless padded on the left
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def _last(hidden, mask):
    import torch

    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.int() * positions).argmax(dim=1)  # (B,) index of the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLERS: dict[str, Callable] = {"mean": _mean, "cls": _cls, "last": _last}


def _module():
    import torch
    from torch import nn

    class PooledClassifier(nn.Module):
        """backbone -> pool(hidden, mask) -> ``score`` (linear; no bias on decoders). Returns {"loss", "logits"}."""

        def __init__(
            self,
            backbone,
            n_classes: int,
            pooling: str,
            is_decoder: bool,
            class_weights=None,
            logit_offset=None,
            bias: bool | None = None,
        ):
            super().__init__()
            self.backbone = backbone
            self.pooling = pooling
            self.is_decoder = is_decoder
            # Decoder heads have no bias, like transformers' <Family>ForSequenceClassification
            # ``score``, so a merged decoder exports to the stock class exactly.
            self.score = nn.Linear(
                backbone.config.hidden_size, n_classes, bias=not is_decoder if bias is None else bias
            )
            # Training-only: loss weights, and the logit-adjustment offset the loss adds (the
            # returned logits never include it, so prediction uses the balanced logits).
            for name, value in (("class_weights", class_weights), ("logit_offset", logit_offset)):
                value = None if value is None else torch.as_tensor(value, dtype=torch.float32)
                self.register_buffer(name, value, persistent=False)

        def hidden(self, input_ids, attention_mask):
            """(B, T, H) last hidden states of the real positions (learned prompt tokens dropped)."""
            n_prompt = _prompt_tokens(self.backbone)
            if n_prompt:
                # peft's own prompt-tuning forward drops position_ids, which a left-padded decoder
                # needs; so the learned prompt is prepended here, with positions that count it.
                embeds = self.backbone.word_embeddings(input_ids)
                prompt = self.backbone.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
                ones = attention_mask.new_ones(attention_mask.shape[0], n_prompt)
                mask = torch.cat([ones, attention_mask], dim=1)
                out = self.backbone.base_model(
                    inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask, **self._positions(mask)
                )
                return out.last_hidden_state[:, n_prompt:]
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **self._positions(attention_mask))
            return out.last_hidden_state

        def _positions(self, mask) -> dict:
            # Decoder positions count real tokens only, so left padding does not shift them.
            if not self.is_decoder:
                return {}
            return {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}

        def forward(self, input_ids, attention_mask, labels=None):
            pooled = POOLERS[self.pooling](self.hidden(input_ids, attention_mask), attention_mask)  # (B, H)
            logits = self.score(pooled.to(self.score.weight.dtype))  # (B, C)
            loss = None
            if labels is not None:
                adjusted = logits.float() if self.logit_offset is None else logits.float() + self.logit_offset
                loss = nn.functional.cross_entropy(adjusted, labels, weight=self.class_weights)
            return {"loss": loss, "logits": logits}

    return PooledClassifier


def _prompt_tokens(backbone) -> int:
    """Number of learned prompt tokens prepended to the input (0 unless prompt-tuned with peft)."""
    config = getattr(backbone, "active_peft_config", None)
    if config is None or getattr(config, "peft_type", None) != "PROMPT_TUNING":
        return 0
    return config.num_virtual_tokens


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ----------------------------------------------------------------------------- batching


tokenize = backbones.tokenize


def length_sorted_batches(tokenizer, ids: list[list[int]], batch_size: int) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (row indices, padded tensors) in descending length, so batches hold little padding."""
    order = np.argsort([-len(x) for x in ids], kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        yield rows, batch


def autocast(precision: str, device):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_forward(model, tokenizer, ids, batch_size: int, precision: str, out: str, progress=None) -> np.ndarray:
    """Forward ``ids`` through ``model`` in length-sorted batches; return logits or pooled features.

    ``out`` is "logits" (N, C) or "features" (N, H) (the pooled vector before the head).
    Rows come back in the input order.
    """
    import torch

    device = next(model.parameters()).device
    model.eval()
    result = None
    with torch.inference_mode(), autocast(precision, device):
        for rows, batch in length_sorted_batches(tokenizer, ids, batch_size):
            input_ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            if out == "logits":
                values = model(input_ids=input_ids, attention_mask=mask)["logits"]
            else:
                values = POOLERS[model.pooling](model.hidden(input_ids, mask), mask)
            values = values.float().cpu().numpy()
            if result is None:
                result = np.empty((len(ids), values.shape[1]), dtype=np.float32)
            result[rows] = values
            if progress is not None:
                progress(len(rows))
    if result is None:  # no texts
        result = np.empty((0, model.score.out_features if out == "logits" else model.score.in_features), np.float32)
    return result


def encode_labels(labels, classes=None, what: str = "labels") -> tuple[list, np.ndarray]:
    """(classes, y (N,) class indices). ``classes``: the sorted distinct ``labels`` unless given.

    Classes are plain Python values (a NumPy label array gives ``np.int64`` / ``np.str_``, which
    a saved model's JSON cannot hold). A missing label, or one outside ``classes``, is an error
    that names it.
    """

    def plain(value):
        return value.item() if isinstance(value, np.generic) else value

    import pandas as pd

    def missing(value) -> bool:  # None, NaN, pandas' NA and NaT (whose == is not a bool)
        return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value)

    if isinstance(labels, str):
        raise TypeError(f"{what} must be a list of labels, got one string")
    labels = [plain(v) for v in labels]
    first = next((i for i, v in enumerate(labels) if missing(v)), None)
    if first is not None:
        raise TailtuneError(f"{what} has a missing value (None, NaN or NA) at row {first}")
    if classes is None:
        try:
            classes = sorted(set(labels))
        except TypeError:
            raise TailtuneError(
                f"{what} mix types ({', '.join(sorted({type(v).__name__ for v in labels}))}); "
                "use one type for every label"
            ) from None
    classes = [plain(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    if len(index) != len(classes):
        twice = next(c for i, c in enumerate(classes) if index[c] != i)
        raise TailtuneError(f"classes names {twice!r} twice; each class once")
    unknown = list(dict.fromkeys(v for v in labels if v not in index))
    if unknown:
        raise TailtuneError(
            f"{what} has {len(unknown)} label(s) that are not classes, e.g. {unknown[0]!r} "
            "(the classes are the training labels, or those passed as classes=)"
        )
    return classes, np.array([index[v] for v in labels], dtype=np.int64)


def _check_fitted(model) -> None:
    """scikit-learn's NotFittedError before anything is loaded or computed."""
    if not hasattr(model, "classes_"):
        from sklearn.exceptions import NotFittedError

        raise NotFittedError(f"this {type(model).__name__} is not fitted yet; call fit (or load) first")


def top_k(proba: np.ndarray, classes: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N, k), confidences (N, k)), best first; ties keep the class order."""
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return np.asarray(classes, dtype=object)[order], np.take_along_axis(proba, order, axis=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- fine-tuned


def _text_list(texts, what: str) -> list[str]:
    """``texts`` (any iterable of strings) as a list, each checked to be a string."""
    backbones.check_texts(texts)
    texts = list(texts)
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise TailtuneError(f"{what}[{bad}] is a {type(texts[bad]).__name__}, not a string")
    return texts


def _check_save_target(path: str | Path) -> Path:
    """``path`` made absolute, once it is a place a model may be saved: new, an empty folder, or an
    earlier saved model (replaced). A folder holding anything else is refused, never emptied."""
    path = Path(path).absolute()
    if path == Path.cwd():
        raise TailtuneError("save into a folder of its own, not the current directory")
    if path.is_symlink():  # replacing the folder would replace the link, not what it points to
        raise TailtuneError(f"{path} is a symbolic link; save to the folder it points to ({path.readlink()})")
    if path.exists() and not path.is_dir():
        raise TailtuneError(f"{path} is a file; a model is saved as a folder")
    if path.is_dir() and not (path / "tailtune.json").is_file() and any(path.iterdir()):
        raise TailtuneError(
            f"{path} holds other files and is not a saved model; save into a new or empty folder "
            "(an earlier saved model is replaced)"
        )
    return path


def save_folder(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Save a model as the folder ``path`` (see :func:`_check_save_target`): ``write(folder)``
    fills a temporary sibling folder that replaces ``path`` once complete, so a failed save
    leaves the old folder (or none), never half a model, and nothing of an earlier model stays."""
    from tailtune import rundir

    path = _check_save_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = rundir.temp_dir(path)
    try:
        write(tmp)
        rundir.replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def lpft_start(
    probe, counts: np.ndarray, scheme: str, tau: float, val: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[tuple[np.ndarray, np.ndarray], float | None]:
    """LP-FT's start: the probe's head (W, b) moved to the prior of a loss with ``scheme``, and
    its macro-F1 on ``val`` = (features, y) (None without).

    The probe is class-balanced; an unweighted loss aims for the training prior, so its head
    starts with ``log pi`` added to the bias (see ``Imbalance.prior_shift``). A bias-free
    (decoder) head starts at the balanced probe as it is.
    """
    from tailtune import weighting
    from tailtune.metrics import macro_f1

    W, b = probe.W_, probe.b_
    if probe.intercept:
        b = (b + weighting.plan(scheme, counts, tau).prior_shift(counts)).astype(np.float32)
    if val is None:
        return (W, b), None
    return (W, b), macro_f1(val[1], (val[0] @ W.T + b).argmax(axis=1), len(counts))


def _usable_precision(saved: str) -> str:
    """The precision a loaded model predicts in: the one it was trained in where this machine
    computes it natively, else what ``auto`` picks here (fp16 from a GPU ran 3x slower than fp32
    on a CPU, which training refuses; bf16 is emulated, and slow, on a CPU without AVX512-BF16/AMX)."""
    import torch

    from tailtune.train import cpu_has_fast_bf16, resolve_precision

    try:
        precision = resolve_precision(saved)
    except TailtuneError:  # fp16 without a GPU, bf16 on a GPU without it
        return resolve_precision("auto")
    if precision == "bf16" and not torch.cuda.is_available() and not cpu_has_fast_bf16():
        return "fp32"
    return precision


class TextClassifier(ClassifierMixin, BaseEstimator):
    """A backbone + method + head, trained end to end.

    A scikit-learn estimator: ``get_params`` / ``set_params``, ``clone``, ``score`` (accuracy)
    and so ``cross_val_score`` or ``GridSearchCV`` over ``lr`` or ``weighting`` work on it.

    The recipe is ``train`` (a :class:`TrainConfig`; by default 3 epochs, lr 2e-4, head lr 2e-3,
    LP-FT, selection on validation macro-F1) and the backbone's ``max_length`` (256 by
    default). The CLI's presets set their own (``demo``: 1 epoch, 64 tokens, lr 5e-4;
    ``cfpb-paper``: 512 tokens, a random head); ``tailtune presets`` lists them. ``weighting``
    (none, sqrt_inverse, inverse, effective_number, logit_adjusted, balanced_sampling) is this
    classifier's imbalance strategy; ``TrainConfig.weighting`` only names the scheme of the
    CLI's ``-weighted`` systems and is not read here.

    Fitted attributes end in ``_``: ``classes_``, ``model_``, ``tokenizer_``, ``backbone_``,
    ``targets_`` (adapted module names), ``history_``, ``train_seconds_``, and
    ``probe_val_macro_f1_``: the validation macro-F1 of the LP-FT start that ``fit`` fitted
    itself (None without validation rows, without ``train.head_init: probe``, or when the
    caller passed ``head_init``, as a run does with its probe's head).
    """

    def __init__(
        self,
        backbone: BackboneConfig | str = "bundled:minilm",
        method: str = "lora",
        method_config: MethodConfig | None = None,
        train: TrainConfig | None = None,
        weighting: str = "none",
        lr: float | None = None,
    ):
        self.backbone = BackboneConfig(name=backbone) if isinstance(backbone, str) else backbone
        self.method = method
        self.method_config = method_config or MethodConfig()
        self.train = train or TrainConfig()
        self.weighting = weighting
        self.lr = lr
        from tailtune import config
        from tailtune import weighting as weighting_lib

        methods.get(method)  # each names the first bad setting, before anything loads
        config.check_backbone(self.backbone, "backbone")
        config.check_method(self.method_config)
        config.check_train(self.train)
        weighting_lib.check(weighting)
        if lr is not None and not 0 <= lr < float("inf"):
            raise TailtuneError(f"lr must be >= 0, got {lr}")

    def learning_rate(self) -> float:
        """The backbone / adapter learning rate: ``lr`` if given, else the method's paper rate,
        else ``backbone.lr`` or ``train.lr`` (the LoRA family's, tuned per preset)."""
        if self.lr is not None:
            return self.lr
        paper = methods.get(self.method).lr
        if paper is not None:
            return paper
        return self.backbone.effective_lr(self.train)

    # -- building

    def _build(self, classes: list[str], imbalance, backbone: backbones.Backbone | None = None):
        import torch

        self.backbone_ = backbone or backbones.resolve(self.backbone.name)
        self.pooling_ = self.backbone.pooling if self.backbone.pooling != "auto" else self.backbone_.pooling
        self.tokenizer_ = backbones.load_tokenizer(self.backbone_)
        torch.manual_seed(self.train.seed)
        base = backbones.load_model(self.backbone_, self.tokenizer_)
        if self.train.backbone_dropout is not None:  # before the method: LoRA keeps method.dropout
            backbones.set_dropout(base, self.train.backbone_dropout)
        return base, _module()(
            base,
            len(classes),
            self.pooling_,
            self.backbone_.is_decoder,
            imbalance.class_weights,
            imbalance.logit_offset,
        )

    def fit(
        self,
        texts: list[str],
        labels: list[str],
        *,
        val_texts: list[str] | None = None,
        val_labels: list[str] | None = None,
        classes: list[str] | None = None,
        head_init: tuple[np.ndarray, np.ndarray] | None = None,
        start_val_f1: float | None = None,
        backbone: backbones.Backbone | None = None,
        work_dir: str | Path | None = None,
        console=None,
    ) -> TextClassifier:
        """Train on ``texts`` / ``labels``; select the best evaluation on validation macro-F1.

        With ``val_texts`` / ``val_labels`` (give both or neither), training is evaluated
        ``train.eval_per_epoch`` times an epoch, keeps the state with the best validation
        macro-F1 and stops early after ``train.early_stopping_patience`` evaluations without a
        gain. Without them it runs its epochs and keeps the last state.

        The head starts from a class-balanced linear probe on the frozen backbone's features
        when ``train.head_init`` is "probe" (the default; LP-FT, as the CLI's systems), so the
        validation score to beat is the probe's; "random" starts it from scratch.
        ``head_init`` = (W (C, H), b (C,)) passes a start computed elsewhere, and
        ``start_val_f1`` its validation macro-F1.
        """
        import torch

        from tailtune import train as train_lib
        from tailtune import weighting

        texts = _text_list(texts, "texts")
        if (val_texts is None) != (val_labels is None):
            raise TailtuneError("pass val_texts and val_labels together, or neither")
        classes, y = encode_labels(labels, classes)
        if len(texts) != len(y):
            raise TailtuneError(f"texts has {len(texts)} rows and labels {len(y)}; they must be the same length")
        if not len(texts):
            raise TailtuneError("no training texts: fit needs at least one text per class")
        if len(np.unique(y)) < 2:
            raise TailtuneError(f"the labels hold one class ({classes[y[0]]!r}); a classifier needs at least 2")
        val_y = None
        if val_texts is not None:
            val_texts = _text_list(val_texts, "val_texts")
            val_y = encode_labels(val_labels, classes, "val_labels")[1]
            if len(val_texts) != len(val_y):
                raise TailtuneError(
                    f"val_texts has {len(val_texts)} rows and val_labels {len(val_y)}; they must be the same length"
                )
            if not val_texts:
                raise TailtuneError(
                    "val_texts is empty; leave val_texts and val_labels out to train without validation"
                )
        self.classes_ = classes
        counts = np.bincount(y, minlength=len(self.classes_))
        self.imbalance_ = weighting.plan(self.weighting, counts, self.train.logit_tau)
        base, model = self._build(self.classes_, self.imbalance_, backbone)
        train_ids = tokenize(self.tokenizer_, texts, self.backbone.max_length)
        val_ids = None if val_texts is None else tokenize(self.tokenizer_, val_texts, self.backbone.max_length)
        self.probe_val_macro_f1_ = None
        if head_init is None and self.train.head_init == "probe":
            head_init, start_val_f1 = self._probe_start(model, train_ids, y, val_ids, val_y, counts)
        method = methods.get(self.method)
        model.backbone, self.targets_ = method.apply(
            base, self.backbone_, self.method_config, self.backbone.adapt_layers
        )
        if head_init is not None:
            with torch.no_grad():
                model.score.weight.copy_(torch.as_tensor(head_init[0]))
                if model.score.bias is not None:
                    model.score.bias.copy_(torch.as_tensor(head_init[1]))
                elif np.any(head_init[1]):
                    raise TailtuneError("head_init has a bias but this head has none (fit the probe without intercept)")
        self.model_ = model
        self.trainable_params_, self.total_params_ = count_params(model)
        from tailtune.preflight import check_padding

        check_padding(model, self.tokenizer_, texts, self.backbone.max_length)  # before any step
        started = time.perf_counter()
        self.history_ = train_lib.fit(
            model,
            self.tokenizer_,
            train_ids,
            y,
            val_ids,
            val_y,
            train=self.train,
            backbone=dataclasses.replace(self.backbone, lr=self.learning_rate()),
            work_dir=work_dir,
            console=console,
            # the probe's score is this model's start only if the method leaves the output as it
            # was (LoRA's B = 0); virtual tokens change it before any step
            start_val_f1=start_val_f1 if head_init is not None and not method.changes_output_at_init else None,
            class_sampling=self.imbalance_.class_sampling,
        )
        self.precision_ = self.history_["precision"]
        self.history_["lr"] = self.learning_rate() if method.name != "head" else None  # head: head_lr only
        self.train_seconds_ = time.perf_counter() - started
        return self

    def _probe_start(self, model, train_ids, y, val_ids, val_y, counts):
        """(LP-FT head (W, b), its validation macro-F1 or None) from a class-balanced probe on the
        frozen backbone's features, C chosen on train (:func:`lpft_start`)."""
        from tailtune.train import resolve_precision

        precision, size = resolve_precision(self.train.precision), self.backbone.eval_batch_size
        features = run_forward(model, self.tokenizer_, train_ids, size, precision, "features")
        val = (
            None
            if val_ids is None
            else (run_forward(model, self.tokenizer_, val_ids, size, precision, "features"), val_y)
        )
        probe = ProbeClassifier(self.backbone, seed=self.train.seed, intercept=not self.backbone_.is_decoder)
        probe.fit_features(features, y, self.classes_, val=val, choose_C=True)
        self.probe_val_macro_f1_ = getattr(probe, "val_macro_f1_", None)
        return lpft_start(probe, counts, self.weighting, self.train.logit_tau, val)

    # -- inference

    def predict_logits(self, texts: list[str], progress=None) -> np.ndarray:
        """(N, C) logits, columns in ``classes_`` order."""
        _check_fitted(self)
        ids = tokenize(self.tokenizer_, texts, self.backbone.max_length)
        return run_forward(
            self.model_, self.tokenizer_, ids, self.backbone.eval_batch_size, self.precision_, "logits", progress
        )

    def predict_proba(self, texts: list[str], progress=None) -> np.ndarray:
        """(N, C) class probabilities, columns in ``classes_`` order."""
        return softmax(self.predict_logits(texts, progress))

    def predict(self, texts: list[str]) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(texts).argmax(axis=1)]

    def predict_top_k(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels (N, k), probabilities (N, k)), best first, as ``tailtune predict --top-k``."""
        _check_fitted(self)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(self.classes_):
            raise TailtuneError(f"k must be between 1 and the {len(self.classes_)} classes, got {k}")
        return top_k(self.predict_proba(texts), self.classes_, k)

    # -- persistence

    def save(self, path: str | Path) -> Path:
        """Write everything needed to reload (method weights, head, tokenizer, label map) as the
        folder ``path``, all at once (:func:`save_folder`)."""
        _check_fitted(self)
        return save_folder(path, self._write)

    def _write(self, path: Path) -> None:
        from safetensors.torch import save_file

        methods.get(self.method).save(self.model_.backbone, path)
        head = {k: v.detach().cpu().contiguous() for k, v in self.model_.score.state_dict().items()}
        save_file(head, str(path / "head.safetensors"))
        self.tokenizer_.save_pretrained(path / "tokenizer")
        meta = {
            "format_version": FORMAT_VERSION,
            "classes": self.classes_,
            "backbone": {**vars(self.backbone), **self.backbone_.describe()},
            "pooling": self.pooling_,
            "method": self.method,
            "method_config": vars(self.method_config),
            "weighting": self.weighting,
            "precision": self.precision_,
            "targets": self.targets_,
            "padding_side": self.tokenizer_.padding_side,
            "pad_token": self.tokenizer_.pad_token,
        }
        (path / "tailtune.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> TextClassifier:
        """Reload a saved classifier; the head comes from ``head.safetensors``, never re-initialised."""
        path = Path(path)
        meta, config = read_saved(path)
        with damaged_model(path):
            return cls._load(path, meta, config)

    @classmethod
    def _load(cls, path: Path, meta: dict, config: BackboneConfig) -> TextClassifier:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        bb = meta["backbone"]
        config.pooling = meta["pooling"]
        self = cls(config, meta["method"], MethodConfig(**meta["method_config"]), weighting=meta["weighting"])
        self.classes_ = meta["classes"]
        method = methods.get(self.method)
        self.backbone_ = backbones.Backbone.from_saved(bb, meta["pooling"], weights=not method.saves_backbone)
        self.pooling_ = meta["pooling"]
        self.precision_ = _usable_precision(meta["precision"])
        self.targets_ = meta["targets"]
        self.tokenizer_ = AutoTokenizer.from_pretrained(path / "tokenizer")
        self.tokenizer_.padding_side = meta["padding_side"]
        # A merged export or full fine-tuning holds the whole backbone: the base is not read.
        base = (
            method.load(None, path) if method.saves_backbone else backbones.load_model(self.backbone_, self.tokenizer_)
        )
        head = load_file(str(path / "head.safetensors"))
        model = _module()(base, len(self.classes_), self.pooling_, self.backbone_.is_decoder, bias="bias" in head)
        if not method.saves_backbone:
            model.backbone = method.load(base, path)
        model.score.load_state_dict(head)
        self.model_ = model.eval().requires_grad_(False)
        self.trainable_params_, self.total_params_ = 0, count_params(model)[1]
        return self


@contextlib.contextmanager
def damaged_model(path: Path):
    """Loading the model saved in ``path``: a damaged or missing file of it is one line naming it.

    A missing file, peft's "Can't find 'adapter_config.json'", a torn safetensors or joblib file,
    a key missing from tailtune.json, a damaged method_config. Input errors pass through.
    """
    import pickle

    from safetensors import SafetensorError

    try:
        yield
    except TailtuneError:
        raise
    except KeyError as exc:
        raise TailtuneError(f"{path / 'tailtune.json'} lacks {exc}; the saved model is damaged") from None
    except (OSError, ValueError, TypeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        raise TailtuneError(f"could not load the model saved in {path}: {first_line(exc)}") from None


def read_meta(path: Path) -> dict:
    """The ``tailtune.json`` of the model folder ``path``, or one line saying it is damaged."""
    meta_file = Path(path) / "tailtune.json"
    meta = rundir.read_json_or_fail(meta_file, "the saved model is damaged")
    if not isinstance(meta, dict):
        raise TailtuneError(f"{meta_file} is not a JSON object; the saved model is damaged")
    return meta


def read_saved(path: Path, kind: str = "finetune") -> tuple[dict, BackboneConfig]:
    """The ``tailtune.json`` of a saved model folder of ``kind`` and the backbone config it records.

    A fine-tuned classifier's file has no ``kind``; a run's probe, TF-IDF and generate systems
    name theirs.
    """
    meta_file = path / "tailtune.json"
    if not meta_file.exists():
        raise TailtuneError(f"{path} is not a saved tailtune model (no tailtune.json)")
    meta = read_meta(path)
    if meta.get("kind", "finetune") != kind:
        raise TailtuneError(
            f"{path} holds a '{meta.get('kind', 'finetune')}' system, not a {kind} one; tailtune.deploy.load_predictor "
            "loads every kind"
        )
    if not isinstance(meta.get("backbone"), dict):
        raise TailtuneError(f"{meta_file} has no backbone record; the saved model is damaged")
    known = {f.name for f in dataclasses.fields(BackboneConfig)}
    return meta, BackboneConfig(**{k: v for k, v in meta["backbone"].items() if k in known})


# ----------------------------------------------------------------------------- probe


def single_threaded_blas():
    """Run scikit-learn's BLAS on one thread inside a process that also runs torch.

    Next to torch's OpenMP threads, multi-threaded BLAS oversubscribes the cores: a 100-class
    logistic regression on 2,334 x 384 features took ~80 s that way and 1.8 s on one thread.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def fit_logreg(
    features: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    class_weight="balanced",
    C: float = 1.0,
    seed: int = 0,
    intercept: bool = True,
):
    """Standardised multinomial logistic regression; returns (pipeline, W (C, H), b (C,)).

    W and b fold the standardisation in, so ``features @ W.T + b`` gives the pipeline's logits
    and can initialise a linear head directly (LP-FT). Classes with no training row get a
    very negative bias. ``intercept=False`` fits a bias-free model for a bias-free head
    (decoders): features are scaled but not centred, and b is all zeros.
    """
    from sklearn.pipeline import make_pipeline

    scaler, lr = _scaled_logreg(C, seed, intercept, class_weight)
    fit_scaler(scaler, features)
    with single_threaded_blas():
        lr.fit(scaler.transform(features), y)
    pipe = make_pipeline(scaler, lr)
    W = np.zeros((n_classes, features.shape[1]), dtype=np.float32)
    b = np.full(n_classes, -30.0 if intercept else 0.0, dtype=np.float32)
    coef = lr.coef_ / scaler.scale_
    W[lr.classes_] = coef
    if intercept:
        b[lr.classes_] = lr.intercept_ - coef @ scaler.mean_
    return pipe, W, b


# A feature whose spread is below this share of the median feature's is treated as constant.
SCALE_FLOOR = 1e-3


def fit_scaler(scaler, features: np.ndarray):
    """Fit ``scaler`` with its per-feature scale floored at ``SCALE_FLOOR`` x the median scale.

    Pretrained encoders have dead dimensions: MiniLM's mean-pooled output has two whose values
    are ~1e-33 with no spread, which StandardScaler divides by ~1e-33. The probe's own
    predictions survive that, but the folded LP-FT head got weights of 2e31 there: the first
    change fine-tuning made to those features saturated every logit, and full fine-tuning and
    BitFit never moved off their start.
    """
    scaler.fit(features)
    scaler.scale_ = np.maximum(scaler.scale_, SCALE_FLOOR * np.median(scaler.scale_))
    return scaler


def _scaled_logreg(C: float, seed: int, intercept: bool, class_weight="balanced", warm_start: bool = False):
    """(scaler, logistic regression) as the probe fits them; the scaler centres only with an intercept."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    return StandardScaler(with_mean=intercept), LogisticRegression(
        C=C, max_iter=2000, class_weight=class_weight, random_state=seed, fit_intercept=intercept, warm_start=warm_start
    )


class ProbeClassifier:
    """Frozen backbone features (pooled as the checkpoint was trained) + balanced logistic regression."""

    # Frozen features of a 384-1024-dim backbone overfit a long tail quickly; on the CFPB
    # products sample C=0.01 scored val macro-F1 0.661 against 0.581 for C=1.
    C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)

    def __init__(
        self, backbone: BackboneConfig | str = "bundled:minilm", C: float = 1.0, seed: int = 0, intercept: bool = True
    ):
        self.backbone = BackboneConfig(name=backbone) if isinstance(backbone, str) else backbone
        self.C = C
        self.seed = seed
        self.intercept = intercept  # False for a decoder, whose fine-tuned head has no bias

    def load_encoder(self, backbone: backbones.Backbone | None = None) -> ProbeClassifier:
        self.backbone_ = backbone or backbones.resolve(self.backbone.name)
        self.pooling_ = self.backbone.pooling if self.backbone.pooling != "auto" else self.backbone_.pooling
        self.tokenizer_ = backbones.load_tokenizer(self.backbone_)
        base = backbones.load_model(self.backbone_, self.tokenizer_)
        self.model_ = _module()(base, 1, self.pooling_, self.backbone_.is_decoder)
        from tailtune.train import resolve_precision

        self.precision_ = resolve_precision("auto")
        return self

    def features(self, texts: list[str], progress=None) -> np.ndarray:
        """(N, H) pooled features of the frozen backbone."""
        backbones.check_texts(texts)  # before the backbone loads
        if not hasattr(self, "model_"):
            self.load_encoder()
        ids = tokenize(self.tokenizer_, texts, self.backbone.max_length)
        return run_forward(
            self.model_, self.tokenizer_, ids, self.backbone.eval_batch_size, self.precision_, "features", progress
        )

    def fit_features(
        self,
        features: np.ndarray,
        y: np.ndarray,
        classes: list[str],
        val: tuple[np.ndarray, np.ndarray] | None = None,
        choose_C: bool | None = None,
    ) -> ProbeClassifier:
        """Fit on (N, H) features; ``C_`` records the regularisation used.

        ``choose_C`` (default: when ``val`` is given) picks C as below; otherwise ``C`` is used.

        With ``val`` = (features, y), C is chosen from ``C_GRID`` by out-of-fold macro-F1 on the
        *training* rows (stratified k-fold, ties to the stronger regularisation), then refit
        on all of train, and ``val_macro_f1_`` is the validation score of that one model. Val
        stays unused for the choice, so it is an unbiased start for fine-tuning to beat
        (choosing C on val made the probe look better there than it was).
        """
        from tailtune.metrics import macro_f1

        self.classes_ = list(classes)
        choose_C = val is not None if choose_C is None else choose_C
        self.C_ = self._choose_C(features, y, len(classes)) if choose_C else self.C
        self.pipeline_, self.W_, self.b_ = fit_logreg(
            features, y, len(classes), C=self.C_, seed=self.seed, intercept=self.intercept
        )
        if val is not None:
            pred = self.proba_from_features(val[0]).argmax(axis=1)
            self.val_macro_f1_ = macro_f1(val[1], pred, len(classes))
        return self

    def _choose_C(self, features: np.ndarray, y: np.ndarray, n_classes: int, folds: int = 3) -> float:
        """C with the best out-of-fold macro-F1 on train; each fold walks the grid warm-started.

        Fewer folds when no class has ``folds`` rows; ``C`` itself when none has 2."""
        import warnings

        from sklearn.model_selection import StratifiedKFold

        from tailtune.metrics import macro_f1

        folds = min(folds, int(np.bincount(y).max()))
        if folds < 2:
            return self.C
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)
        oof = {C: np.empty_like(y) for C in self.C_GRID}
        with warnings.catch_warnings(), single_threaded_blas():
            warnings.simplefilter("ignore", UserWarning)  # classes with fewer rows than folds: expected on a tail
            for fit_rows, held_rows in splitter.split(features, y):
                scaler, lr = _scaled_logreg(self.C_GRID[0], self.seed, self.intercept, warm_start=True)
                fit_scaler(scaler, features[fit_rows])
                fit_x, held_x = scaler.transform(features[fit_rows]), scaler.transform(features[held_rows])
                for C in sorted(self.C_GRID):  # strong -> weak regularisation, each fit starts from the last
                    oof[C][held_rows] = lr.set_params(C=C).fit(fit_x, y[fit_rows]).predict(held_x)
        self.C_scores_ = {C: macro_f1(y, oof[C], n_classes) for C in self.C_GRID}
        best = max(self.C_scores_.values())
        return next(C for C in self.C_GRID if self.C_scores_[C] >= best - 1e-9)

    def fit(self, texts: list[str], labels: list[str], classes: list[str] | None = None) -> ProbeClassifier:
        classes, y = encode_labels(labels, classes)
        return self.fit_features(self.features(texts), y, classes)

    def proba_from_features(self, features: np.ndarray) -> np.ndarray:
        _check_fitted(self)
        return softmax(features @ self.W_.T + self.b_)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        _check_fitted(self)  # before the backbone is loaded
        return self.proba_from_features(self.features(texts))

    def predict(self, texts: list[str]) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(texts).argmax(axis=1)]
