"""Pre-flight checks: each one triggered, each a one-line message, none of them after training starts.

Run-level checks must stop ``tailtune run`` with exit code 2 before a run directory exists;
the padding check runs inside ``TextClassifier.fit`` on the model built for training, before
its first step.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_input_matrix import TEXT, assert_error, run_smoke

from tailtune import backbones, classifier, preflight
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig, load_config
from tailtune.data import prepare
from tailtune.errors import TailtuneError
from tailtune.systems import Context, parse_system


def _pooled(arch: str):
    """(PooledClassifier on tiny ``arch`` with 5 classes, its tokenizer) as fit builds them."""
    backbone = backbones.resolve(f"tiny:{arch}")
    tokenizer = backbones.load_tokenizer(backbone)
    torch.manual_seed(0)
    base = backbones.load_model(backbone, tokenizer)
    return classifier._module()(base, 5, backbone.pooling, backbone.is_decoder), tokenizer


@pytest.fixture()
def texts(small_frame):
    return small_frame[TEXT].tolist()[:40]


# ----------------------------------------------------------------------------- data


def test_classes_too_small_for_a_validation_split(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(f"{TEXT},Issue\n" + "".join(f"text {c} {i},{c}\n" for c in "ABCD" for i in range(2)))
    out = tmp_path / "run"
    assert_error(
        run_smoke(path, out, systems="tfidf-logreg,encoder-probe"),
        out,
        "no validation rows",
        "fewer than 3 rows",
        "encoder-probe",
    )
    assert run_smoke(path, out).exit_code == 0  # tf-idf needs no validation split
    # data inspect said "problems found: none" for it
    from rich.console import Console

    from tailtune.config import DataConfig
    from tailtune.data import inspect_data

    console = Console(record=True, width=300)
    inspect_data(DataConfig(path=str(path)), console)
    assert "- no validation rows (every class has fewer than 3 rows)" in console.export_text()


# ----------------------------------------------------------------------------- tokenizer and padding


def test_decoder_without_pad_or_eos_token(tmp_path, small_csv):
    folder = tmp_path / "no-pad-decoder"
    shutil.copytree(backbones.make_tiny("llama"), folder)  # (a Qwen2 tokenizer class adds its own eos)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert_error(
        run_smoke(small_csv, out, f"decoder.name={folder}", systems="decoder-lora"),
        out,
        "neither a pad nor an eos token",
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama", "bert", "modernbert", "mpnet"])
def test_padding_check_passes_on_correct_models(arch, texts):
    model, tokenizer = _pooled(arch)
    preflight.check_padding(model, tokenizer, texts, max_length=32)


def test_padding_check_catches_a_pooler_that_reads_padding(texts, monkeypatch):
    model, tokenizer = _pooled("qwen2")
    monkeypatch.setitem(classifier.POOLERS, "last", lambda hidden, mask: hidden[:, -1])
    preflight.check_padding(model, tokenizer, texts, max_length=32)  # left padding: -1 is real
    monkeypatch.setitem(classifier.POOLERS, "last", lambda hidden, mask: hidden[:, 0])
    with pytest.raises(TailtuneError, match="predictions change with padding") as err:
        preflight.check_padding(model, tokenizer, texts, max_length=32)
    assert "\n" not in str(err.value)


def test_padding_check_catches_right_padding_and_unknown_pad_id(texts):
    model, tokenizer = _pooled("qwen2")
    tokenizer.padding_side = "right"
    with pytest.raises(TailtuneError, match="pads on the right"):
        preflight.check_padding(model, tokenizer, texts, max_length=32)
    tokenizer.padding_side = "left"
    model.backbone.config.pad_token_id = None
    with pytest.raises(TailtuneError, match="pad_token_id is None"):
        preflight.check_padding(model, tokenizer, texts, max_length=32)


def test_fit_checks_padding_on_its_own_model_before_training(small_frame, monkeypatch):
    from tailtune import train

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "fit", no_training)
    seen = []
    real = preflight.check_padding
    monkeypatch.setattr(preflight, "check_padding", lambda model, *a, **k: (seen.append(model), real(model, *a, **k)))
    clf = classifier.TextClassifier(
        BackboneConfig(name="tiny:qwen2", max_length=32),
        "lora",
        MethodConfig(rank=4, alpha=8),
        TrainConfig(precision="fp32"),
    )
    texts, labels = small_frame[TEXT].tolist(), small_frame["Issue"].tolist()
    with pytest.raises(AssertionError, match="training started"):
        clf.fit(texts, labels)
    assert seen == [clf.model_]  # the model being trained, not a second copy
    real_load = backbones.load_model

    def forgetful(backbone, tokenizer):
        model = real_load(backbone, tokenizer)
        model.config.pad_token_id = None
        return model

    monkeypatch.setattr(backbones, "load_model", forgetful)
    with pytest.raises(TailtuneError, match="pad_token_id"):
        clf.fit(texts, labels)


def test_run_refuses_a_right_padding_decoder_tokenizer(tmp_path, small_csv, monkeypatch):
    real = backbones.load_tokenizer

    def right_padded(backbone):
        tokenizer = real(backbone)
        tokenizer.padding_side = "right"
        return tokenizer

    monkeypatch.setattr(backbones, "load_tokenizer", right_padded)
    out = tmp_path / "run"
    assert_error(run_smoke(small_csv, out, systems="decoder-lora"), out, "decoder 'tiny:qwen2'", "pads on the right")


# ----------------------------------------------------------------------------- precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a CUDA machine")
def test_fp16_without_a_gpu(tmp_path, small_csv):
    out = tmp_path / "run"
    assert_error(
        run_smoke(small_csv, out, "train.precision=fp16", systems="encoder-lora"), out, "fp16 needs a CUDA GPU"
    )
    # also in a run with no fine-tuning: its config.yaml kept fp16, and systems trained into it later got it
    assert_error(
        run_smoke(small_csv, out, "train.precision=fp16", systems="tfidf-logreg"), out, "fp16 needs a CUDA GPU"
    )


def _t4(monkeypatch):
    """A T4 (compute capability 7.5) as torch sees one: bf16 tensors can be made there (emulated)."""
    import types

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(major=7, minor=5))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda *a: True)


def test_bf16_on_a_gpu_without_bf16(tmp_path, small_csv, monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a T4 (emulation), so auto chose bf16 there and an
    explicit bf16 was accepted; the test patched is_bf16_supported itself and could not see it."""
    from tailtune.bench import bf16_support
    from tailtune.train import resolve_precision

    _t4(monkeypatch)
    assert torch.cuda.is_bf16_supported()  # what torch says on a T4
    assert resolve_precision("auto") == "fp16"
    assert bf16_support(torch.device("cuda")) == "this GPU has no native bf16 (e.g. a T4)"
    with pytest.raises(TailtuneError, match="this GPU does not support bf16"):
        resolve_precision("bf16")
    out = tmp_path / "run"
    assert_error(
        run_smoke(small_csv, out, "train.precision=bf16", systems="encoder-lora"), out, "does not support bf16"
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: __import__("types").SimpleNamespace(major=8))
    assert resolve_precision("auto") == "bf16"  # an A100 or later


# ----------------------------------------------------------------------------- target roles and memory


def test_target_role_matching_no_module(tmp_path, small_csv, monkeypatch):
    monkeypatch.setitem(backbones.ROLE_PATTERNS, "bert", {**backbones.ROLE_PATTERNS["bert"], "ffn": r"no_such_module$"})
    out = tmp_path / "run"
    assert_error(
        run_smoke(small_csv, out, systems="tfidf-logreg,encoder-lora"),
        out,
        "target role 'ffn' matches no module in this bert model",
    )


def _need(system: str, small_frame, *overrides: str, label_tokens: int | None = None):
    """(config, pre-flight's memory estimate for ``system`` on the smoke preset at its max_length, classes)."""
    cfg = load_config("smoke", [f"systems={system}", *overrides])
    data = prepare(cfg.data, frame=small_frame, source="test")
    spec = parse_system(system)
    backbone = backbones.resolve(getattr(cfg, spec.slot).name)
    seq_len = getattr(cfg, spec.slot).max_length
    return (
        cfg,
        preflight.training_memory(spec, cfg, backbone, len(data.classes), seq_len, label_tokens),
        len(data.classes),
    )


@pytest.mark.parametrize("system", ["encoder-lora", "encoder-full", "encoder-prompt", "decoder-lora", "decoder-head"])
def test_memory_estimate_is_the_plan_row_plus_the_probe_model(small_frame, system):
    """Pre-flight's estimate was its own rule of thumb, 0.6-2.0x of a measured training step by
    method (head-only: 0.03x); it is now tailtune plan's traced row, calibrated against
    measured peaks in test_plan.py, plus the probe model that stays loaded for LP-FT."""
    from tailtune.plan import plan

    cfg, need, n_classes = _need(system, small_frame)
    spec = parse_system(system)
    row = next(r for r in plan(cfg, methods=[spec.method], n_classes=n_classes) if r["slot"] == spec.slot)
    assert need["activations"] == row["activations"] > 0  # prompt tuning was planned at 0 activation bytes
    assert need["weights"] == row["weights"] and need["gradients_adam"] == row["grads"] + row["optimizer"]
    assert need["probe_copy"] > 0  # smoke's head_init is the probe's
    assert need["total"] == row["total"] + need["probe_copy"]
    _, random_head, _ = _need(system, small_frame, "train.head_init=random")
    assert random_head["probe_copy"] == 0 and random_head["total"] == row["total"]


def test_memory_estimate_scales_with_the_batch(small_frame):
    _, full, _ = _need("encoder-full", small_frame)
    _, lora, _ = _need("encoder-lora", small_frame)
    assert full["gradients_adam"] > 10 * lora["gradients_adam"]  # every weight trains
    assert preflight.at_batch(lora, 16) == lora["total"]
    assert lora["total"] - preflight.at_batch(lora, 1) == lora["activations"] - lora["activations"] // 16


@pytest.mark.parametrize(
    ("system", "free", "advice"),
    [
        ("encoder-lora", "between", "try encoder.batch_size="),
        ("encoder-lora", 1000, "use a smaller backbone or a machine with more memory"),  # tiny bert has 2 layers
        ("encoder-full", 1000, "fine-tune with LoRA instead (encoder-lora)"),
    ],
)
def test_not_enough_memory_suggests_what_fits(tmp_path, small_csv, small_frame, monkeypatch, system, free, advice):
    if free == "between":  # room for batch 2 but not the configured 16
        free = preflight.at_batch(_need(system, small_frame)[1], 2) + 1
    monkeypatch.setattr(preflight, "available_memory", lambda: (free, "test RAM"))
    out = tmp_path / "run"
    line = assert_error(
        run_smoke(small_csv, out, systems=system), out, f"{system} needs about", "test RAM", "probe model", advice
    )
    if advice.startswith("try"):
        assert "encoder.batch_size=2 train.grad_accum=8" in line


def test_systems_that_train_the_same_model_are_traced_once(monkeypatch):
    """Weighting and lr do not change the model; a trace costs about 2.5 s on the bundled models."""
    systems = ["encoder-lora", "encoder-lora-weighted", "encoder-lora@rank=2", "decoder-lora"]
    cfg = load_config("smoke", [f"systems=[{','.join(systems)}]"])
    data = prepare(cfg.data)
    traced = []
    real = preflight.training_memory

    def recording(spec, *args, **kwargs):
        traced.append(spec.name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(preflight, "training_memory", recording)
    preflight.check_backbones(Context(cfg, data, None, None), [parse_system(s) for s in systems])
    assert traced == ["encoder-lora", "encoder-lora@rank=2", "decoder-lora"]


def test_not_enough_memory_for_any_batch_suggests_fewer_adapted_layers_where_that_helps():
    need = {
        "total": 10**9,
        "weights": 10**8,
        "gradients_adam": 10**6,
        "activations": 8 * 10**8,
        "probe_copy": 0,
        "batch_size": 16,
        "tokens": 256,
        "label_logits": False,
        "fewer_layers": True,
    }
    spec, cfg = parse_system("encoder-lora"), load_config("smoke")
    assert "adapt fewer layers (encoder.adapt_layers=2), lower encoder.max_length" in preflight._memory_message(
        spec, cfg, need, 10**6, "test RAM"
    )
    assert "use a smaller backbone" in preflight._memory_message(spec, cfg, {**need, "fewer_layers": False}, 10**6, "x")


def test_the_suggested_batch_keeps_the_effective_batch_or_says_it_does_not():
    """encoder.batch_size=4000000 was told "batch_size=102477 grad_accum=40 (the same effective
    batch)": 4,099,080 rows."""
    spec, cfg = parse_system("encoder-lora"), load_config("smoke")
    need = {
        "total": 10**9,
        "weights": 0,
        "gradients_adam": 0,
        "activations": 10**9,
        "probe_copy": 0,
        "batch_size": 16,
        "tokens": 256,
        "label_logits": False,
        "fewer_layers": True,
    }
    room = 7 * 10**9 // 16 + 1  # batch 7 fits: 8 divides 16 but does not fit, 4 is the largest that does
    assert "batch_size=4 train.grad_accum=4 (the same effective batch)" in preflight._memory_message(
        spec, cfg, need, room, "x"
    )
    prime = {**need, "batch_size": 13}
    room = 12 * 10**9 // 13 + 1  # batch 12 fits; 13 is prime, and batch 1 would be twelve times slower
    assert "batch_size=12 train.grad_accum=2 (effective batch 24, was 13)" in preflight._memory_message(
        spec, cfg, prime, room, "x"
    )


def test_decoder_generate_is_planned_with_its_label_logits_and_refused_when_it_cannot_fit(
    tmp_path, small_csv, small_frame, monkeypatch
):
    """decoder-generate had no memory check: a model that could not fit failed mid-run."""
    from tailtune import generate
    from tailtune.plan import plan_one

    cfg = load_config("smoke", ["systems=decoder-generate"])
    data = prepare(cfg.data, frame=small_frame, source="test")
    backbone = backbones.resolve(cfg.decoder.name)
    longest = max(len(x) for x in generate.encode_labels(backbones.load_tokenizer(backbone), data.classes))
    _, need, _ = _need("decoder-generate", small_frame, label_tokens=longest)
    row = plan_one(backbone, cfg.decoder, "lora", cfg.method, len(data.classes), "fp32", label_tokens=longest)
    assert need["probe_copy"] == 0 and need["tokens"] == cfg.decoder.max_length + longest
    assert need["activations"] == row["activations"]  # label logits included
    one = plan_one(backbone, cfg.decoder, "lora", cfg.method, len(data.classes), "fp32", label_tokens=1)
    assert one["activations"] < row["activations"]
    with pytest.raises(TailtuneError, match="decoder-generate needs a decoder backbone; 'tiny:bert' is an encoder"):
        _need("decoder-generate", small_frame, "decoder.name=tiny:bert", label_tokens=longest)
    monkeypatch.setattr(preflight, "available_memory", lambda: (1000, "test RAM"))
    out = tmp_path / "run"
    assert_error(
        run_smoke(small_csv, out, systems="decoder-generate"),
        out,
        "decoder-generate needs about",
        "with the label logits",
        "test RAM",
    )


# ----------------------------------------------------------------------------- cost


def test_backbone_checks_read_no_weights(small_frame, monkeypatch):
    """Pre-flight builds models on the meta device; the only real load is the one used to train."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("pre-flight loaded model weights")

    for name in ("AutoModel", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    cfg = load_config("smoke")
    data = prepare(cfg.data)
    preflight.check_backbones(Context(cfg, data, None, None), [parse_system(s) for s in cfg.systems])
    assert set(data.summary["truncation"]) == {"encoder", "decoder"}


def test_run_marks_a_system_failed_when_padding_changes_its_predictions(tmp_path, small_csv, monkeypatch):
    """The padding check needs the trained model's weights, so it fails that system, not the run."""
    monkeypatch.setitem(classifier.POOLERS, "last", lambda hidden, mask: hidden[:, 0])
    out = tmp_path / "run"
    result = run_smoke(small_csv, out, "train.head_init=random", systems="tfidf-logreg,decoder-lora")
    assert result.exit_code == 1, result.output  # after every system ran, so a job script sees it
    assert result.stderr.strip() == "failed: decoder-lora (the reasons are in comparison.csv)"
    comparison = (out / "comparison.csv").read_text()
    assert "decoder-lora,failed" in comparison and "predictions change with padding" in comparison
    tfidf = next(line for line in comparison.splitlines() if line.startswith("tfidf-logreg,")).split(",")
    assert all(field.isdigit() for field in tfidf[5:8]), tfidf  # counts stay whole beside a failed row (was 6.0)
    assert (out / "systems" / "tfidf-logreg" / "metrics.json").is_file()
    assert not (out / "systems" / "decoder-lora").exists()


@pytest.mark.parametrize("system", ["encoder-prompt", "encoder-prefix@virtual_tokens=8"])
def test_virtual_tokens_must_fit_the_position_table(tmp_path, small_csv, system):
    """512 tokens + 20 virtual tokens stopped a prompt system mid-run with a tensor size error."""
    virtual = 8 if "@" in system else 20
    out = tmp_path / "run"
    assert_error(
        run_smoke(small_csv, out, "encoder.max_length=510", systems=f"tfidf-logreg,{system}"),
        out,
        f"{system}: 510 tokens + {virtual} virtual tokens exceed the 512 positions of bert; "
        f"set encoder.max_length to at most {512 - virtual}",
    )


def test_counting_truncation_does_not_tokenise_a_huge_text_whole():
    """A 10M-character text in the sample was tokenised whole to count its tokens (7.7 s for 9.4M)."""
    import pandas as pd

    tok = backbones.load_tokenizer(backbones.resolve("tiny:bert"))
    longest = []

    class Recording:  # the tokenizer, noting the longest text it is given
        def __call__(self, texts, **kwargs):
            longest.append(max(len(t) for t in ([texts] if isinstance(texts, str) else texts)))
            return tok(texts, **kwargs)

        def __getattr__(self, name):
            return getattr(tok, name)

    recording = Recording()

    texts = pd.Series(["refund the fee " * 700_000, "short text here", "another short one"])
    counted = preflight.count_truncated(recording, texts, 32)
    assert max(longest) < 100_000
    assert counted["texts_over"] == 1 and counted["longest_tokens"] > 2_000_000
