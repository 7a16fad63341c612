"""The bundled pretrained models end to end (marked ``real``: slower, needs scripts/setup.sh)."""

import json
from pathlib import Path

import numpy as np
import pytest

from tailtune import backbones
from tailtune.classifier import ProbeClassifier, TextClassifier
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig

pytestmark = pytest.mark.real

TEXTS = [
    "I was charged an overdraft fee twice on my checking account",
    "The debt collector keeps calling me about a debt I do not owe",
    "My credit report shows an account that is not mine",
    "The bank charged me a monthly maintenance fee without notice",
    "A collection agency threatened to sue me over a medical bill",
    "There is incorrect information on my credit report from XXXX",
] * 2
LABELS = ["fees", "collection", "report", "fees", "collection", "report"] * 2


def test_bundled_encoder_is_a_mean_pooled_sentence_transformer():
    bb = backbones.resolve("bundled:minilm")
    assert (bb.model_type, bb.is_decoder, bb.pooling) == ("bert", False, "mean")


def test_a_text_the_bundled_encoder_reads_as_cls_sep_alone_is_not_classified():
    """A review: U+0483 (and U+FE0F, a lone accent, ...) became [CLS] [SEP], and predict gave it a
    confident label; a text of only its added tokens has nothing to classify."""
    from tailtune.data import blank
    from tailtune.errors import NoTokens

    tok = backbones.load_tokenizer(backbones.resolve("bundled:minilm"))
    assert tok("\u0483")["input_ids"] == [tok.cls_token_id, tok.sep_token_id] and not blank(["\u0483"])[0]
    with pytest.raises(NoTokens, match=r"text 1 \('\u0483'\) has no tokens for this tokenizer") as caught:
        backbones.tokenize(tok, ["a fee", "\u0483"], 32)
    assert caught.value.rows == [1]
    # these are blank already (tailtune.data.blank): refused before the tokenizer, and dropped by clean()
    assert blank(["\ufe0f", "\u0301", "\u3164", "\u2800", "\U000e0020"]).all()


def test_bundled_decoder_gguf_converts_to_a_plain_llama_folder():
    bb = backbones.resolve("bundled:smollm2")
    assert (bb.model_type, bb.is_decoder, bb.pooling) == ("llama", True, "last")
    config = json.loads((Path(bb.path) / "config.json").read_text())
    assert "quantization_config" not in config
    assert (Path(bb.path) / "model.safetensors").exists()
    tok = backbones.load_tokenizer(bb)
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert backbones.resolve("bundled:smollm2").path == bb.path  # converted once, then cached


def test_minilm_probe_separates_obvious_classes():
    probe = ProbeClassifier("bundled:minilm").fit(TEXTS, LABELS)
    assert probe.predict(TEXTS) == LABELS


@pytest.mark.parametrize("name", ["bundled:minilm", "bundled:smollm2"])
def test_lora_on_bundled_models_trains_saves_and_reloads(tmp_path, name):
    clf = TextClassifier(
        BackboneConfig(name=name, max_length=32, batch_size=4, eval_batch_size=12),
        "lora",
        MethodConfig(rank=4, alpha=8),
        TrainConfig(epochs=1, lr=5e-4, head_lr=5e-3, head_init="random"),
    ).fit(TEXTS, LABELS)
    assert 0 < clf.trainable_params_ < 0.05 * clf.total_params_
    before = clf.predict_logits(TEXTS)
    clf.save(tmp_path / "m")
    np.testing.assert_allclose(TextClassifier.load(tmp_path / "m").predict_logits(TEXTS), before, atol=1e-4)


@pytest.mark.parametrize("name", ["bundled:minilm", "bundled:smollm2"])
def test_long_texts_are_cut_without_changing_the_ids_on_the_real_tokenizers(name, monkeypatch):
    """WordPiece and byte-level BPE: cutting a long text first gives the ids of tokenising it whole."""
    from tailtune import generate

    tok = backbones.load_tokenizer(backbones.resolve(name))
    long = " ".join(TEXTS) * 500 + "\n\n  café — 12,345.67 "
    texts = [long, long.replace(" ", "  "), "no" * 5000 + " " + long]
    assert all(len(c) < len(t) for c, t in zip(backbones.clip_long(tok, texts, 256), texts, strict=True))
    # BERT's normalizer deletes a form feed: a cut there made two words of one [UNK] word
    ref = "a9f" * 20
    texts.append("page one of my statement " * 24 + ref + "\f" + ref + "." + "x." * 6000 + " " + long)
    cut = backbones.tokenize(tok, texts, 256), generate.encode_prompts(tok, texts, generate.TEMPLATE, 128)
    monkeypatch.setattr(backbones, "CHARS_PER_TOKEN", 10**9)  # never cut: tokenise whole
    assert backbones.clip_long(tok, texts, 256) == texts
    whole = backbones.tokenize(tok, texts, 256), generate.encode_prompts(tok, texts, generate.TEMPLATE, 128)
    assert cut == whole
