"""Checks that run before anything is trained or written, each failing with one clear line.

``tailtune run`` calls them from ``run._preflight`` and right after the backbones resolve, in
this order: the output folder accepts files; the data has validation rows for the systems
that select on validation; each backbone's tokenizer has a pad token (decoders: on the left);
each method's target roles match modules; training fits in free memory. The last two build the
model on the meta device (no weights read) and trace one training forward on fake tensors, as
``tailtune plan`` does (:func:`tailtune.plan.plan_one`), so they cost about a second per
fine-tuned system. Texts longer than a backbone's ``max_length`` are counted into ``data.json``.

:func:`check_padding` needs real weights, so it runs on the model built for training, just
before its first step (:meth:`tailtune.classifier.TextClassifier.fit`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tailtune import rundir
from tailtune.errors import TailtuneError

# ----------------------------------------------------------------------------- output and data


def check_writable(out: Path) -> None:
    """Error unless ``out``, or the nearest existing folder it would be created in, accepts files."""
    base, problem = rundir.write_problem(Path(out))
    if problem == "is a file":
        raise TailtuneError(f"cannot create output directory {out}: {base} is a file")
    if problem is not None:
        raise TailtuneError(
            f"output directory {out} is not writable: no file can be created in {base} ({problem}); choose another --out"
        )


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
    counted (into ``data.summary["truncation"]``), and a digest of each model file is recorded
    (``data.summary["model_files"]``). Per fine-tuned system: its method's target roles match
    modules, and training fits in free memory.
    """
    from tailtune import backbones

    cfg, data = ctx.cfg, ctx.data
    texts = data.frame["text"]
    truncation, model_files, traced = {}, {}, {}
    backbones.quiet_transformers()  # counting tokens of a huge text must not print a warning
    for slot in dict.fromkeys(s.slot for s in specs if s.slot):
        backbone = ctx.backbone(slot)  # resolves (and converts a GGUF) once, for the run to reuse
        bb_cfg = getattr(cfg, slot)
        tokenizer = backbones.load_tokenizer(backbone)
        check_tokenizer(tokenizer, backbone)
        truncation[slot] = {"backbone": bb_cfg.name, **count_truncated(tokenizer, texts, bb_cfg.max_length)}
        model_files[slot] = backbones.model_digests(backbone.path)
        seq_len = min(bb_cfg.max_length, truncation[slot]["longest_tokens"])
        for spec in (s for s in specs if s.slot == slot and s.kind in ("finetune", "generate")):
            check_positions(spec, cfg, backbone)
            label_tokens = None
            if spec.kind == "generate":  # prompt + the longest label (its tokens and eos)
                from tailtune.generate import longest_label

                label_tokens = longest_label(backbone, tokenizer, data.classes)
            # errors if a target role matches no module, or no trainable weight reaches the loss;
            # systems that differ only in weighting or lr (encoder-lora, encoder-lora-weighted) train
            # the same model, and are traced once
            key = (slot, spec.kind, spec.method, repr(spec.configs(cfg)[0]))
            if key not in traced:
                traced[key] = training_memory(spec, cfg, backbone, len(data.classes), seq_len, label_tokens)
            need = traced[key]
            free, device = available_memory()
            if need["total"] > free:
                raise TailtuneError(_memory_message(spec, cfg, need, free, device))
    data.summary["truncation"] = truncation
    data.summary["model_files"] = model_files  # per backbone slot: a resumed run must train on the same


# Encoders with a learned position table; RoBERTa-style ones start counting after the pad id.
ABSOLUTE_POSITIONS = {
    "bert": False,
    "distilbert": False,
    "electra": False,
    "roberta": True,
    "xlm-roberta": True,
    "camembert": True,
    "mpnet": True,
}


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
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "total_inactive_file",
        ),
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


def training_memory(spec, cfg, backbone, n_classes: int, seq_len: int, label_tokens: int | None = None) -> dict:
    """Bytes to fine-tune ``spec`` on batches of ``seq_len`` tokens, by part, and their total.

    The parts are ``tailtune plan``'s (:func:`tailtune.plan.plan_one`, kept within -15% / +15%
    of a measured training-step peak by its tests): fp32 weights, gradients and AdamW state of
    the trainable weights the loss reaches, and the activations one forward saves for backward,
    traced on fake tensors (decoder-generate: prompt + ``label_tokens``, with the vocabulary
    logits at the label positions). Added here: the frozen probe model the LP-FT head comes
    from, which stays loaded while the system trains.
    """
    import dataclasses

    import torch
    from transformers import AutoConfig, AutoModel

    from tailtune.plan import plan_one
    from tailtune.train import resolve_precision

    method_cfg, _, bb_cfg, _ = spec.configs(cfg)
    row = plan_one(
        backbone,
        dataclasses.replace(bb_cfg, max_length=seq_len),
        spec.method,
        method_cfg,
        n_classes,
        resolve_precision(cfg.train.precision),
        label_tokens=label_tokens,
    )
    config = AutoConfig.from_pretrained(backbone.path)
    probe = 0
    if label_tokens is None and (cfg.train.head_init == "probe" or f"{spec.slot}-probe" in cfg.systems):
        with torch.device("meta"):  # shapes only: nothing allocated, no weights read
            probe = 4 * sum(p.numel() for p in AutoModel.from_config(config).parameters())
    layers = config.get_text_config().num_hidden_layers
    parts = {
        "weights": row["weights"],
        "gradients_adam": row["grads"] + row["optimizer"],
        "activations": row["activations"],
        "probe_copy": probe,
    }
    return {
        **parts,
        "total": sum(parts.values()),
        "batch_size": row["batch_size"],
        "tokens": row["max_length"],
        "label_logits": label_tokens is not None,
        # prompt / prefix tuning backpropagates through every layer whatever adapt_layers says
        "fewer_layers": spec.method not in ("full", "prompt", "prefix")
        and min(bb_cfg.adapt_layers or layers, layers) > 2,
    }


def at_batch(need: dict, batch_size: int) -> int:
    """Total bytes of ``need`` (:func:`training_memory`) with ``batch_size`` rows: activations scale with the rows."""
    return need["total"] - need["activations"] + need["activations"] * batch_size // need["batch_size"]


def _memory_message(spec, cfg, need, free, device) -> str:
    from tailtune.report import fmt_bytes

    slot, batch = spec.slot, need["batch_size"]
    fits = [b for b in range(batch - 1, 0, -1) if at_batch(need, b) <= free]
    if fits:
        effective = batch * cfg.train.grad_accum
        # a batch size that divides the effective batch keeps it; unless that halves the rows per step
        even = next((b for b in fits if effective % b == 0), 1)
        rows = even if 2 * even >= fits[0] else fits[0]
        accum = math.ceil(effective / rows)
        same = (
            "the same effective batch"
            if rows * accum == effective
            else f"effective batch {rows * accum:,}, was {effective:,}"
        )
        fix = f"try {slot}.batch_size={rows} train.grad_accum={accum} ({same})"
    elif spec.method == "full":
        fix = f"fine-tune with LoRA instead ({slot}-lora) or use a smaller backbone"
    elif need["fewer_layers"]:
        fix = f"adapt fewer layers ({slot}.adapt_layers=2), lower {slot}.max_length, or use a smaller backbone"
    else:
        fix = "use a smaller backbone or a machine with more memory"
    return (
        f"{spec.name} needs about {fmt_bytes(need['total'])} to train (weights {fmt_bytes(need['weights'])}, "
        f"gradients + Adam {fmt_bytes(need['gradients_adam'])}, activations {fmt_bytes(need['activations'])} "
        f"at batch {batch} x {need['tokens']} tokens"
        + (", with the label logits" if need["label_logits"] else "")
        + (f", probe model {fmt_bytes(need['probe_copy'])}" if need["probe_copy"] else "")
        + f") but {device} has {fmt_bytes(free)} free; {fix}"
    )


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
