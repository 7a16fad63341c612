"""Invariants of the model wrapper, checked on tiny random-weight backbones of every family."""

import dataclasses
import json
import shutil
import types

import numpy as np
import pytest
import torch

from tailtune import backbones, methods
from tailtune.classifier import (
    POOLERS,
    TextClassifier,
    _module,
    count_params,
    run_forward,
    tokenize,
)
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig

TEXTS = [
    "I was charged a fee for a convenience check I never ordered",
    "debt collector keeps calling",
    "my mortgage servicer lost my payment in XX/XX/XXXX and reported me late",
    "wrong balance",
]


def _build(arch: str, method: str = "lora", rank: int = 4, pooling: str | None = None):
    bb = backbones.resolve(f"tiny:{arch}")
    tok = backbones.load_tokenizer(bb)
    torch.manual_seed(0)
    base = backbones.load_model(bb, tok)
    model = _module()(base, 5, pooling or bb.pooling, bb.is_decoder)
    model.backbone, targets = methods.get(method).apply(base, bb, MethodConfig(rank=rank, alpha=2 * rank))
    return bb, tok, model, targets


def _logits(model, tok, texts=TEXTS, batch_size=4):
    return run_forward(model, tok, tokenize(tok, texts, 64), batch_size, "fp32", "logits")


@pytest.mark.parametrize("arch", backbones.TINY_ARCHS)
def test_lora_with_b_zero_equals_the_base_model(arch):
    bb, tok, lora_model, targets = _build(arch)
    assert targets
    head_only = _module()(backbones.load_model(bb, tok), 5, bb.pooling, bb.is_decoder)
    head_only.score.load_state_dict(lora_model.score.state_dict())
    # peft initialises B to zero, so the adapted model starts exactly at the base model
    np.testing.assert_allclose(_logits(lora_model, tok), _logits(head_only, tok), atol=1e-5)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    assert np.abs(_logits(lora_model, tok) - _logits(head_only, tok)).max() > 1e-3


@pytest.mark.parametrize("arch", backbones.TINY_ARCHS)
@pytest.mark.parametrize("method", ["lora", "head", "full"])
def test_only_the_method_parameters_and_head_train(arch, method):
    bb, _, model, _ = _build(arch, method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # decoder heads are bias-free, like the stock <Family>ForSequenceClassification score
    head = {"score.weight"} if bb.is_decoder else {"score.weight", "score.bias"}
    assert head <= trainable and ("score.bias" in dict(model.named_parameters())) != bb.is_decoder
    if method == "lora":
        assert all("lora_" in n or n.startswith("score.") for n in trainable)
        assert any("lora_A" in n for n in trainable)
    elif method == "head":
        assert trainable == head
    else:
        assert trainable == {n for n, _ in model.named_parameters()}
    n_trainable, n_total = count_params(model)
    assert 0 < n_trainable <= n_total


@pytest.mark.parametrize("pooling", ["last", "mean"])  # mean: the cpu-real preset's decoder
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_decoder_prediction_ignores_extra_left_padding(arch, pooling):
    _, tok, model, _ = _build(arch, pooling=pooling)
    ids = tokenize(tok, TEXTS[:1], 64)[0]
    short = tok.pad({"input_ids": [ids]}, return_tensors="pt")
    # the same text padded with 20 extra pad tokens on the left
    padded = tok.pad({"input_ids": [ids]}, padding="max_length", max_length=len(ids) + 20, return_tensors="pt")
    assert padded["input_ids"][0, 0] == tok.pad_token_id and padded["attention_mask"][0, 0] == 0
    seen = []  # the positions the backbone is given: the tiny models' rotary embeddings barely
    # move with a constant shift, so equal logits alone did not show that positions skip the padding
    hook = model.backbone.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True
    )
    with torch.no_grad():
        a = model(**short)["logits"]
        b = model(**padded)["logits"]
    hook.remove()
    assert seen[0][0].tolist() == list(range(len(ids))) and seen[1][0, 20:].tolist() == list(range(len(ids)))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # batched with a longer text (so the short one is left-padded) gives the same answer too
    np.testing.assert_allclose(_logits(model, tok, TEXTS[:2], 2)[0], a[0].numpy(), atol=1e-4)


def test_poolers_read_real_tokens_only():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # (B=2, T=4, H=1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert POOLERS["mean"](hidden, right).squeeze(-1).tolist() == [0.5, 5.5]
    assert POOLERS["mean"](hidden, left).squeeze(-1).tolist() == [2.5, 5.5]
    assert POOLERS["cls"](hidden, right).squeeze(-1).tolist() == [0.0, 4.0]
    assert POOLERS["last"](hidden, right).squeeze(-1).tolist() == [1.0, 7.0]
    assert POOLERS["last"](hidden, left).squeeze(-1).tolist() == [3.0, 7.0]
    assert POOLERS["cls"](hidden, left).squeeze(-1).tolist() == [2.0, 4.0]


@pytest.mark.parametrize("arch", backbones.TINY_ARCHS)
@pytest.mark.parametrize("method", ["lora", "full", "head"])
def test_fit_save_load_gives_identical_predictions(tmp_path, arch, method):
    labels = ["fees", "collection", "mortgage", "fees"]
    clf = TextClassifier(
        BackboneConfig(name=f"tiny:{arch}", max_length=32, batch_size=2, eval_batch_size=4),
        method,
        MethodConfig(rank=2, alpha=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32", head_init="random"),
        weighting="sqrt_inverse",
    ).fit(TEXTS, labels)
    # what fit trained, not only what the method's apply marks: the method's parameters and the head
    trainable = {n: p.numel() for n, p in clf.model_.named_parameters() if p.requires_grad}
    if method == "lora":
        assert all("lora_" in n or n.startswith("score.") for n in trainable) and any("lora_A" in n for n in trainable)
    elif method == "head":
        assert set(trainable) <= {"score.weight", "score.bias"}
    else:
        assert len(trainable) == len(list(clf.model_.parameters()))
    assert clf.trainable_params_ == sum(trainable.values())
    before = clf.predict_logits(TEXTS)
    clf.save(tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").rglob("*")}
    assert "head.safetensors" in files and "tailtune.json" in files
    loaded = TextClassifier.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.predict_logits(TEXTS), before, atol=1e-5)
    assert loaded.classes_ == ["collection", "fees", "mortgage"]
    assert loaded.predict(TEXTS) == clf.predict(TEXTS)
    if arch in ("qwen2", "llama"):
        assert loaded.tokenizer_.padding_side == "left"
        assert loaded.tokenizer_.pad_token is not None


@pytest.mark.parametrize(
    ("saved", "native_bf16", "expected"),
    [
        ("fp16", True, "bf16"),
        ("fp16", False, "fp32"),
        ("bf16", False, "fp32"),
        ("bf16", True, "bf16"),
        ("fp32", True, "fp32"),
    ],
)
def test_a_loaded_model_predicts_in_a_precision_this_machine_computes(
    tmp_path, monkeypatch, saved, native_bf16, expected
):
    """A model trained in fp16 on a GPU ran fp16 autocast on a CPU: 12.1 s against 3.8 s in fp32 (a review)."""
    from tailtune import train

    if torch.cuda.is_available():
        pytest.skip("the CPU's choice")
    clf = TextClassifier(
        BackboneConfig(name="tiny:bert", max_length=32, batch_size=2),
        "lora",
        MethodConfig(rank=2, alpha=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32", head_init="random"),
    ).fit(TEXTS, ["a", "b", "a", "b"])
    meta = json.loads((clf.save(tmp_path / "m") / "tailtune.json").read_text())
    (tmp_path / "m" / "tailtune.json").write_text(json.dumps({**meta, "precision": saved}))
    monkeypatch.setattr(train, "cpu_has_fast_bf16", lambda: native_bf16)
    assert TextClassifier.load(tmp_path / "m").precision_ == expected


def test_head_is_trained_and_saved_not_reinitialised(tmp_path):
    clf = TextClassifier(
        BackboneConfig(name="tiny:qwen2", max_length=32, batch_size=2),
        "lora",
        MethodConfig(rank=2, alpha=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32", head_init="random"),
    ).fit(TEXTS, ["a", "b", "a", "b"])
    clf.save(tmp_path / "m")
    # a fresh model with a new random head would not match: prove the saved head is what loads
    loaded = TextClassifier.load(tmp_path / "m")
    torch.testing.assert_close(loaded.model_.score.weight, clf.model_.score.weight)


def test_probe_head_folds_the_scaler_and_matches_sklearn():
    from tailtune.classifier import ProbeClassifier, fit_logreg, softmax

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=300)
    X = rng.normal(size=(300, 16)) * rng.uniform(0.1, 10, size=16) + y[:, None] * 0.7
    pipe, W, b = fit_logreg(X, y, n_classes=6)  # class 5 never seen in training
    proba = softmax(X @ W.T + b)
    np.testing.assert_allclose(proba[:, :5], pipe.predict_proba(X), atol=1e-5)
    assert proba[:, 5].max() < 1e-9
    assert (proba.argmax(1) == pipe.predict(X)).all()
    # C is chosen by cross-validation on train and recorded; val only scores the result
    probe = ProbeClassifier("tiny:bert").fit_features(X[:200], y[:200], list("abcdef"), val=(X[200:], y[200:]))
    assert probe.C_ in ProbeClassifier.C_GRID and 0 <= probe.val_macro_f1_ <= 1
    assert set(probe.C_scores_) == set(ProbeClassifier.C_GRID)
    other_val = ProbeClassifier("tiny:bert").fit_features(
        X[:200], y[:200], list("abcdef"), val=(X[200:], rng.permutation(y[200:]))
    )
    assert other_val.C_ == probe.C_  # the choice does not look at validation labels
    np.testing.assert_array_equal(other_val.W_, probe.W_)
    assert other_val.val_macro_f1_ < probe.val_macro_f1_


def test_a_dead_feature_does_not_blow_up_the_folded_head():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from tailtune.classifier import fit_logreg

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    X = rng.normal(size=(200, 8)) * 0.1 + y[:, None] * 0.05
    X[:, 3] = rng.normal(size=200) * 1e-33  # a dead dimension, as in MiniLM's pooled output
    pipe, W, b = fit_logreg(X, y, n_classes=4)
    assert np.abs(W).max() < 1e4  # stock StandardScaler scaling gives |W| ~ 1e31 here
    plain = LogisticRegression(max_iter=2000, class_weight="balanced").fit(StandardScaler().fit_transform(X), y)
    assert np.abs(plain.coef_[:, 3] / StandardScaler().fit(X).scale_[3]).max() > 1e20  # the failure it prevents
    # the model is the one fitted on the live features alone: the dead one carries nothing
    live = np.delete(X, 3, axis=1)
    alone = LogisticRegression(max_iter=2000, class_weight="balanced").fit(StandardScaler().fit_transform(live), y)
    np.testing.assert_array_equal(pipe.predict(X), alone.predict(StandardScaler().fit_transform(live)))
    np.testing.assert_array_equal((X @ W.T + b).argmax(1), pipe.predict(X))


def _plain_and_imbalanced(**imbalance):
    """(plain 5-class tiny BERT classifier, one sharing its backbone and head with ``imbalance``
    (class_weights= or logit_offset=), a padded batch of TEXTS, labels 0-3)."""
    bb = backbones.resolve("tiny:bert")
    tok = backbones.load_tokenizer(bb)
    plain = _module()(backbones.load_model(bb, tok), 5, bb.pooling, bb.is_decoder)
    other = _module()(plain.backbone, 5, bb.pooling, bb.is_decoder, **imbalance)
    other.score.load_state_dict(plain.score.state_dict())
    return plain, other, tok(TEXTS, padding=True, return_tensors="pt"), torch.tensor([0, 1, 2, 3])


def test_logit_adjusted_loss_adds_the_offset_in_the_loss_only():
    from tailtune.weighting import logit_adjustment

    offset = logit_adjustment([50, 10, 3, 1, 1])
    plain, adjusted, batch, labels = _plain_and_imbalanced(logit_offset=offset)
    a = adjusted(batch["input_ids"], batch["attention_mask"], labels)
    p = plain(batch["input_ids"], batch["attention_mask"], labels)
    torch.testing.assert_close(a["logits"], p["logits"])  # prediction is unchanged
    expected = torch.nn.functional.cross_entropy(p["logits"] + torch.tensor(offset, dtype=torch.float32), labels)
    torch.testing.assert_close(a["loss"], expected)
    assert not torch.isclose(a["loss"], p["loss"])


def test_balanced_sampling_draws_classes_evenly():
    from tailtune.train import _sampling_trainer
    from tailtune.weighting import sample_weights

    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    trainer_cls = _sampling_trainer(y, sample_weights(np.bincount(y)), seed=0)
    sampler = trainer_cls._get_train_sampler(object.__new__(trainer_cls))
    drawn = np.concatenate([y[list(sampler)] for _ in range(30)])
    share = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_allclose(share, 1 / 3, atol=0.05)
    again = trainer_cls._get_train_sampler(object.__new__(trainer_cls))
    assert list(again) == list(trainer_cls._get_train_sampler(object.__new__(trainer_cls)))  # seeded


def _same_twice_in_training(model, tok) -> bool:
    model.train()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        first, second = (model(**batch).last_hidden_state for _ in range(2))
    return torch.equal(first, second)


@pytest.mark.parametrize("arch", backbones.TINY_ARCHS)
def test_set_dropout_reaches_every_dropout_of_the_backbone(arch):
    bb = backbones.resolve(f"tiny:{arch}")
    tok = backbones.load_tokenizer(bb)
    base = backbones.load_model(bb, tok)
    assert backbones.set_dropout(base, 0.3) > 0
    assert not _same_twice_in_training(base, tok)  # attention and hidden dropout now act
    backbones.set_dropout(base, 0.0)
    assert _same_twice_in_training(base, tok)


def test_train_backbone_dropout_is_applied_before_training_and_none_keeps_the_checkpoints():
    from tailtune import weighting

    imbalance = weighting.plan("none", np.array([3, 3]), 1.0)
    kept = TextClassifier("tiny:bert")._build(["a", "b"], imbalance)[0]  # tiny BERT trains with dropout 0.1
    assert not _same_twice_in_training(kept, backbones.load_tokenizer(backbones.resolve("tiny:bert")))
    off = TextClassifier("tiny:bert", train=TrainConfig(backbone_dropout=0.0))._build(["a", "b"], imbalance)[0]
    assert _same_twice_in_training(off, backbones.load_tokenizer(backbones.resolve("tiny:bert")))


def _tiny_clf(arch: str = "bert") -> TextClassifier:
    return TextClassifier(
        BackboneConfig(name=f"tiny:{arch}", max_length=32, batch_size=2, eval_batch_size=4),
        "lora",
        MethodConfig(rank=2, alpha=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32", head_init="random"),
    )


def test_numpy_labels_save_and_load_as_plain_values(tmp_path):
    """np.int64 classes made save() fail in json.dumps and leave a folder without tailtune.json."""
    clf = _tiny_clf().fit(TEXTS, np.array([3, 1, 2, 3]))
    assert clf.classes_ == [1, 2, 3] and all(type(c) is int for c in clf.classes_)
    loaded = TextClassifier.load(clf.save(tmp_path / "model"))
    assert loaded.classes_ == [1, 2, 3] and loaded.predict(TEXTS) == clf.predict(TEXTS)


def test_a_failed_save_leaves_the_old_model_whole(tmp_path, monkeypatch):
    clf = _tiny_clf().fit(TEXTS, ["a", "b", "a", "b"])
    path = clf.save(tmp_path / "model")
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def full_disk(folder):
        (folder / "head.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(clf, "_write", full_disk)
    with pytest.raises(OSError):
        clf.save(path)
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_inputs_a_user_gets_wrong_are_named():
    from sklearn.exceptions import NotFittedError

    from tailtune.classifier import ProbeClassifier
    from tailtune.errors import TailtuneError

    with pytest.raises(NotFittedError):
        _tiny_clf().predict(TEXTS)
    with pytest.raises(NotFittedError):
        ProbeClassifier("tiny:bert").predict_proba(TEXTS)
    with pytest.raises(TailtuneError, match="missing value .* at row 1"):
        _tiny_clf().fit(TEXTS, ["a", None, "a", "b"])
    with pytest.raises(TailtuneError, match="val_labels has 1 label.* not classes, e.g. 'other'"):
        _tiny_clf().fit(TEXTS, ["a", "b", "a", "b"], val_texts=TEXTS[:2], val_labels=["a", "other"])
    clf = _tiny_clf().fit(TEXTS, ["a", "b", "a", "b"])
    with pytest.raises(TypeError, match="got one string"):
        clf.predict("debt collector")  # list() made one text per character
    assert clf.predict([]) == [] and clf.predict_proba([]).shape == (0, 2)
    # an encoder labelled "" from [CLS] [SEP] alone, where a BOS-less decoder refused it
    with pytest.raises(TailtuneError, match=r"text 2 is empty \(nothing but spaces"):
        clf.predict([TEXTS[0], TEXTS[1], " \u200b"])
    with pytest.raises(TailtuneError, match=r"text 1 is empty"):
        _tiny_clf().fit([TEXTS[0], "", *TEXTS[2:]], ["a", "b", "a", "b"])
    with pytest.raises(TailtuneError, match=r"text 0 is empty"):
        ProbeClassifier("tiny:bert").fit(["\t", *TEXTS[1:]], ["a", "b", "a", "b"])


def test_loading_a_probe_folder_as_a_fine_tuned_model_says_what_it_is(tmp_path):
    from tailtune.errors import TailtuneError

    (tmp_path / "tailtune.json").write_text(json.dumps({"kind": "probe", "classes": ["a"]}))
    with pytest.raises(TailtuneError, match="holds a 'probe' system, not a finetune one; .*load_predictor"):
        TextClassifier.load(tmp_path)


@pytest.mark.parametrize(("method", "start_competes"), [("lora", True), ("prompt", False), ("prefix", False)])
def test_the_lp_ft_start_competes_only_where_the_method_keeps_the_output(method, start_competes):
    """Virtual tokens change the output before any step: prompt and prefix were credited with the
    probe's validation score at step 0 and kept a state that scored 0.012, not 0.098."""
    clf = TextClassifier(
        BackboneConfig(name="tiny:bert", max_length=32, batch_size=2, eval_batch_size=4),
        method,
        MethodConfig(rank=2, alpha=4, virtual_tokens=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32"),
    )
    head = (np.zeros((2, 32), np.float32), np.zeros(2, np.float32))
    labels = ["a", "b", "a", "b"]
    clf.fit(TEXTS, labels, val_texts=TEXTS, val_labels=labels, head_init=head, start_val_f1=0.99)  # unbeatable start
    assert (clf.history_["evals"][0]["step"] == 0) is start_competes
    assert (clf.history_["best_step"] == 0) is start_competes


def test_save_never_empties_a_folder_that_is_not_a_model(tmp_path):
    """save() replaced whatever folder it was given: a notebook next to the model was deleted."""
    from tailtune.errors import TailtuneError

    clf = _tiny_clf().fit(TEXTS, ["a", "b", "a", "b"])
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.ipynb").write_text("{}")
    with pytest.raises(TailtuneError, match="holds other files and is not a saved model"):
        clf.save(tmp_path / "work")
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["notes.ipynb"]
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(TailtuneError, match="is a file"):
        clf.save(tmp_path / "model.txt")
    assert (tmp_path / "model.txt").read_text() == "x"
    (tmp_path / "empty").mkdir()
    clf.save(tmp_path / "empty")
    clf.save(tmp_path / "empty")  # an earlier model is replaced
    assert TextClassifier.load(tmp_path / "empty").predict(TEXTS) == clf.predict(TEXTS)
    for target in ("empty", "nowhere"):  # the link was replaced and a hidden one left behind
        (tmp_path / f"link-{target}").symlink_to(tmp_path / target)
        with pytest.raises(TailtuneError, match="is a symbolic link; save to the folder it points to"):
            clf.save(tmp_path / f"link-{target}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link-empty", "link-nowhere", "model.txt", "work"]


def test_the_library_starts_from_the_probe_as_the_cli_does():
    """TrainConfig.head_init was read by `tailtune run` only: the library trained a random head."""
    from tailtune.classifier import ProbeClassifier, lpft_start
    from tailtune.metrics import macro_f1

    labels, val = ["a", "b", "a", "b"], [TEXTS[1], TEXTS[0]]
    frozen = TrainConfig(epochs=1, lr=0.0, head_lr=0.0, precision="fp32")  # the start, kept as it is
    clf = TextClassifier(
        BackboneConfig(name="tiny:bert", max_length=32, batch_size=2, eval_batch_size=4),
        "lora",
        MethodConfig(rank=2, alpha=4),
        frozen,
    ).fit(TEXTS, labels, val_texts=val, val_labels=["b", "a"])
    probe = ProbeClassifier(clf.backbone, seed=0)
    torch.manual_seed(0)  # the tiny model's random weights, as fit builds them
    probe.load_encoder()
    probe.precision_ = "fp32"
    probe.fit_features(probe.features(TEXTS), np.array([0, 1, 0, 1]), ["a", "b"], choose_C=True)
    (W, b), _ = lpft_start(probe, np.array([2, 2]), "none", 1.0)
    np.testing.assert_allclose(clf.predict_logits(TEXTS), probe.features(TEXTS) @ W.T + b, atol=1e-4)
    start = clf.history_["evals"][0]
    assert start["step"] == 0 and start["val_macro_f1"] == macro_f1(
        np.array([1, 0]), np.array([clf.classes_.index(p) for p in clf.predict(val)]), 2
    )
    assert clf.probe_val_macro_f1_ is not None
    random_start = TextClassifier(
        clf.backbone, "lora", MethodConfig(rank=2, alpha=4), dataclasses.replace(frozen, head_init="random")
    ).fit(TEXTS, labels, val_texts=val, val_labels=["b", "a"])
    assert random_start.history_["evals"][0]["step"] > 0 and random_start.probe_val_macro_f1_ is None
    assert not np.allclose(random_start.predict_logits(TEXTS), clf.predict_logits(TEXTS))


def test_fit_without_validation_keeps_the_last_state_and_evaluates_nothing():
    """Without validation rows fit selected and stopped early on the training rows, each time
    with an extra pass over them, while its docstring said validation."""
    clf = _tiny_clf().fit(TEXTS, ["a", "b", "a", "b"])
    assert clf.history_["evals"] == []
    assert clf.history_["best_val_macro_f1"] is None and clf.history_["best_step"] is None
    assert clf.history_["epochs_run"] == 1 and not clf.history_["stopped_early"]


def test_fit_names_the_input_a_user_got_wrong_before_anything_loads(monkeypatch):
    import pandas as pd

    from tailtune.errors import TailtuneError

    def no_model(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the input was checked")

    monkeypatch.setattr(backbones, "load_model", no_model)
    labels = ["a", "b", "a", "b"]
    for texts, y, kwargs, message in [
        (TEXTS, labels[:3], {}, "texts has 4 rows and labels 3"),
        ([], [], {}, "no training texts"),
        ([TEXTS[0], None, *TEXTS[2:]], labels, {}, r"texts\[1\] is a NoneType, not a string"),
        (TEXTS, pd.Series(["a", None, "a", "b"], dtype="string"), {}, "missing value .* at row 1"),
        (TEXTS, pd.array([1, 2, None, 1], dtype="Int64"), {}, "missing value .* at row 2"),
        (TEXTS, ["a"] * 4, {}, "one class \\('a'\\); a classifier needs at least 2"),
        (TEXTS, labels, {"val_texts": TEXTS}, "pass val_texts and val_labels together"),
        (TEXTS, labels, {"val_texts": TEXTS, "val_labels": labels[:2]}, "val_texts has 4 rows and val_labels 2"),
        (TEXTS, labels, {"val_texts": [], "val_labels": []}, "val_texts is empty"),
        (TEXTS, labels, {"classes": ["a", "b", "a"]}, "classes names 'a' twice"),
    ]:
        with pytest.raises(TailtuneError, match=message):
            _tiny_clf().fit(texts, y, **kwargs)


def test_fit_takes_any_iterable_of_texts():
    clf = _tiny_clf().fit((t for t in TEXTS), iter(["a", "b", "a", "b"]))
    assert clf.classes_ == ["a", "b"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train": TrainConfig(epochs=0)}, r"train.epochs must be a number > 0, got 0"),
        ({"train": TrainConfig(lr=-1.0)}, r"train.lr must be a number >= 0, got -1.0"),
        ({"train": TrainConfig(head_init="zeros")}, "train.head_init must be one of"),
        ({"backbone": BackboneConfig(name="tiny:bert", pooling="max")}, "backbone.pooling must be one of"),
        ({"weighting": "bogus"}, "unknown class weighting 'bogus'"),
        ({"method": "adapters"}, "unknown method 'adapters' \\(did you mean 'adapter'\\?\\)"),
        ({"method": "LoRA"}, "did you mean 'lora'"),
        ({"method_config": MethodConfig(targets=["attn"])}, "unknown target role 'attn'"),
        ({"lr": float("nan")}, "lr must be >= 0"),
    ],
)
def test_the_library_checks_settings_as_the_cli_does(kwargs, message):
    from tailtune.errors import TailtuneError

    with pytest.raises(TailtuneError, match=message):
        TextClassifier(**{"backbone": "tiny:bert", **kwargs})


def test_a_damaged_saved_model_is_one_line(tmp_path):
    from tailtune.errors import TailtuneError

    path = _tiny_clf().fit(TEXTS, ["a", "b", "a", "b"]).save(tmp_path / "m")
    meta = (path / "tailtune.json").read_text()
    (path / "tailtune.json").write_text(meta[:-20])
    with pytest.raises(TailtuneError, match="tailtune.json is not readable JSON"):
        TextClassifier.load(path)
    (path / "tailtune.json").write_text(json.dumps({k: v for k, v in json.loads(meta).items() if k != "pooling"}))
    with pytest.raises(TailtuneError, match="tailtune.json lacks 'pooling'"):
        TextClassifier.load(path)
    (path / "tailtune.json").write_text(meta)
    shutil.rmtree(path / "adapter")
    with pytest.raises(TailtuneError, match=f"could not load the model saved in {path}"):
        TextClassifier.load(path)
    (path / "head.safetensors").write_bytes(b"\x08" + bytes(39))  # torn: SafetensorError
    with pytest.raises(TailtuneError, match=f"could not load the model saved in {path}"):
        TextClassifier.load(path)
    (path / "head.safetensors").unlink()
    with pytest.raises(TailtuneError, match=f"could not load the model saved in {path}"):
        TextClassifier.load(path)
    (path / "tailtune.json").write_text(json.dumps({**json.loads(meta), "method_config": {"foo": 1}}))
    with pytest.raises(TailtuneError, match="unexpected keyword argument 'foo'"):
        TextClassifier.load(path)


def _probe_data(seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=300)
    X = rng.normal(size=(300, 16)) * rng.uniform(0.1, 10, size=16) + y[:, None] * 0.7
    return X, y


def test_probe_C_scores_are_out_of_fold_on_train_and_ignore_validation():
    """Fails when the probe chooses C on validation instead of out of fold on train."""
    from tailtune.classifier import ProbeClassifier

    X, y = _probe_data()
    fitted = ProbeClassifier("tiny:bert").fit_features(X[:200], y[:200], list("abcdef"), val=(X[200:], y[200:]))
    reference = ProbeClassifier("tiny:bert")
    chosen = reference._choose_C(X[:200], y[:200], 6)  # train rows only, no validation anywhere
    assert chosen == fitted.C_
    assert fitted.C_scores_ == reference.C_scores_  # every grid score, not just the winner


def test_probe_C_search_scores_a_balanced_model_on_a_long_tail():
    """Fails when the C search's cross-validation fits an unbalanced logistic regression."""
    from tailtune.classifier import ProbeClassifier

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [240, 30, 30])
    X = rng.normal(size=(300, 6))
    X[np.arange(300), y] += 2.5  # each class separable along its own feature
    probe = ProbeClassifier("tiny:bert")
    probe._choose_C(X, y, 3)
    # Balanced, even the strongest regularisation keeps the tail: its out-of-fold macro-F1 is high.
    # Unbalanced, C=0.001 shrinks the weights to nothing and the intercept predicts the head class.
    assert probe.C_scores_[0.001] > 0.7, probe.C_scores_


def test_lpft_start_adds_the_log_training_prior_for_an_unweighted_loss():
    """Fails when the LP-FT start shifts the bias by the log prior with the wrong sign."""
    from tailtune import weighting
    from tailtune.classifier import lpft_start
    from tailtune.metrics import macro_f1

    y_train = np.repeat([0, 1, 2], [60, 6, 2])
    y_val = np.array([0, 0, 1, 2])
    val_features = np.eye(3, dtype=np.float32)[y_val] * 0.1
    probe = types.SimpleNamespace(
        W_=np.eye(3, dtype=np.float32), b_=np.zeros(3, dtype=np.float32), intercept=True, val_macro_f1_=1.0
    )
    counts = np.bincount(y_train)
    (W, b), start = lpft_start(probe, counts, "none", 1.0, (val_features, y_val))
    log_prior = np.log(np.bincount(y_train) / y_train.size)
    np.testing.assert_allclose(b, log_prior - log_prior.max(), rtol=1e-6)  # head class at 0, tail below
    assert b.argmax() == 0 and b[2] < b[1] < 0
    assert start == macro_f1(y_val, (val_features @ W.T + b).argmax(1), 3)
    (_, b_la), _ = lpft_start(probe, counts, "logit_adjusted", 1.0, (val_features, y_val))
    np.testing.assert_allclose(b_la, 0, atol=1e-6)  # logit adjustment aims at the balanced prior
    assert weighting.plan("none", np.bincount(y_train)).prior_shift(np.bincount(y_train)).argmax() == 0


def test_auto_pooling_follows_the_checkpoint_when_fine_tuning_and_probing(tmp_path):
    """Fails when fine-tuning with pooling=auto ignores the checkpoint's trained pooling."""
    from tailtune.classifier import ProbeClassifier

    assert backbones.resolve("tiny:modernbert").pooling == "mean"  # from its classifier_pooling
    clf = TextClassifier(
        BackboneConfig(name="tiny:modernbert", max_length=32, batch_size=2),  # pooling="auto"
        "lora",
        MethodConfig(rank=2, alpha=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32", head_init="random"),
    ).fit(TEXTS, ["a", "b", "a", "b"])
    assert clf.pooling_ == "mean" and clf.model_.pooling == "mean"
    clf.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "tailtune.json").read_text())["pooling"] == "mean"
    probe = ProbeClassifier(BackboneConfig(name="tiny:modernbert", max_length=32)).load_encoder()
    assert probe.pooling_ == "mean" and probe.model_.pooling == "mean"


def test_weighted_loss_uses_the_class_weights_and_fit_passes_them():
    """Fails when class weights never reach the cross-entropy (classifier.PooledClassifier.forward / _build)."""
    from tailtune.weighting import class_weights

    w = class_weights([50, 10, 3, 1, 1], "sqrt_inverse")
    plain, weighted, batch, labels = _plain_and_imbalanced(class_weights=w)
    out = weighted(batch["input_ids"], batch["attention_mask"], labels)
    expected = torch.nn.functional.cross_entropy(out["logits"], labels, weight=torch.tensor(w, dtype=torch.float32))
    torch.testing.assert_close(out["loss"], expected)
    assert not torch.isclose(out["loss"], plain(batch["input_ids"], batch["attention_mask"], labels)["loss"])
    clf = TextClassifier(
        BackboneConfig(name="tiny:bert", max_length=32, batch_size=2),
        "lora",
        MethodConfig(rank=2, alpha=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32", head_init="random"),
        weighting="sqrt_inverse",
    ).fit(TEXTS * 2 + TEXTS[:1], ["a", "b", "a", "a"] * 2 + ["a"])
    counts = np.array([7, 2])
    np.testing.assert_allclose(clf.model_.class_weights.numpy(), class_weights(counts, "sqrt_inverse"), rtol=1e-6)


def test_an_unbeaten_lp_ft_start_is_the_model_fit_returns():
    """Fails when fit does not restore the best validation state (train.fit)."""

    clf = TextClassifier(
        BackboneConfig(name="tiny:bert", max_length=32, batch_size=2, eval_batch_size=4),
        "lora",
        MethodConfig(rank=2, alpha=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32"),
    )
    head = (np.zeros((2, 32), np.float32), np.zeros(2, np.float32))
    labels = ["a", "b", "a", "b"]
    clf.fit(TEXTS, labels, val_texts=TEXTS, val_labels=labels, head_init=head, start_val_f1=0.99)  # unbeatable start
    assert clf.history_["best_step"] == 0
    # the kept state is the start: a zero head (and LoRA's B at zero) gives zero logits
    np.testing.assert_array_equal(clf.model_.score.weight.detach().numpy(), head[0])
    np.testing.assert_array_equal(clf.predict_logits(TEXTS), np.zeros((4, 2), np.float32))


def test_fit_uses_the_configured_logit_tau():
    """Fails when a logit_adjusted fit ignores train.logit_tau."""
    from tailtune.weighting import logit_adjustment

    clf = TextClassifier(
        BackboneConfig(name="tiny:bert", max_length=32, batch_size=2),
        "lora",
        MethodConfig(rank=2, alpha=4),
        TrainConfig(epochs=1, lr=1e-2, head_lr=1e-1, precision="fp32", head_init="random", logit_tau=0.5),
        weighting="logit_adjusted",
    ).fit(TEXTS * 2 + TEXTS[:1], ["a", "b", "a", "a"] * 2 + ["a"])
    expected = logit_adjustment([7, 2], tau=0.5)
    np.testing.assert_allclose(clf.imbalance_.logit_offset, expected)
    np.testing.assert_allclose(clf.model_.logit_offset.numpy(), expected, rtol=1e-6)


def test_scikit_learn_can_clone_score_and_cross_validate_it():
    """TextClassifier had no get_params, so clone, cross_val_score and GridSearchCV failed on it."""
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    clf = _tiny_clf()
    copy = clone(clf).set_params(lr=3e-3, weighting="logit_adjusted")
    assert copy.learning_rate() == 3e-3 and copy.weighting == "logit_adjusted" and clf.lr is None
    assert copy.train == clf.train and copy.train is not clf.train  # deep copies, never shared
    texts, labels = TEXTS * 3, ["a", "b", "a", "b"] * 3
    scores = cross_val_score(clf, texts, labels, cv=2)
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)
    fitted = clone(clf).fit(texts, labels)
    assert fitted.score(texts, labels) == np.mean(np.array(fitted.predict(texts)) == np.array(labels))


def test_predict_top_k_ranks_the_probabilities_as_predict_does():
    """The library had no top-k; `tailtune predict --top-k` and serve did."""
    from tailtune.errors import TailtuneError

    clf = _tiny_clf().fit(TEXTS, ["a", "b", "c", "b"])
    labels, proba = clf.predict_top_k(TEXTS, 2)
    full = clf.predict_proba(TEXTS)
    assert labels[:, 0].tolist() == clf.predict(TEXTS)
    np.testing.assert_allclose(proba[:, 0], full.max(axis=1))
    assert (proba[:, 0] >= proba[:, 1]).all()
    np.testing.assert_allclose(proba[:, 1], np.sort(full, axis=1)[:, -2])
    for k in (0, 4, True):
        with pytest.raises(TailtuneError, match="k must be between 1 and the 3 classes"):
            clf.predict_top_k(TEXTS, k)
