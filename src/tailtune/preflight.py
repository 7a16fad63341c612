"""Checks that run before anything is trained or written, each failing with one clear line.

``tailtune run`` calls them from ``run._preflight`` and right after the backbones resolve, in
this order: the output folder accepts files; the data has validation rows for the systems
that select on validation; each backbone's tokenizer has a pad token (decoders: on the left);
each method's target roles match modules; training fits in free memory. The last two use the
model's *shape* only (built on the meta device, no weights read), so they cost well under a
second. Texts longer than a backbone's ``max_length`` are counted into ``data.json``.

:func:`check_padding` needs real weights, so it runs on the model built for training, just
before its first step (:meth:`tailtune.classifier.TextClassifier.fit`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from tailtune.errors import TailtuneError

# Activation elements kept for backward, per token per adapted layer: about 16 hidden-sized
# tensors (norms, Q/K/V, attention output, residuals, LoRA inputs) plus 3 FFN-sized ones
# (up, gate, activation). A rough rule in the spirit of Korthikanti et al. 2022; its job is to
# catch batch sizes off by 2x or more, not to predict the peak to the megabyte.
ACT_PER_HIDDEN = 16
ACT_PER_FFN = 3


# ----------------------------------------------------------------------------- output and data


WRITE_PROBE = ".tailtune-write-check."  # prefix of the file check_writable creates and removes


def check_writable(out: Path) -> None:
    """Error unless ``out``, or the nearest existing folder it would be created in, accepts files.

    Tried with a real file: permission bits, read-only mounts and immutable folders all differ
    in what ``os.access`` reports, but none lets a file be created.
    """
    out = Path(out)
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise TailtuneError(f"cannot create output directory {out}: {base} is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=WRITE_PROBE)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise TailtuneError(
            f"output directory {out} is not writable ({reason}: {base}); choose another --out"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_splits(data, specs) -> None:
    """Probes and fine-tuning choose their model on validation, so it must have rows."""
    selecting = [s.name for s in specs if s.kind in ("probe", "finetune")]
    if selecting and data.summary["splits"]["val"] == 0:
        raise TailtuneError(
            f"no validation rows: every class has fewer than 3 rows after cleaning, and validation "
            f"picks the model of {', '.join(selecting)}; add rows or run only tfidf-logreg"
        )


# ----------------------------------------------------------------------------- backbones


def check_backbones(ctx, specs) -> None:
    """Resolve every backbone the systems use and check it before anything is written.

    Per backbone: the tokenizer pads correctly, and the texts longer than ``max_length`` are
    counted (into ``data.summary["truncation"]``). Per fine-tuned system: its method's target
    roles match modules, and training fits in free memory.
    """
    from tailtune import backbones
    from tailtune.train import resolve_precision

    cfg, data = ctx.cfg, ctx.data
    texts = data.frame["text"]
    truncation = {}
    backbones.quiet_transformers()  # counting tokens of a huge text must not print a warning
    for slot in dict.fromkeys(s.slot for s in specs if s.slot):
        backbone = ctx.backbone(slot)  # resolves (and converts a GGUF) once, for the run to reuse
        bb_cfg = getattr(cfg, slot)
        tokenizer = backbones.load_tokenizer(backbone)
        check_tokenizer(tokenizer, backbone)
        truncation[slot] = {"backbone": bb_cfg.name, **count_truncated(tokenizer, texts, bb_cfg.max_length)}
        seq_len = min(bb_cfg.max_length, truncation[slot]["longest_tokens"])
        for spec in (s for s in specs if s.slot == slot and s.kind in ("finetune", "generate")):
            check_positions(spec, cfg, backbone)
            label_tokens = None
            if spec.kind == "generate":  # prompt + the longest label (its tokens and eos)
                from tailtune.generate import longest_label

                label_tokens = longest_label(backbone, tokenizer, data.classes)
            shape = model_shape(spec, cfg, backbone, len(data.classes), label_tokens)  # errors if a role matches nothing
            precision = resolve_precision(cfg.train.precision)
            tokens = seq_len + (label_tokens or 0)
            need = training_memory(shape, bb_cfg.batch_size, tokens, precision)
            free, device = available_memory()
            if need["total"] > free:
                raise TailtuneError(_memory_message(spec, cfg, shape, tokens, precision, need, free, device))
    data.summary["truncation"] = truncation


# Encoders with a learned position table; RoBERTa-style ones start counting after the pad id.
ABSOLUTE_POSITIONS = {"bert": False, "distilbert": False, "electra": False, "roberta": True,
                      "xlm-roberta": True, "camembert": True, "mpnet": True}


def check_positions(spec, cfg, backbone) -> None:
    """Prompt and prefix tuning put virtual tokens before the text: with an absolute position
    table, ``max_length`` plus them must fit in it (512 + 20 failed mid-run with a tensor size
    error on BERT, MPNet and RoBERTa)."""
    method_cfg, _, bb_cfg, _ = spec.configs(cfg)
    check_method_positions(spec.name, spec.slot, spec.method, method_cfg, bb_cfg, backbone)


def check_method_positions(name: str, slot: str, method: str, method_cfg, bb_cfg, backbone) -> None:
    """:func:`check_positions` for ``method`` with these settings (``name`` starts the message)."""
    from transformers import AutoConfig

    from tailtune import methods

    if "virtual_tokens" not in methods.get(method).uses or backbone.model_type not in ABSOLUTE_POSITIONS:
        return
    config = AutoConfig.from_pretrained(backbone.path)
    offset = (config.pad_token_id or 0) + 1 if ABSOLUTE_POSITIONS[backbone.model_type] else 0
    positions = config.max_position_embeddings - offset
    if bb_cfg.max_length + method_cfg.virtual_tokens > positions:
        raise TailtuneError(
            f"{name}: {bb_cfg.max_length} tokens + {method_cfg.virtual_tokens} virtual tokens exceed the "
            f"{positions} positions of {backbone.model_type}; set {slot}.max_length to at most "
            f"{positions - method_cfg.virtual_tokens}, or fewer method.virtual_tokens"
        )


def check_tokenizer(tokenizer, backbone) -> None:
    """A pad token must exist; a decoder must pad on the left (the last position is then real)."""
    if tokenizer.pad_token_id is None:
        raise TailtuneError(f"backbone '{backbone.spec}': tokenizer has no pad token")
    if backbone.is_decoder and tokenizer.padding_side != "left":
        raise TailtuneError(
            f"decoder '{backbone.spec}': tokenizer pads on the {tokenizer.padding_side}; "
            "a decoder classifier must pad on the left"
        )


def count_truncated(tokenizer, texts, max_length: int, sample: int = 256, seed: int = 0) -> dict:
    """How many of ``texts`` (a pandas Series) exceed ``max_length`` tokens; an estimate.

    Tokens per word is measured with the real tokenizer on a seeded sample of ``sample``
    texts (the median over texts, so one huge text does not set it) and applied to every
    text's word count, so the cost does not grow with the data.
    """
    from tailtune.backbones import clip_long

    words = texts.str.split().str.len().to_numpy()
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(texts), size=min(sample, len(texts)), replace=False)
    # a huge text is measured on a head of it (tokenising 9.4M characters whole took 7.7 s)
    heads = clip_long(tokenizer, [texts.iloc[i] for i in rows], max_length)
    ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
    per_word = float(np.median([len(x) / max(1, len(h.split())) for x, h in zip(ids, heads, strict=True)]))
    tokens = words * per_word + tokenizer.num_special_tokens_to_add()
    over = int((tokens > max_length).sum())
    return {
        "max_length": int(max_length),
        "texts_over": over,
        "texts": int(len(texts)),
        "share": round(over / len(texts), 4),
        "longest_tokens": int(math.ceil(tokens.max())),
        "tokens_per_word": round(per_word, 3),
        "method": f"estimate: word count x tokens per word measured on {len(rows)} texts",
    }


# ----------------------------------------------------------------------------- memory


def available_memory() -> tuple[int, str]:
    """(bytes free, device name) where training will run: the GPU, else RAM within any cgroup limit."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free), f"GPU {torch.cuda.get_device_name()}"
    import psutil

    free = psutil.virtual_memory().available
    # A container's memory limit is invisible in /proc/meminfo; reclaimable page cache counts as free.
    for limit_file, usage_file, cache_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "inactive_file"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
         "total_inactive_file"),
    ):
        try:
            limit = int(Path(limit_file).read_text())
            usage = int(Path(usage_file).read_text())
            stat = dict(line.split() for line in (Path(limit_file).parent / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):  # no such cgroup, or "max" (no limit)
            continue
        free = min(free, limit - usage + int(stat.get(cache_key, 0)))
        break
    return int(free), "CPU RAM"


def model_shape(spec, cfg, backbone, n_classes: int, label_tokens: int | None = None) -> dict:
    """Parameter counts and sizes of ``spec``'s model, from its config on the meta device.

    The method is really applied (to a model without weights), so the trainable count is the
    method's own and a target role that matches no module fails here, before training.
    ``label_tokens`` (decoder-generate: the longest label's tokens) replaces the classification
    head by the language-model head's logits at the label positions.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from tailtune import methods
    from tailtune.backbones import LAYER_INDEX, quiet_transformers

    method_cfg, _, bb_cfg, _ = spec.configs(cfg)
    quiet_transformers()
    config = AutoConfig.from_pretrained(backbone.path)
    writes = label_tokens is not None  # decoder-generate: no head, no probe; logits over the vocabulary
    if writes:
        from tailtune.generate import require_decoder

        require_decoder(backbone)
    with torch.device("meta"):  # shapes only: nothing allocated, no weights read
        model = (AutoModelForCausalLM if writes else AutoModel).from_config(config)
    base_params = sum(p.numel() for p in model.parameters())
    model, _ = methods.get(spec.method).apply(model, backbone, method_cfg, bb_cfg.adapt_layers)
    head = 0 if writes else config.hidden_size * n_classes + (0 if backbone.is_decoder else n_classes)
    # Backpropagation stops at the lowest layer that holds a trainable weight; a trainable weight
    # outside the layers (embeddings, prompt/prefix virtual tokens) takes it through all of them
    # (prompt tuning was planned at 0 activation bytes: 26.7 MiB against 209.6 MiB measured).
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = [int(m.group(1)) for n in trainable if (m := LAYER_INDEX.search(n))]
    if any(not LAYER_INDEX.search(n) for n in trainable):
        adapted.append(0)
    return {
        "params": sum(p.numel() for p in model.parameters()) + head,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad) + head,
        "probe_params": 0 if writes else (
            base_params if cfg.train.head_init == "probe" or f"{spec.slot}-probe" in cfg.systems else 0
        ),
        # generate.collate_label_batch keeps logits at the label positions and the one before them
        "logit_positions": label_tokens + 1 if writes else 0,
        "vocab": config.get_text_config().vocab_size,
        "adapted_layers": config.num_hidden_layers - min(adapted) if adapted else 0,
        "hidden": config.hidden_size,
        "ffn": getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        "heads": config.num_attention_heads,
    }


def training_memory(shape: dict, batch_size: int, seq_len: int, precision: str) -> dict:
    """Bytes to fine-tune a model of ``shape`` (see :func:`model_shape`), by part, and their total.

    fp32 weights (4 bytes/param; tailtune keeps fp32 master weights) + gradients and two Adam
    moments of the trainable parameters (12 bytes each, so full fine-tuning is 16 bytes/param)
    + activations of the adapted layers for ``batch_size`` x ``seq_len`` tokens + the frozen
    probe model the LP-FT head comes from, which stays loaded + (decoder-generate) the
    vocabulary logits at the label positions: autocast's copy, the fp32 copy the loss takes and
    its gradient (10 bytes each, 12 in fp32).
    """
    per_token = ACT_PER_HIDDEN * shape["hidden"] + ACT_PER_FFN * shape["ffn"] + shape["heads"] * seq_len
    width = 4 if precision == "fp32" else 2
    parts = {
        "weights": 4 * shape["params"],
        "gradients_adam": 12 * shape["trainable"],
        "activations": batch_size * seq_len * shape["adapted_layers"] * per_token * width,
        "probe_copy": 4 * shape["probe_params"],
        "logits": batch_size * shape.get("logit_positions", 0) * shape.get("vocab", 0) * (width + 8),
    }
    return {**parts, "total": sum(parts.values())}


def _memory_message(spec, cfg, shape, seq_len, precision, need, free, device) -> str:
    slot, bb_cfg = spec.slot, getattr(cfg, spec.slot)
    fits = [b for b in range(bb_cfg.batch_size - 1, 0, -1)
            if training_memory(shape, b, seq_len, precision)["total"] <= free]
    if fits:
        accum = math.ceil(bb_cfg.batch_size * cfg.train.grad_accum / fits[0])
        fix = f"try {slot}.batch_size={fits[0]} train.grad_accum={accum} (the same effective batch)"
    elif spec.method == "full":
        fix = f"fine-tune with LoRA instead ({slot}-lora) or use a smaller backbone"
    elif shape["adapted_layers"] > 2:
        fix = f"adapt fewer layers ({slot}.adapt_layers=2), lower {slot}.max_length, or use a smaller backbone"
    else:
        fix = "use a smaller backbone or a machine with more memory"
    return (
        f"{spec.name} needs about {_size(need['total'])} to train (weights {_size(need['weights'])}, "
        f"gradients + Adam {_size(need['gradients_adam'])}, activations {_size(need['activations'])} "
        f"at batch {bb_cfg.batch_size} x {seq_len} tokens"
        + (f", label logits {_size(need['logits'])}" if need["logits"] else "")
        + f") but {device} has {_size(free)} free; {fix}"
    )


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- padding


def check_padding(model, tokenizer, texts: list[str], max_length: int, extra: int = 3) -> None:
    """Logits of a batch must not change when ``extra`` more pad tokens are added.

    Runs the real ``PooledClassifier`` (fp32, eval mode) on the shortest and the longest of
    the first 64 ``texts``, cut to at most 16 tokens (so one row is usually padded already and
    the check costs two tiny forward passes), once as the tokenizer pads them and once with
    ``extra`` more pad tokens on the padding side. It fails when the model config does not
    know the pad token, a decoder pads on the right, or pooling reads padding (e.g. a pooler
    that takes position 0 of a left-padded batch).
    """
    import torch

    from tailtune.classifier import tokenize

    config = getattr(model.backbone, "config", None)
    if tokenizer.pad_token_id is None or getattr(config, "pad_token_id", None) != tokenizer.pad_token_id:
        raise TailtuneError(
            f"model config pad_token_id is {getattr(config, 'pad_token_id', None)} but the tokenizer pads "
            f"with {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}); they must agree"
        )
    side = tokenizer.padding_side
    if model.is_decoder and side != "left":
        raise TailtuneError(f"decoder tokenizer pads on the {side}; a decoder classifier must pad on the left")
    by_length = sorted(texts[:64], key=len)
    picked = [by_length[0], by_length[-1]]
    batch = tokenizer.pad({"input_ids": tokenize(tokenizer, picked, min(max_length, 16))}, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad_ids = torch.full((len(picked), extra), tokenizer.pad_token_id, dtype=ids.dtype)
    pad_mask = torch.zeros((len(picked), extra), dtype=mask.dtype)
    padded = [pad_ids, ids] if side == "left" else [ids, pad_ids]
    padded_mask = [pad_mask, mask] if side == "left" else [mask, pad_mask]
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a = model(input_ids=ids.to(device), attention_mask=mask.to(device))["logits"].float()
            b = model(input_ids=torch.cat(padded, 1).to(device), attention_mask=torch.cat(padded_mask, 1).to(device))[
                "logits"
            ].float()
    finally:
        model.train(training)
    diff = float((a - b).abs().max())
    if not diff <= 1e-3 * max(1.0, float(a.abs().max())):  # also catches NaN
        raise TailtuneError(
            f"predictions change with padding: {extra} more pad tokens on the {side} move the logits by "
            f"{diff:.2e}; '{model.pooling}' pooling or the position ids read padded positions"
        )
