"""Memory plan: what fine-tuning a config holds in memory, per method and backbone, without training.

For each (slot, method) :func:`plan` reports parameters (trainable / total) and bytes of

- ``weights``: every parameter and buffer as training holds it (fp32 master weights;
  autocast makes low-precision copies on the fly, and those count as activations);
- ``grads``: one gradient per trainable parameter, in the parameter's dtype;
- ``optimizer``: AdamW's ``exp_avg`` and ``exp_avg_sq`` per trainable parameter, plus its
  4-byte ``step`` counter;
- ``activations``: the tensors the forward pass saves for backward at the slot's
  ``batch_size`` x ``max_length``, at the precision training uses (loss included);
- ``total``: their sum. A training step's measured peak is within -10% / +15% of it
  (``tests/test_plan.py``): backward adds in-flight gradients the plan leaves out (LoRA:
  peak ~6% above), and frees activations as parameter gradients appear (full: ~2% below);
- ``checkpoint``: what ``save`` writes, taken as the trainable tensors (adapter + head);
  file headers and configs add a few KiB.

Activations are counted, not modelled: the backbone is built from its config on the meta
device (no weights read, none initialised), the method is applied, and one forward pass runs
on fake tensors (``FakeTensorMode``: the shapes, dtypes and kernel choices of the real device,
no storage) inside ``saved_tensors_hooks``, adding up each saved storage once. A method that fake
tensors cannot run (LoHa and LoKr draw a random number to decide on module dropout) gets real
forwards of one and two rows with random weights, extrapolated linearly to the batch size;
``activations_from`` says which. A method that refuses the backbone or the machine, or
whose trainable tensors never reach the loss, is a row with its ``error``.
"""

from __future__ import annotations

from tailtune.config import BackboneConfig, Config, DataConfig, MethodConfig
from tailtune.errors import TailtuneError

FIELDS = ("weights", "grads", "optimizer", "activations")


GENERATE = "generate"  # the decoder LoRA-tuned to write the label (decoder-generate), as a plan row


def plan(cfg: Config, methods: list[str] | None = None, n_classes: int | None = None) -> list[dict]:
    """One row per (slot, method) for the slots the config's systems use (all methods by default).

    ``n_classes`` sizes the head; None counts the classes of ``cfg.data`` (the demo corpus's,
    or the labels in ``data.path`` after cleaning). The decoder also gets a ``generate`` row
    when ``methods`` names it, or by default when the config has a decoder-generate system: its
    causal-LM head's logits at the label positions replace the classification head, with the
    data's longest label (tokens + eos; 16 tokens with ``n_classes`` given, as names are unknown).
    By default, a system with its own settings (``encoder-lora@rank=64``) also gets a row of
    its own, named by the system.
    """
    from tailtune import backbones, systems
    from tailtune import methods as registry
    from tailtune.train import resolve_precision

    if n_classes is not None and n_classes < 2:
        raise TailtuneError(f"--classes must be at least 2 (a classifier needs two classes), got {n_classes}")
    specs = [systems.parse_system(n) for n in cfg.systems]
    names = list(methods) if methods else list(registry.METHODS)
    if methods is None and any(s.kind == "generate" for s in specs):
        names.append(GENERATE)
    for name in names:
        if name != GENERATE:
            registry.get(name)
    used = [s for s in systems.SLOTS if any(spec.slot == s for spec in specs)]
    if GENERATE in names and "decoder" not in used:
        used.append("decoder")
    classes = None if n_classes is not None else class_names(cfg.data)
    n_classes = n_classes or len(classes)
    precision = resolve_precision(cfg.train.precision)
    rows = []
    for slot in used or list(systems.SLOTS):
        bb_cfg: BackboneConfig = getattr(cfg, slot)
        backbone = backbones.resolve(bb_cfg.name)
        for name in names:
            if name == GENERATE and slot != "decoder":
                continue
            try:
                if name == GENERATE:
                    row = {
                        **plan_one(
                            backbone,
                            bb_cfg,
                            "lora",
                            cfg.method,
                            n_classes,
                            precision,
                            label_tokens=_longest_label(backbone, classes),
                        ),
                        "method": GENERATE,
                    }
                else:
                    row = plan_one(backbone, bb_cfg, name, cfg.method, n_classes, precision)
            except TailtuneError as exc:
                row = {"method": name, "error": str(exc)}
            rows.append({"slot": slot, "backbone": bb_cfg.name, **row})
        if methods is None:  # a system with its own settings (encoder-lora@rank=64) is planned as it trains
            for spec in (s for s in specs if s.slot == slot and s.overrides and s.kind in ("finetune", "generate")):
                method_cfg, _, spec_bb, _ = spec.configs(cfg)
                try:
                    label_tokens = _longest_label(backbone, classes) if spec.kind == "generate" else None
                    row = {
                        **plan_one(
                            backbone, spec_bb, spec.method, method_cfg, n_classes, precision, label_tokens=label_tokens
                        ),
                        "method": spec.name,
                    }
                except TailtuneError as exc:
                    row = {"method": spec.name, "error": str(exc)}
                rows.append({"slot": slot, "backbone": spec_bb.name, **row})
    return rows


def class_names(data: DataConfig) -> list[str]:
    """The classes the head will have: the demo corpus's, or the cleaned data file's."""
    from tailtune.data import clean, load_frame

    frame, _ = load_frame(data)
    return sorted(clean(frame, data)[0]["label"].unique())


def _longest_label(backbone, classes: list[str] | None) -> int:
    """Tokens of the longest label as decoder-generate writes it (with eos); 16 without names."""
    from tailtune import backbones
    from tailtune.generate import longest_label, require_decoder

    if classes is None:
        require_decoder(backbone)
        return 16
    return longest_label(backbone, backbones.load_tokenizer(backbone), classes)


def plan_one(
    backbone,
    bb_cfg: BackboneConfig,
    method: str,
    method_cfg: MethodConfig,
    n_classes: int,
    precision: str,
    device: str | None = None,
    label_tokens: int | None = None,
) -> dict:
    """The plan of ``method`` on one resolved backbone; raises TailtuneError when the method refuses.

    With ``label_tokens``, the model is the causal LM that decoder-generate trains: prompts of
    ``max_length`` tokens + that many label tokens, logits at the label positions only
    (:func:`tailtune.generate.collate_label_batch`).
    """
    import torch

    from tailtune.generate import require_decoder
    from tailtune.preflight import check_method_positions

    if label_tokens is not None:
        require_decoder(backbone)
    check_method_positions(method, "", method, method_cfg, bb_cfg, backbone)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch, length = bb_cfg.batch_size, bb_cfg.max_length
    try:
        model = build(backbone, bb_cfg, method, method_cfg, n_classes, "meta", label_tokens is not None)
        activations, reached = trace_forward(model, batch, length, precision, device, True, label_tokens)
        source = "fake forward"
    except TailtuneError:
        raise
    except Exception:  # the method needs real values to apply or run: real rows, extrapolated
        from tailtune.preflight import available_memory
        from tailtune.report import fmt_bytes

        weights = sum(
            p.nbytes
            for p in build(
                backbone, bb_cfg, method, method_cfg, n_classes, "meta", label_tokens is not None
            ).parameters()
        )
        free, where = available_memory()
        if weights > free:  # random weights would be allocated here: refuse before, not by running out
            raise TailtuneError(
                f"{method} on {backbone.model_type} is measured with real forwards, and its weights alone "
                f"({fmt_bytes(weights)}) exceed the {fmt_bytes(free)} free on {where}"
            ) from None
        model = build(backbone, bb_cfg, method, method_cfg, n_classes, device, label_tokens is not None)
        one, reached = trace_forward(model, 1, length, precision, device, False, label_tokens)
        two, _ = trace_forward(model, 2, length, precision, device, False, label_tokens)
        # Two sizes, not one row times the batch: LoHa/LoKr save weight-sized products once per step.
        activations = one + (batch - 1) * (two - one)
        source = "real forwards of 1 and 2 rows, extrapolated"
    core = getattr(model, "backbone", model)  # the causal LM has no separate head module
    adapted = [n for n, p in core.named_parameters() if p.requires_grad]
    if adapted and not any(id(p) in reached for p in core.parameters() if p.requires_grad):
        raise TailtuneError(
            f"{method} does not apply to {backbone.model_type}: none of its {len(adapted)} trainable "
            f"tensors (e.g. {adapted[0]}) reaches the loss, so it cannot change the output"
        )
    sizes = state_bytes(model, reached)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "method": method,
        "model_type": backbone.model_type,
        "trainable": trainable,
        "params": total,
        "trainable_pct": 100 * trainable / total,
        **sizes,
        "activations": activations,
        "total": sum(sizes.values()) + activations,
        "checkpoint": sum(p.nbytes for p in model.parameters() if p.requires_grad),
        "batch_size": batch,
        "max_length": length + (label_tokens or 0),
        "precision": precision,
        "device": device,
        "activations_from": source,
        "error": None,
    }


def build(
    backbone,
    bb_cfg: BackboneConfig,
    method: str,
    method_cfg: MethodConfig,
    n_classes: int,
    device: str,
    causal: bool = False,
):
    """The classifier training would build (backbone from its config, method applied, head), on ``device``;
    with ``causal``, the causal LM with the method applied, as decoder-generate trains it.

    On "meta" nothing is allocated; elsewhere the weights are random, never read from disk.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from tailtune import methods
    from tailtune.backbones import quiet_transformers
    from tailtune.classifier import _module

    quiet_transformers()
    config = AutoConfig.from_pretrained(backbone.path)
    pooling = bb_cfg.pooling if bb_cfg.pooling != "auto" else backbone.pooling
    with torch.device(device):
        if causal:
            base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            return methods.get(method).apply(base, backbone, method_cfg, bb_cfg.adapt_layers)[0]
        base = AutoModel.from_config(config, dtype=torch.float32)
        model = _module()(base, n_classes, pooling, backbone.is_decoder)
        model.backbone, _ = methods.get(method).apply(base, backbone, method_cfg, bb_cfg.adapt_layers)
    return model


def state_bytes(model, reached: set[int]) -> dict:
    """Bytes of weights (parameters + buffers), gradients and AdamW state, as training allocates them.

    Only trainable parameters in ``reached`` (ids of those the loss depends on) get a gradient
    and optimizer state: BERT's pooler, say, is trainable under full fine-tuning but unused.
    """
    learning = [p for p in model.parameters() if p.requires_grad and id(p) in reached]
    return {
        "weights": sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers()),
        "grads": sum(p.nbytes for p in learning),
        # exp_avg and exp_avg_sq like the parameter, and a float32 step counter per tensor
        "optimizer": sum(2 * p.nbytes + 4 for p in learning),
    }


def trace_forward(
    model, batch: int, length: int, precision: str, device: str, fake: bool, label_tokens: int | None = None
) -> tuple[int, set[int]]:
    """(bytes the forward of (batch, length) tokens saves for backward, ids of the parameters the loss reaches).

    Each saved storage counts once (views and tensors saved by several ops share it);
    parameters and buffers are not counted (they are weights). ``fake`` first swaps the meta
    model's tensors for fake ones on ``device``, so no memory is used and nothing is computed.
    With ``label_tokens``, ``model`` is a causal LM fed as decoder-generate trains it: each row
    ``length`` prompt tokens + the label's, logits and loss at the last ``label_tokens + 1``.
    """
    import contextlib
    import logging
    from itertools import chain

    import torch

    from tailtune.classifier import autocast

    saved: dict[int, tuple[int, object]] = {}  # storage -> (bytes, tensor); held so no id is reused
    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
    # An op fake tensors cannot run is logged there with a traceback; the caller falls back.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with mode:
            if fake:
                model.to_empty(device=device)
                for module in model.modules():  # to_empty unties lm_head from the embeddings; tie again
                    if hasattr(module, "tie_weights") and hasattr(module, "get_output_embeddings"):
                        module.tie_weights()
                        break
            held = {t.untyped_storage()._cdata for t in chain(model.parameters(), model.buffers())}

            def pack(t):
                storage = t.untyped_storage()
                if storage._cdata not in held and storage._cdata not in saved:
                    saved[storage._cdata] = (storage.nbytes(), t)
                return t

            width = length + (label_tokens or 0)
            ids = torch.zeros(batch, width, dtype=torch.long, device=device)  # (B, T)
            mask = torch.ones(batch, width, dtype=torch.long, device=device)
            inputs = {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": torch.zeros(batch, dtype=torch.long, device=device),
            }
            if label_tokens is not None:
                keep = label_tokens + 1
                positions = torch.arange(width, device=device).expand(batch, width)
                labels = torch.zeros(batch, keep, dtype=torch.long, device=device)
                inputs |= {"position_ids": positions, "labels": labels, "logits_to_keep": keep}
            model.train()  # dropout masks are saved too
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, torch.device(device)):
                loss = model(**inputs)["loss"]
    finally:
        fake_log.setLevel(level)
    return sum(nbytes for nbytes, _ in saved.values()), _leaves(loss)


def _leaves(loss) -> set[int]:
    """ids of the leaf tensors the autograd graph of ``loss`` accumulates gradients into."""
    found, seen, stack = set(), {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node  # held: a collected node's id could be reused
        if hasattr(node, "variable"):  # AccumulateGrad
            found.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


# ----------------------------------------------------------------------------- printing


def print_plan(rows: list[dict], console) -> None:
    from rich.table import Table
    from rich.text import Text

    from tailtune.report import fmt_bytes

    first = next((r for r in rows if r.get("error") is None), None)
    caption = (
        f"fp32 weights + AdamW; activations at batch x length per slot, {first['precision']} on {first['device']}"
        if first
        else None
    )
    table = Table(title="memory plan (one training step)", caption=caption)
    for column in ("slot", "method", "trainable", "%", *FIELDS, "total", "checkpoint", "batch x len", "note"):
        table.add_column(
            column, justify="left" if column in ("slot", "method", "note") else "right", no_wrap=column == "method"
        )  # a system's name with its settings, whole
    for r in rows:
        if r.get("error"):
            table.add_row(r["slot"], r["method"], *[""] * 9, Text(r["error"], style="yellow"))
            continue
        note = "" if r["activations_from"] == "fake forward" else r["activations_from"]
        table.add_row(
            r["slot"],
            r["method"],
            f"{r['trainable']:,}",
            f"{r['trainable_pct']:.2f}",
            *[fmt_bytes(r[f]) for f in FIELDS],
            f"[bold]{fmt_bytes(r['total'])}[/]",
            fmt_bytes(r["checkpoint"]),
            f"{r['batch_size']} x {r['max_length']}",
            note,
        )
    console.print(table)
