"""tailtune.plan against real models: counts, state bytes and checkpoint size exactly, the total
against the measured peak of a real training step within a stated tolerance."""

from __future__ import annotations

import json

import pytest

from tailtune import backbones, methods
from tailtune.config import BackboneConfig, MethodConfig, load_config
from tailtune.errors import TailtuneError
from tailtune.plan import build, plan, plan_one

ARCHS = ("bert", "modernbert", "qwen2")
N_CLASSES = 5
METHOD_CFG = MethodConfig(rank=4, alpha=8, virtual_tokens=4, bottleneck=8)


def _real_model(backbone, method: str):
    """The classifier as TextClassifier.fit builds it: the saved weights loaded, the method applied."""
    import torch

    from tailtune.classifier import _module

    torch.manual_seed(0)
    base = backbones.load_model(backbone, backbones.load_tokenizer(backbone))
    model = _module()(base, N_CLASSES, backbone.pooling, backbone.is_decoder)
    model.backbone, _ = methods.get(method).apply(base, backbone, METHOD_CFG, None)
    return model


def _one_step(model) -> dict:
    """Bytes held after one real AdamW step, read off the tensors themselves."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    ids = torch.randint(5, 100, (2, 12))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]))["loss"]
    loss.backward()
    grads = sum(p.grad.nbytes for p in trainable if p.grad is not None)  # BERT's pooler: unused, no grad
    optimizer.step()
    return {
        "weights": sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers()),
        "grads": grads,
        "optimizer": sum(v.nbytes for s in optimizer.state.values() for v in s.values()),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_plans_the_real_models_counts_and_bytes(arch, tmp_path):
    """Per registered method: refuses iff the real apply refuses; otherwise parameter counts,
    weights, gradients and AdamW state equal the real model's after one step, exactly, and the
    checkpoint is what ``save`` writes up to file headers and configs."""
    from safetensors.torch import save_file

    backbone = backbones.resolve(f"tiny:{arch}")
    bb_cfg = BackboneConfig(name=f"tiny:{arch}", batch_size=2, max_length=12)
    for name in methods.METHODS:
        try:
            real = _real_model(backbone, name)
        except TailtuneError as exc:
            with pytest.raises(TailtuneError):
                plan_one(backbone, bb_cfg, name, METHOD_CFG, N_CLASSES, "fp32")
            print(f"{arch} {name}: refused ({exc})")
            continue
        planned = plan_one(backbone, bb_cfg, name, METHOD_CFG, N_CLASSES, "fp32")
        trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
        assert (planned["trainable"], planned["params"]) == (trainable, sum(p.numel() for p in real.parameters())), name
        assert {k: planned[k] for k in ("weights", "grads", "optimizer")} == _one_step(real), name
        folder = tmp_path / f"{arch}-{name}"
        folder.mkdir()
        methods.get(name).save(real.backbone, folder)
        save_file({k: v.contiguous() for k, v in real.score.state_dict().items()}, str(folder / "head.safetensors"))
        written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        # bitfit saves every bias (also untrained ones; here all are trained); headers, JSON
        # configs and peft's README are the rest.
        assert 0 <= written - planned["checkpoint"] <= 16_384, (name, written, planned["checkpoint"])


def test_plan_refuses_prefix_on_modernbert_and_qlora_on_cpu():
    import torch

    cfg = load_config("smoke", ["encoder.name=tiny:modernbert"])
    rows = {(r["slot"], r["method"]): r for r in plan(cfg, ["lora", "prefix", "qlora"])}
    assert set(rows) == {(s, m) for s in ("encoder", "decoder") for m in ("lora", "prefix", "qlora")}
    assert rows["encoder", "lora"]["error"] is None and rows["encoder", "lora"]["activations"] > 0
    assert rows["encoder", "prefix"]["error"]  # ModernBERT has no past key/values for a prefix
    assert rows["decoder", "prefix"]["error"] is None
    if not torch.cuda.is_available():
        assert "CUDA" in rows["encoder", "qlora"]["error"]


def test_a_method_measured_with_real_forwards_is_refused_when_its_weights_do_not_fit(monkeypatch):
    """LoHa cannot run on fake tensors, so it is measured on random weights; those must fit first."""
    from tailtune import preflight

    cfg = load_config("smoke")
    backbone = backbones.resolve(cfg.encoder.name)
    assert plan_one(backbone, cfg.encoder, "loha", cfg.method, 5, "fp32")["activations_from"].startswith("real")
    monkeypatch.setattr(preflight, "available_memory", lambda: (2048, "test RAM"))
    # the same units as plan's table (GiB, MiB, KiB); this said kB (1e3) and the table KiB
    with pytest.raises(
        TailtuneError,
        match=r"loha on bert is measured with real forwards, and its weights alone "
        r"\([0-9.]+ [MK]iB\) exceed the 2.0 KiB free on test RAM",
    ):
        plan_one(backbone, cfg.encoder, "loha", cfg.method, 5, "fp32")


# ----------------------------------------------------------------------------- measured peak

# Big enough that the activations (~100-300 MB at batch 16 x 128 tokens) dwarf small buffers.
DIMS = dict(
    vocab_size=512,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    max_position_embeddings=512,
)
BATCH, LENGTH = 16, 128
# Planned total / measured peak must lie in [LOW, HIGH]. Why not 1: the measured peak also
# holds backward's in-flight gradients (of the op being differentiated: up to two tensors the
# size of the largest activation), which the plan leaves out; and the plan adds gradients to
# all activations, although backward frees activations as gradients appear (full fine-tuning
# is planned above its peak). Measured below: 0.94-0.95 with LoRA, 1.0x with full.
LOW, HIGH = 0.90, 1.15


def _config_folder(tmp_path, arch: str):
    import transformers as tf

    if arch == "bert":
        config = tf.BertConfig(**DIMS)
    elif arch == "modernbert":
        config = tf.ModernBertConfig(
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
            global_attn_every_n_layers=1,
            classifier_pooling="mean",
            **DIMS,
        )
    else:
        config = tf.Qwen2Config(num_key_value_heads=2, eos_token_id=0, bos_token_id=0, **DIMS)
    folder = tmp_path / arch
    config.save_pretrained(folder)  # the config alone: plan reads no weights, the step uses random ones
    return str(folder)


def measured_peak(model, batch: int, length: int, label_tokens: int | None = None) -> int:
    """Peak bytes of torch tensors alive during a steady-state training step (fp32, AdamW, clipping).

    Steady state: a first step creates AdamW's state, which every later step holds from its
    start; the second step is measured. The profiler records every allocation and free of
    torch's CPU allocator with a timestamp, so the live-bytes curve is exact, and neither other
    processes nor malloc's retained arenas (which ru_maxrss would count) blur it. Peak = bytes
    alive before the step (weights, optimizer state, inputs) + the curve's highest point.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(5, 500, (batch, length + (label_tokens or 0)))
    mask, labels = torch.ones_like(ids), torch.randint(0, N_CLASSES, (batch,))
    extra = {}
    if label_tokens is not None:  # decoder-generate's batch: logits at the label positions only
        from tailtune import generate

        rows = [{"input_ids": r.tolist(), "labels": [-100] * length + r[length:].tolist()} for r in ids]
        batch_in = generate.collate_label_batch(rows, 0)
        labels, extra = (
            batch_in["labels"],
            {"position_ids": batch_in["position_ids"], "logits_to_keep": label_tokens + 1},
        )
    model.train()

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values())
    before = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers()) + state
    return before + ids.nbytes + mask.nbytes + labels.nbytes + peak


@pytest.mark.parametrize(
    "arch,method",
    [
        ("bert", "lora"),
        ("bert", "full"),
        ("modernbert", "lora"),
        ("qwen2", "lora"),
        ("bert", "prompt"),
        ("bert", "prefix"),
        ("qwen2", "prompt"),
        ("qwen2", "prefix"),
    ],
)
def test_total_is_near_the_measured_peak_of_a_training_step(arch, method, tmp_path):
    """Prompt and prefix tuning backpropagate through every layer, so backward's in-flight
    gradients, which the plan leaves out, are a larger share of their peak: measured 0.85-0.94
    (2026-12-02), against 0.94-1.02 for LoRA and full; they get a lower bound of 0.85."""
    low = 0.85 if method in ("prompt", "prefix") else LOW
    import torch

    folder = _config_folder(tmp_path, arch)
    backbone = backbones.resolve(folder)
    method_cfg = MethodConfig(rank=8, alpha=16, dropout=0.1)

    def planned(batch: int) -> int:
        bb_cfg = BackboneConfig(name=folder, batch_size=batch, max_length=LENGTH)
        return plan_one(backbone, bb_cfg, method, method_cfg, N_CLASSES, "fp32")["total"]

    torch.manual_seed(0)
    model = build(backbone, BackboneConfig(name=folder), method, method_cfg, N_CLASSES, "cpu")
    peak = measured_peak(model, BATCH, LENGTH)
    ratio = planned(BATCH) / peak
    print(json.dumps({"arch": arch, "method": method, "planned": planned(BATCH), "measured": peak, "ratio": ratio}))
    assert low <= ratio <= HIGH
    # The tolerance has teeth: planning twice the batch that ran falls outside it.
    assert not low <= planned(2 * BATCH) / peak <= HIGH


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_generate_total_is_near_the_measured_peak_of_its_training_step(arch, tmp_path):
    """decoder-generate was planned as a classifier: no vocabulary logits, no label tokens."""
    import torch

    folder = _config_folder(tmp_path, arch)
    backbone = backbones.resolve(folder)
    method_cfg = MethodConfig(rank=8, alpha=16, dropout=0.1)
    label_tokens = 6

    def planned(batch: int) -> int:
        bb_cfg = BackboneConfig(name=folder, batch_size=batch, max_length=LENGTH)
        row = plan_one(backbone, bb_cfg, "lora", method_cfg, N_CLASSES, "fp32", label_tokens=label_tokens)
        assert row["max_length"] == LENGTH + label_tokens
        return row["total"]

    torch.manual_seed(0)
    model = build(backbone, BackboneConfig(name=folder), "lora", method_cfg, N_CLASSES, "cpu", causal=True)
    peak = measured_peak(model, BATCH, LENGTH, label_tokens)
    ratio = planned(BATCH) / peak
    print(json.dumps({"arch": arch, "method": "generate", "planned": planned(BATCH), "measured": peak, "ratio": ratio}))
    assert LOW <= ratio <= HIGH
    assert not LOW <= planned(2 * BATCH) / peak <= HIGH


def test_plan_adds_a_generate_row_for_a_decoder_generate_system():
    cfg = load_config("smoke", ["systems=[tfidf-logreg,decoder-generate]"])
    rows = plan(cfg, None, None)
    generate_rows = [r for r in rows if r["method"] == "generate"]
    assert [r["slot"] for r in generate_rows] == ["decoder"] and generate_rows[0]["error"] is None
    assert {r["slot"] for r in rows} == {"decoder"}  # tfidf-logreg has no backbone
    only = plan(cfg, ["generate"], 5)
    assert [(r["slot"], r["method"]) for r in only] == [("decoder", "generate")]
    assert only[0]["max_length"] == cfg.decoder.max_length + 16  # no class names: 16 label tokens


def test_a_system_with_its_own_settings_is_planned_with_them():
    """plan used the config's method settings for every row, so encoder-lora@rank=64 was planned at rank 16."""
    cfg = load_config("smoke", ["systems=[encoder-lora,encoder-lora@rank=64]"])
    rows = {r["method"]: r for r in plan(cfg, None, 5)}
    assert rows["encoder-lora@rank=64"]["trainable"] > 4 * rows["lora"]["trainable"]  # the preset's rank is 4


def test_plan_rows_name_what_training_would_refuse_and_keep_tied_weights_tied():
    """A system's settings beyond the position table crashed plan; an encoder under decoder-generate
    crashed it or was planned; the fake forward untied lm_head and counted it twice."""
    rows = plan(load_config("smoke", ["systems=[encoder-prompt@virtual_tokens=600]"]), None, 5)
    row = next(r for r in rows if r["method"] == "encoder-prompt@virtual_tokens=600")
    assert "virtual tokens exceed the 512 positions of bert" in row["error"]
    cfg = load_config("smoke", ["decoder.name=tiny:bert", "systems=[encoder-lora,decoder-generate@rank=8]"])
    rows = {(r["slot"], r["method"]): r for r in plan(cfg, None, None)}  # did not abort the other rows
    assert rows[("encoder", "lora")]["error"] is None
    assert "needs a decoder backbone" in rows[("decoder", "decoder-generate@rank=8")]["error"]
    for name in ("tiny:mpnet", "tiny:bert"):
        (row,) = plan(load_config("smoke", [f"decoder.name={name}"]), ["generate"], 12)
        assert "decoder-generate needs a decoder backbone" in row["error"]
    lora, generate = plan(load_config("smoke"), ["lora", "generate"], 12)[-2:]
    head = 12 * 32  # hidden 32, no bias on a decoder head
    assert generate["weights"] == lora["weights"] - 4 * head  # lm_head is the embedding matrix, once


# ----------------------------------------------------------------------------- command line


def test_plan_command_prints_a_table():
    from typer.testing import CliRunner

    from tailtune.cli import app

    result = CliRunner().invoke(
        app, ["plan", "smoke", "--methods", "lora, head,qlora", "--classes", "7"], env={"COLUMNS": "200"}
    )  # a space after a comma is not part of the name (a review: "unknown method ' head'")
    assert result.exit_code == 0, result.output
    for word in ("memory plan", "encoder", "decoder", "lora", "head", "activations", "checkpoint"):
        assert word in result.output
    twice = CliRunner().invoke(app, ["plan", "smoke", "--methods", "lora,lora"])
    assert twice.exit_code == 2 and "--methods 'lora,lora' names 'lora' twice" in twice.output


@pytest.mark.parametrize("arch", ARCHS)
def test_fake_forward_counts_what_a_real_forward_saves(arch):
    """The fake-tensor count against the same forward on real tensors, and the two-row
    extrapolation (the fallback) against a real forward of the full batch."""
    from tailtune.plan import trace_forward

    backbone = backbones.resolve(f"tiny:{arch}")
    bb_cfg = BackboneConfig(name=f"tiny:{arch}")
    fake, _ = trace_forward(build(backbone, bb_cfg, "lora", METHOD_CFG, N_CLASSES, "meta"), 8, 24, "fp32", "cpu", True)
    model = build(backbone, bb_cfg, "lora", METHOD_CFG, N_CLASSES, "cpu")
    real, _ = trace_forward(model, 8, 24, "fp32", "cpu", False)
    one, two = (trace_forward(model, b, 24, "fp32", "cpu", False)[0] for b in (1, 2))
    print(arch, fake, real, one + 7 * (two - one))
    # Fake tensors count as tracing, so transformers always builds the attention masks there; a
    # real all-ones mask is skipped. Those (B, 1, T, T) fp32 masks are the only allowed difference
    # (measured: none on BERT, two on ModernBERT (global and sliding window) and on Qwen2).
    assert 0 <= fake - real <= 2 * 8 * 24 * 24 * 4
    assert one + 7 * (two - one) == real


@pytest.mark.parametrize("classes", [-5, 0, 1])
def test_a_head_of_fewer_than_two_classes_is_refused(classes):
    """A review: -5 was an internal RuntimeError, and 0 silently planned the config's classes."""
    with pytest.raises(TailtuneError, match=f"--classes must be at least 2 .*got {classes}"):
        plan(load_config("smoke"), ["lora"], classes)
