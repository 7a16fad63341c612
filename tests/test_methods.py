"""Every registered method trains, reloads identically and (where it can) merges, on tiny models."""

import dataclasses

import numpy as np
import pytest
import torch

from tailtune import backbones, deploy, methods
from tailtune.classifier import TextClassifier, _module, run_forward, tokenize
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig
from tailtune.errors import TailtuneError

TEXTS = [
    "I was charged a fee for a convenience check I never ordered",
    "debt collector keeps calling",
    "my mortgage servicer lost my payment and reported me late",
    "wrong balance on my statement",
    "the collector called my work",
    "escrow shortage raised my mortgage payment",
]
LABELS = ["fees", "collection", "mortgage", "fees", "collection", "mortgage"]
TRAINED_HERE = [m for m in methods.METHODS if m != "qlora"]  # qlora needs a CUDA GPU
ARCHS = ["bert", "modernbert", "mpnet", "qwen2"]


def _applies(method: str, arch: str) -> bool:
    # ModernBERT's and MPNet's attention take no past key/values; ModernBERT has no bias terms
    if method == "prefix":
        return arch not in ("modernbert", "mpnet")
    return not (method == "bitfit" and arch == "modernbert")


def _classifier(arch: str, method: str) -> TextClassifier:
    return TextClassifier(
        BackboneConfig(name=f"tiny:{arch}", max_length=32, batch_size=3, eval_batch_size=6),
        method,
        MethodConfig(rank=2, alpha=4, virtual_tokens=4, bottleneck=8),
        TrainConfig(epochs=2, head_lr=1e-1, precision="fp32", head_init="random", warmup_ratio=0.0),
        lr=5e-2,
    )


def _method_state(model) -> dict:
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("score.")
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", TRAINED_HERE)
def test_method_trains_reloads_identically_and_merges(tmp_path, monkeypatch, arch, method):
    if not _applies(method, arch):
        pytest.skip("refused: see the refusal tests below")
    clf = _classifier(arch, method)
    # fit() applies the method to a fresh base; capture the method's starting weights through it
    start = {}
    apply = methods.get(method).apply

    def capture(model, *args):
        out = apply(model, *args)
        start.update(_method_state(out[0]))
        return out

    monkeypatch.setitem(methods.METHODS, method, dataclasses.replace(methods.get(method), apply=capture))
    clf.fit(TEXTS, LABELS)
    trained = _method_state(clf.model_.backbone)
    if method == "head":
        assert trained == {}
    else:
        # the method's own parameters (not only the head) moved during training
        assert trained and any(not torch.equal(trained[n], start[n]) for n in trained)
    before = clf.predict_logits(TEXTS)
    clf.save(tmp_path / "m")
    loaded = TextClassifier.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.predict_logits(TEXTS), before, atol=1e-5)
    if methods.get(method).mergeable:
        merged = deploy.merge_backbone(loaded.model_.backbone)
        assert not any(hasattr(m, "base_layer") or ".adapter_" in n for n, m in merged.named_modules())
        loaded.model_.backbone = merged
        np.testing.assert_allclose(loaded.predict_logits(TEXTS), before, atol=1e-4)


@pytest.mark.parametrize("method", ["adapter", "prompt", "prefix", "ia3", "dora"])
def test_decoder_methods_ignore_extra_left_padding(method):
    bb = backbones.resolve("tiny:qwen2")
    tok = backbones.load_tokenizer(bb)
    torch.manual_seed(0)
    base = backbones.load_model(bb, tok)
    model = _module()(base, 3, bb.pooling, bb.is_decoder)
    model.backbone, _ = methods.get(method).apply(base, bb, MethodConfig(virtual_tokens=4, bottleneck=8))
    with torch.no_grad():  # move every method weight off its (often identity) start
        for n, p in model.named_parameters():
            if p.requires_grad and not n.startswith("score."):
                p.add_(0.1 * torch.randn_like(p))
    ids = tokenize(tok, TEXTS, 32)
    alone = run_forward(model, tok, ids[1:2], 1, "fp32", "logits")
    batched = run_forward(model, tok, ids, 6, "fp32", "logits")  # the short text is left-padded here
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-4)


def test_prompt_tokens_are_prepended_and_dropped_before_pooling():
    bb = backbones.resolve("tiny:bert")
    tok = backbones.load_tokenizer(bb)
    base = backbones.load_model(bb, tok)
    model = _module()(base, 3, "mean", False)
    model.backbone, _ = methods.get("prompt").apply(base, bb, MethodConfig(virtual_tokens=5))
    batch = tok.pad({"input_ids": tokenize(tok, TEXTS[:2], 32)}, return_tensors="pt")
    hidden = model.hidden(batch["input_ids"], batch["attention_mask"])
    assert hidden.shape[1] == batch["input_ids"].shape[1]  # (B, T, H): prompt positions removed
    first = model(**batch)["logits"]
    with torch.no_grad():
        model.backbone.prompt_encoder["default"].embedding.weight.add_(torch.randn(5, 32))
    assert not torch.allclose(first, model(**batch)["logits"])  # ...but the prompt is attended to


@pytest.mark.parametrize("arch", ["modernbert", "mpnet"])
def test_prefix_is_refused_where_attention_ignores_it(arch):
    bb = backbones.resolve(f"tiny:{arch}")
    base = backbones.load_model(bb, backbones.load_tokenizer(bb))
    with pytest.raises(TailtuneError, match=f"prefix tuning does not apply to {arch}"):
        methods.get("prefix").apply(base, bb, MethodConfig())


@pytest.mark.parametrize("arch", ["llama", "modernbert"])
def test_bitfit_is_refused_on_a_model_without_biases(arch):
    bb = backbones.resolve(f"tiny:{arch}")  # neither family has a bias term
    base = backbones.load_model(bb, backbones.load_tokenizer(bb))
    with pytest.raises(TailtuneError, match="bitfit needs bias terms"):
        methods.get("bitfit").apply(base, bb, MethodConfig())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_is_refused_on_cpu():
    bb = backbones.resolve("tiny:bert")
    base = backbones.load_model(bb, backbones.load_tokenizer(bb))
    with pytest.raises(TailtuneError, match="qlora needs a CUDA GPU"):
        methods.get("qlora").apply(base, bb, MethodConfig())


def test_adapter_starts_as_the_base_model_and_only_adapters_train():
    bb = backbones.resolve("tiny:bert")
    tok = backbones.load_tokenizer(bb)
    torch.manual_seed(0)
    plain = _module()(backbones.load_model(bb, tok), 3, "mean", False)
    adapted = _module()(backbones.load_model(bb, tok), 3, "mean", False)
    adapted.score.load_state_dict(plain.score.state_dict())
    adapted.backbone, names = methods.get("adapter").apply(adapted.backbone, bb, MethodConfig(bottleneck=8))
    assert len(names) == 2 * 2  # tiny bert: 2 layers x (attention output, FFN output)
    ids = tokenize(tok, TEXTS, 32)
    np.testing.assert_allclose(
        run_forward(adapted, tok, ids, 6, "fp32", "logits"),
        run_forward(plain, tok, ids, 6, "fp32", "logits"),
        atol=1e-6,
    )
    body = {n for n, p in adapted.backbone.named_parameters() if p.requires_grad}
    assert body and all(".adapter_" in n for n in body)


def test_learning_rate_comes_from_the_system_then_the_paper_then_the_config():
    train = TrainConfig(lr=7e-4)
    assert TextClassifier("tiny:bert", "lora", train=train).learning_rate() == 7e-4
    assert TextClassifier("tiny:bert", "prompt", train=train).learning_rate() == methods.get("prompt").lr
    assert TextClassifier("tiny:bert", "prompt", train=train, lr=0.1).learning_rate() == 0.1
    assert TextClassifier(BackboneConfig("tiny:bert", lr=3e-4), "dora", train=train).learning_rate() == 3e-4


def test_every_method_says_whether_it_merges():
    stays_in_forward = {name for name, m in methods.METHODS.items() if not m.mergeable}
    assert stays_in_forward == {"adapter", "prompt", "prefix"}
