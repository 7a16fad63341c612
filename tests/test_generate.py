"""decoder-generate: constrained label scoring, learning, persistence and the deploy face (tiny decoders)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tailtune import backbones, generate, methods
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig
from tailtune.errors import TailtuneError

ARCHS = ("qwen2", "llama")
# Keyword-distinct classes: each text is mostly words of its class, so the task is learnable
# by a 2-layer model in a few epochs. "credit" is a prefix of "credit card" on purpose.
KEYWORDS = {
    "mortgage": ["escrow", "foreclosure", "house"],
    "credit card": ["card", "charge", "statement"],
    "student loan": ["tuition", "school", "college"],
    "debt collection": ["collector", "calls", "owe"],
}
FILLER = [
    "i",
    "have",
    "a",
    "problem",
    "with",
    "the",
    "company",
    "and",
    "they",
    "did",
    "not",
    "help",
    "me",
    "at",
    "all",
    "please",
    "fix",
    "this",
]
ODD_TEXTS = ["🙂 ¿¿ ### ÷", "x" * 3000, "card " * 400, "?", "\u200bcard"]


def keyword_task(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = list(KEYWORDS)[i % len(KEYWORDS)]
        words = [rng.choice(KEYWORDS[label]) for _ in range(4)] + rng.sample(FILLER, 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """arch -> a tiny decoder whose tied embeddings are scaled up 20x, saved as a backbone folder.

    The stock tiny decoders (std-0.02 tied embeddings after an RMSNorm) keep every logit
    within about +-0.6, so no adapter can move their output far: trained for the keyword task
    they stayed at chance with the loss stuck near log(vocab). Scaling the embeddings gives
    LoRA room to learn in a dozen epochs; the scoring code is the same.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = {}
    for arch in ARCHS:
        tiny = backbones.make_tiny(arch)
        model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(20.0)
        folder = tmp_path_factory.mktemp(f"scaled-{arch}")
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
        folders[arch] = str(folder)
    return folders


def _classifier(name: str, lr: float, epochs: float, prior_tau: float = 0.0) -> generate.GenerativeClassifier:
    return generate.GenerativeClassifier(
        BackboneConfig(name=name, max_length=32, batch_size=8, eval_batch_size=16),
        MethodConfig(rank=8, alpha=16, dropout=0.0, targets=["all"]),
        TrainConfig(epochs=epochs, lr=lr, warmup_ratio=0.0, precision="fp32", early_stopping_patience=100),
        prior_tau=prior_tau,
    )


@pytest.fixture(scope="module")
def trained(learnable):
    """arch -> (classifier trained on the keyword task, test texts, test labels)."""
    train_x, train_y = keyword_task(64, seed=0)
    val_x, val_y = keyword_task(20, seed=1)
    test_x, test_y = keyword_task(40, seed=2)
    return {
        arch: (
            _classifier(learnable[arch], lr=2e-2, epochs=12).fit(train_x, train_y, val_texts=val_x, val_labels=val_y),
            test_x,
            test_y,
        )
        for arch in ARCHS
    }


# ----------------------------------------------------------------------------- scoring


def naive_score_labels(model, prompts: list[list[int]], labels: list[list[int]]) -> np.ndarray:
    """(N, C) the label log-likelihoods of :func:`generate.score_labels` with one full, unpadded
    forward per (prompt, label), no cache."""
    model.eval()
    device = next(model.parameters()).device
    result = np.empty((len(prompts), len(labels)))
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            for c, x in enumerate(labels):
                ids = torch.tensor([p + x], device=device)
                logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)  # (T-1, V)
                targets = ids[0, len(p) :]
                result[i, c] = logp[len(p) - 1 :].gather(-1, targets.unsqueeze(-1)).sum().item()
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_scoring_equals_naive_full_sequence_scoring(arch, monkeypatch):
    bb = backbones.resolve(f"tiny:{arch}")
    tok = backbones.load_tokenizer(bb)
    model = generate.load_causal_lm(bb, tok)
    torch.manual_seed(0)
    model, _ = methods.get("lora").apply(model, bb, MethodConfig(rank=4, alpha=8))
    with torch.no_grad():  # B = 0 would make the adapter a no-op; give it weight
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    labels = generate.encode_labels(tok, ["credit", "credit card", "mortgage", "debt collection", "x"])
    texts = ["my mortgage servicer lost my payment", "a", "collector calls me every day about a debt i do not owe", "?"]
    prompts = generate.encode_prompts(tok, texts, generate.TEMPLATE, 16)
    naive = naive_score_labels(model, prompts, labels)
    # Batches of 3 mix prompt lengths, so left padding and its positions are exercised.
    cached = generate.score_labels(model, tok, prompts, labels, 3, "fp32")
    np.testing.assert_allclose(cached, naive, atol=1e-4, rtol=0)
    monkeypatch.setattr(generate, "LOGITS_BUDGET", 1)  # one label per scoring forward: the chunked path
    np.testing.assert_allclose(generate.score_labels(model, tok, prompts, labels, 2, "fp32"), naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_label_only_logits_give_the_loss_and_gradients_of_a_plain_right_padded_batch(arch):
    """Training built (B, T, vocab) logits though only the label tokens are scored."""
    bb = backbones.resolve(f"tiny:{arch}")
    tok = backbones.load_tokenizer(bb)
    torch.manual_seed(0)
    config = MethodConfig(rank=4, alpha=8, dropout=0.0)  # training mode: no random dropout between the two passes
    model, _ = methods.get("lora").apply(generate.load_causal_lm(bb, tok), bb, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    labels = generate.encode_labels(tok, ["credit", "credit card", "debt collection"])
    texts = ["my mortgage servicer lost my payment", "?", "collector calls me every day about a debt i do not owe"]
    prompts = generate.encode_prompts(tok, texts, generate.TEMPLATE, 24)
    rows = [{"input_ids": p + t, "labels": [-100] * len(p) + t} for p, t in zip(prompts, labels, strict=True)]
    pad = tok.pad_token_id
    width = max(len(r["input_ids"]) for r in rows)  # the plain batch: right-padded, positions 0.. per row
    plain = {
        "input_ids": torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
        "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]),
    }
    batch = generate.collate_label_batch(rows, pad)
    assert batch["logits_to_keep"] == max(len(t) for t in labels) + 1 < width
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(inputs):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        return out.loss.item(), out.logits.shape, [p.grad.clone() for p in trainable]

    loss, shape, grads = loss_and_grads(batch)
    plain_loss, plain_shape, plain_grads = loss_and_grads(plain)
    assert shape[1] == batch["logits_to_keep"] and plain_shape[1] == width
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    for g, h in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


def test_truncation_cuts_the_text_not_the_template():
    tok = backbones.load_tokenizer(backbones.resolve("tiny:qwen2"))
    short, long = generate.encode_prompts(tok, ["card", "card " * 500], generate.TEMPLATE, 24)
    tail = tok("\nIssue:", add_special_tokens=False)["input_ids"]
    assert len(long) == 24 and long[-len(tail) :] == tail and short[-len(tail) :] == tail
    assert long[:3] == short[:3]
    with pytest.raises(TailtuneError, match="max_length"):
        generate.encode_prompts(tok, ["card"], generate.TEMPLATE, 3)


def test_the_prompt_names_the_label_column():
    assert generate.prompt_template("Product") == "Complaint: {text}\nProduct:"
    assert generate.prompt_template("Sub issue ") == "Complaint: {text}\nSub issue:"
    # braces in a column name stay literal, and {text} is still the only field
    assert generate.prompt_template("a{b}").format(text="t") == "Complaint: t\na{b}:"


def test_labels_the_tokenizer_cannot_tell_apart_are_refused():
    tok = backbones.load_tokenizer(backbones.resolve("tiny:qwen2"))  # its vocabulary has neither letter
    with pytest.raises(TailtuneError, match="same tokens"):
        generate.encode_labels(tok, ["é", "ü"])


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("arch", ARCHS)
def test_learns_a_keyword_task_and_lr_zero_does_not(arch, learnable, trained):
    clf, test_x, test_y = trained[arch]
    margin = 0.25  # chance is 1/4
    accuracy = np.mean(np.array(clf.predict(test_x)) == np.array(test_y))
    assert accuracy > 0.25 + margin, clf.history_
    # The control: the same set-up that cannot learn. With lr=0 nothing moves (LoRA B stays
    # 0), so one epoch stands for any number of them.
    train_x, train_y = keyword_task(64, seed=0)
    frozen = _classifier(learnable[arch], lr=0.0, epochs=1).fit(train_x, train_y)
    frozen_accuracy = np.mean(np.array(frozen.predict(test_x)) == np.array(test_y))
    assert frozen_accuracy <= 0.25 + margin


@pytest.mark.parametrize("arch", ARCHS)
def test_always_a_label_from_the_set_with_probabilities_summing_to_one(arch, trained):
    clf, test_x, _ = trained[arch]
    texts = ODD_TEXTS + test_x[:4]
    proba = clf.predict_proba(texts)
    assert proba.shape == (len(texts), len(KEYWORDS)) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert set(clf.predict(texts)) <= set(clf.classes_)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_empty_text_is_refused_as_by_the_classifier_head(arch, trained):
    """The prompt alone gave "" a label (the template's own prior); the head systems refuse it."""
    from tailtune.errors import NoTokens

    clf = trained[arch][0]
    for texts in (["card", ""], ["card", " \n\t"], ["card", "\u200b"]):
        with pytest.raises(NoTokens, match=r"text 1 is empty") as caught:
            clf.predict_proba(texts)
        assert caught.value.rows == [1]


# ----------------------------------------------------------------------------- persistence, deploy


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_deploy_predict_the_same(arch, trained, tmp_path):
    from tailtune import deploy

    clf, test_x, _ = trained[arch]
    texts = test_x[:8] + ODD_TEXTS[:2]
    clf.save(tmp_path / "model")
    reloaded = generate.GenerativeClassifier.load(tmp_path / "model")
    assert reloaded.classes_ == clf.classes_ and reloaded.template == clf.template
    np.testing.assert_array_equal(reloaded.label_scores(texts), clf.label_scores(texts))
    assert deploy.resolve_system(tmp_path)[0] == "generate"
    expected = clf.predict_proba(texts)
    for merged in (False, True):  # LoRA merges into the decoder within float tolerance
        predictor = deploy.load_predictor(tmp_path, merged=merged, precision="fp32", device="cpu")
        assert predictor.classes_ == clf.classes_
        np.testing.assert_allclose(predictor.predict_proba(texts), expected, atol=1e-5)
    int8 = deploy.quantize_int8(predictor)
    assert int8.predict_proba(texts).shape == expected.shape
    # over an earlier model of another kind: replaced whole (its head.safetensors had stayed)
    (tmp_path / "model" / "head.safetensors").write_bytes(b"a classifier's head")
    clf.save(tmp_path / "model")
    assert not (tmp_path / "model" / "head.safetensors").exists()


@pytest.mark.parametrize(
    ("saved", "native_bf16", "expected"),
    [("fp16", True, "bf16"), ("fp16", False, "fp32"), ("bf16", False, "fp32"), ("bf16", True, "bf16")],
)
def test_a_loaded_generator_predicts_in_a_precision_this_machine_computes(
    trained, tmp_path, monkeypatch, saved, native_bf16, expected
):
    """GenerativeClassifier.load took the saved precision as it was: a model trained in fp16 on a
    GPU scored in fp16 autocast on a CPU, as TextClassifier.load no longer does (a review)."""
    import json

    from tailtune import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU, also on a GPU machine
    monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda: native_bf16)
    clf, test_x, _ = trained[ARCHS[0]]
    meta = json.loads((clf.save(tmp_path / "m") / "tailtune.json").read_text())
    (tmp_path / "m" / "tailtune.json").write_text(json.dumps({**meta, "precision": saved}))
    reloaded = generate.GenerativeClassifier.load(tmp_path / "m")
    assert reloaded.precision_ == expected
    if expected == "fp32":
        np.testing.assert_allclose(reloaded.label_scores(test_x[:4]), clf.label_scores(test_x[:4]), atol=1e-5)


def test_parse_system_and_encoder_refused():
    from tailtune.systems import RUNNERS, parse_system

    spec = parse_system("decoder-generate")
    assert (spec.kind, spec.slot) == ("generate", "decoder") and spec.kind in RUNNERS
    assert dict(parse_system("decoder-generate@rank=4+lr=0.001").overrides) == {"rank": 4, "lr": 0.001}
    with pytest.raises(TailtuneError, match="decoder backbone"):
        generate.GenerativeClassifier("tiny:bert").fit(["a", "b"], ["x", "y"])


def test_prior_adjustment_removes_tau_log_train_prior_and_survives_reload(learnable, tmp_path):
    from tailtune import deploy
    from tailtune.classifier import softmax
    from tailtune.systems import parse_system

    assert parse_system("decoder-generate-logit_adjusted").weighting == "logit_adjusted"
    assert parse_system("decoder-generate").weighting == "none"
    x, y = keyword_task(40, seed=0)
    keep = [i for i, label in enumerate(y) if label != y[0] or i < 4]  # one label rarer than the rest
    x, y = [x[i] for i in keep], [y[i] for i in keep]
    clf = _classifier(learnable[ARCHS[0]], lr=0.0, epochs=1, prior_tau=0.5).fit(x, y)
    counts = np.array([y.count(c) for c in clf.classes_], dtype=float)
    assert len(set(counts)) > 1
    texts = keyword_task(6, seed=3)[0]
    raw = clf.label_scores(texts)
    expected = softmax(raw - 0.5 * np.log(counts / counts.sum()))
    np.testing.assert_allclose(clf.predict_proba(texts), expected, atol=1e-12)
    np.testing.assert_allclose(clf.adjust(raw) - raw, np.broadcast_to(-0.5 * np.log(counts / counts.sum()), raw.shape))
    clf.save(tmp_path / "model")
    np.testing.assert_allclose(
        generate.GenerativeClassifier.load(tmp_path / "model").predict_proba(texts), expected, atol=1e-9
    )
    predictor = deploy.load_predictor(tmp_path / "model", merged=False, precision="fp32", device="cpu")
    np.testing.assert_allclose(predictor.predict_proba(texts), expected, atol=1e-9)
    with pytest.raises(TailtuneError, match="prior_tau"):
        _classifier(learnable[ARCHS[0]], lr=0.0, epochs=1, prior_tau=-1.0)


def test_one_epoch_does_not_score_validation(learnable, monkeypatch):
    """With one epoch there is nothing to select, so the costly validation pass is skipped."""
    calls = []
    real = generate.score_labels
    monkeypatch.setattr(generate, "score_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = keyword_task(16, seed=0)
    val_x, val_y = keyword_task(8, seed=1)
    clf = _classifier(learnable[ARCHS[0]], lr=1e-3, epochs=1).fit(x, y, val_texts=val_x, val_labels=val_y)
    assert calls == [] and clf.history_["best_val_macro_f1"] is None
    assert all(e["val_macro_f1"] is None for e in clf.history_["evals"])
    two = _classifier(learnable[ARCHS[0]], lr=1e-3, epochs=2).fit(x, y, val_texts=val_x, val_labels=val_y)
    assert len(calls) == 2 and two.history_["best_val_macro_f1"] is not None


def test_a_run_reads_the_causal_lm_once_and_hands_out_copies():
    import torch

    backbone = backbones.resolve("tiny:qwen2")
    tok = backbones.load_tokenizer(backbone)
    with backbones.shared_loads() as shared:
        first = generate.load_causal_lm(backbone, tok)
        second = generate.load_causal_lm(backbone, tok)
        assert shared["reads"]["model"] == 1
    assert first is not second
    weight = next(first.parameters())
    before = next(second.parameters()).clone()
    with torch.no_grad():
        weight.add_(1.0)  # training one copy leaves the other as read
    assert torch.equal(next(second.parameters()), before)


def test_a_generate_system_prints_and_records_its_lr_and_settings(tmp_path, learnable):
    """The README says the rate used is printed and recorded per system; generate did neither."""
    import json

    import pandas as pd
    from test_input_matrix import run_smoke

    texts, labels = keyword_task(120, seed=0)
    pd.DataFrame({"Consumer complaint narrative": texts, "Issue": labels}).to_csv(tmp_path / "k.csv", index=False)
    name = "decoder-generate@lr=0.02+epochs=12+rank=8"
    out = tmp_path / "run"
    result = run_smoke(
        tmp_path / "k.csv",
        out,
        f"decoder.name={learnable['qwen2']}",
        "train.eval_per_epoch=1",
        "method.targets=[all]",
        "method.dropout=0",
        "train.warmup_ratio=0",
        "decoder.batch_size=8",
        systems=name,
    )  # the recipe of `trained`, which learns the keyword task
    assert "label generation, lr 0.02;" in " ".join(result.stdout.split()), result.output
    info = json.loads((out / "systems" / name / "metrics.json").read_text())["system"]
    assert info["lr"] == 0.02 and info["settings"] == {"lr": 0.02, "epochs": 12, "rank": 8}


def test_fit_interrupted_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """decoder-generate trained in a temporary folder with no checkpoints: an interrupted run
    started over from step 0 (a review). It now resumes as the classifiers do, and the epoch
    that ended at the checkpoint's step keeps its validation score."""
    from test_resume import _without_volatile, interrupt_at_step

    train_x, train_y = keyword_task(64, seed=0)
    val_x, val_y = keyword_task(16, seed=1)

    def fit(work_dir=None):
        return _classifier("tiny:qwen2", lr=1e-2, epochs=4).fit(
            train_x, train_y, val_texts=val_x, val_labels=val_y, work_dir=work_dir
        )

    reference = fit()
    assert [e["step"] for e in reference.history_["evals"]] == [8, 16, 24, 32]  # 8 steps an epoch
    interrupt_at_step(monkeypatch, 19, lambda: fit(tmp_path))  # a checkpoint each epoch (8 steps): resumes from 16
    resumed = fit(tmp_path)
    assert resumed.history_["resumed_at_steps"] == [16]
    assert _without_volatile(resumed.history_) == _without_volatile(reference.history_)
    np.testing.assert_array_equal(resumed.label_scores(val_x), reference.label_scores(val_x))
    again = fit(tmp_path)  # finished: kept from the last checkpoint, not trained further
    np.testing.assert_array_equal(again.label_scores(val_x), reference.label_scores(val_x))


@pytest.mark.distributed
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, learnable):
    """Under torchrun, fit counted the steps of one process: 2 processes trained 8 epochs for 4,
    scored validation every second epoch, and marked their checkpoints as one process's (a review).
    As for the classifiers (tests/test_distributed.py), 2 processes x batch 8 train on the rows
    of 1 process x batch 8 x grad_accum 2."""
    import json
    import os
    import subprocess
    import sys

    import pandas as pd

    texts, labels = keyword_task(160, seed=0)  # split 112/24/24: 7 global batches of 16 an epoch
    pd.DataFrame({"Consumer complaint narrative": texts, "Issue": labels}).to_csv(tmp_path / "k.csv", index=False)

    def history(out, *extra: str) -> dict:
        command = [
            sys.executable,
            "-m",
            "tailtune.cli",
            "run",
            "smoke",
            "--data",
            str(tmp_path / "k.csv"),
            f"decoder.name={learnable['qwen2']}",
            "decoder.batch_size=8",
            "decoder.eval_batch_size=8",
            "method.dropout=0",
            "method.targets=[all]",
            "train.lr=0.02",
            "train.warmup_ratio=0",
            "train.epochs=4",
            "train.eval_per_epoch=2",
            "train.early_stopping_patience=100",
            "--systems",
            "decoder-generate",
            "--no-report",
            "--out",
            str(out),
            *extra,
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "COLUMNS": "120", "TOKENIZERS_PARALLELISM": "false"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads((out / "systems" / "decoder-generate" / "metrics.json").read_text())["system"]["training"]

    one = history(tmp_path / "one", "train.grad_accum=2")
    two = history(tmp_path / "two", "--processes", "2")
    assert one["steps"] == two["steps"] == 28 and two["epochs_run"] == 4
    assert [(e["step"], e["val_macro_f1"]) for e in two["evals"]] == [
        (e["step"], e["val_macro_f1"]) for e in one["evals"]
    ]
    assert two["best_step"] == one["best_step"]
    for x, y in zip(one["losses"], two["losses"], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]


@pytest.mark.parametrize(
    ("labels_written", "status", "note"),
    [
        (1, "failed", "collapsed: generates one label"),
        (2, "ok", "predicts only 2 of 8 classes on test; likely cause"),
    ],
)
def test_a_generator_that_writes_one_or_few_labels_is_failed_or_warned(
    tmp_path, monkeypatch, small_csv, labels_written, status, note
):
    """The guards of the head systems, for decoder-generate (its coverage warning had no test)."""
    import pandas as pd
    from test_input_matrix import run_smoke

    from tailtune.generate import GenerativeClassifier

    def narrow(self, scores):
        out = np.full_like(scores, -9.0)
        out[np.arange(len(out)), np.arange(len(out)) % labels_written] = 0.0
        return out

    monkeypatch.setattr(GenerativeClassifier, "adjust", narrow)
    result = run_smoke(small_csv, tmp_path / "run", systems="decoder-generate")
    row = pd.read_csv(tmp_path / "run" / "comparison.csv").iloc[0]
    assert row["status"] == status and note in row["note"], (row.to_dict(), result.output)
