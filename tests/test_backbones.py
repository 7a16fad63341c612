import json
import os

import pytest

from tailtune import backbones, rundir
from tailtune.errors import NoTokens, TailtuneError

EXPECTED = {
    # (role, one layer's adapted modules)
    "bert": {
        "attention": ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value"],
        "ffn": ["intermediate.dense", "output.dense"],
    },
    "modernbert": {"attention": ["attn.Wo", "attn.Wqkv"], "ffn": ["mlp.Wi", "mlp.Wo"]},
    "mpnet": {
        "attention": ["attention.attn.k", "attention.attn.o", "attention.attn.q", "attention.attn.v"],
        "ffn": ["intermediate.dense", "output.dense"],
    },
    "qwen2": {
        "attention": ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"],
        "ffn": ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"],
    },
}
EXPECTED["llama"] = EXPECTED["qwen2"]


def _layer0(names):
    out = []
    for n in names:
        parts = n.split(".")
        i = parts.index("0")  # ...layer(s).0.<rest>
        out.append(".".join(parts[i + 1 :]))
    return sorted(out)


@pytest.mark.parametrize("arch", backbones.TINY_ARCHS)
@pytest.mark.parametrize("role", ["attention", "ffn"])
def test_roles_map_to_the_right_modules(arch, role):
    bb = backbones.resolve(f"tiny:{arch}")
    model = backbones.load_model(bb, backbones.load_tokenizer(bb))
    names = backbones.target_modules(model, bb.model_type, [role])
    assert _layer0([n for n in names if ".0." in n]) == EXPECTED[arch][role]
    assert len(names) == 2 * len(EXPECTED[arch][role])  # two layers
    both = backbones.target_modules(model, bb.model_type, ["attention", "ffn"])
    assert both == backbones.target_modules(model, bb.model_type, ["all"])
    assert set(names) < set(both)


def test_kind_and_trained_pooling_per_checkpoint(tmp_path):
    assert backbones.resolve("tiny:qwen2").is_decoder
    assert backbones.resolve("tiny:llama").pooling == "last"
    assert backbones.resolve("tiny:modernbert").pooling == "mean"  # from classifier_pooling
    assert backbones.resolve("tiny:bert").pooling == "cls"
    # a sentence-transformers folder declares mean pooling in 1_Pooling/config.json
    folder = tmp_path / "st"
    folder.mkdir()
    src = backbones.resolve("tiny:bert").path
    for f in ("config.json",):
        (folder / f).write_text((backbones.Path(src) / f).read_text())
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert backbones.resolve(str(folder)).pooling == "mean"
    # other sentence-transformers modes fell back to CLS, which such checkpoints never trained
    for mode, expected in (
        ("max_tokens", "mean"),
        ("mean_sqrt_len_tokens", "mean"),
        ("weightedmean_tokens", "mean"),
        ("lasttoken", "last"),
        ("cls_token", "cls"),
    ):
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{mode}": True}))
        assert backbones.resolve(str(folder)).pooling == expected, mode
    # modules.json names the Pooling module's folder; it need not be 1_Pooling
    (folder / "1_Pooling").rename(folder / "2_Pool")
    (folder / "2_Pool" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert backbones.resolve(str(folder)).pooling == "cls"
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "2_Pool", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    assert backbones.resolve(str(folder)).pooling == "mean"


def test_decoder_tokenizer_is_set_up_for_classification():
    bb = backbones.resolve("tiny:qwen2")
    tok = backbones.load_tokenizer(bb)
    assert tok.padding_side == "left"
    assert tok.pad_token == tok.eos_token  # the tiny decoder ships without a pad token
    model = backbones.load_model(bb, tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_a_decoder_saved_to_pad_on_the_right_without_a_pad_id_is_set_up_anyway(tmp_path):
    """The study's silent pitfalls come from the checkpoint's own files: tailtune overrides them
    rather than refusing (pre-flight's padding checks stay as a guard behind this)."""
    import shutil

    folder = tmp_path / "right-padding"
    shutil.copytree(backbones.make_tiny("llama"), folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tok_config, "padding_side": "right"}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    bb = backbones.resolve(str(folder))
    tok = backbones.load_tokenizer(bb)
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert backbones.load_model(bb, tok).config.pad_token_id == tok.pad_token_id


def test_unknown_backbones_fail_clearly(tmp_path):
    with pytest.raises(TailtuneError, match="unknown bundled backbone"):
        backbones.resolve("bundled:gpt5")
    with pytest.raises(TailtuneError, match="backbone folder not found"):
        backbones.resolve("./nope/model")
    with pytest.raises(TailtuneError, match="unknown tiny architecture"):
        backbones.resolve("tiny:t5")
    bad = tmp_path / "weights.bin"
    bad.write_text("x")
    with pytest.raises(TailtuneError, match="not a .gguf model"):
        backbones.resolve(str(bad))
    (tmp_path / "empty").mkdir()  # was "not a local folder, .gguf file, bundled name or a hub model"
    with pytest.raises(TailtuneError, match=r"the folder .*empty has no config.json \(nor a .gguf file\)"):
        backbones.resolve(str(tmp_path / "empty"))


def test_a_hub_name_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch, tmp_path):
    """Offline, the hub client retried for 26-31 s (5 "Retrying in ..." lines) before the error,
    also for a typo like 'minilm', which looks like a hub id."""
    from transformers import AutoConfig

    online = []
    real = AutoConfig.from_pretrained

    def recording(path, *args, **kwargs):
        if not kwargs.get("local_files_only"):
            online.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", recording)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not backbones.reachable("huggingface.co")
    for name in ("answerdotai/ModernBERT-base", "minilm"):
        with pytest.raises(
            TailtuneError,
            match=rf"could not load backbone '{name}': not a local folder, .gguf "
            r"file, bundled name or a hub model in the local cache, and the hub "
            r"\(huggingface.co\) cannot be reached from here",
        ):
            backbones.resolve(name)
    assert online == []  # no call that would retry against an unreachable hub
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.internal:8080")
    assert backbones.hub_host() == "hub.example.internal"


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
def test_an_empty_text_is_refused_by_encoder_and_decoder_alike(arch):
    """SmolLM2 (no BOS) gives "" no token: alone it crashed the forward pass ("cannot reshape tensor
    of 0 elements"), beside another text it got a confident prediction from padding alone. An
    encoder gave "" a label from [CLS] [SEP]. Both now refuse it with NoTokens, which ``predict``
    on a file reads as "leave the row unlabelled"."""
    tok = backbones.load_tokenizer(backbones.resolve(f"tiny:{arch}"))
    assert (tok("")["input_ids"] == []) == (arch == "qwen2")
    for texts, message in (
        (["hello bank", ""], r"text 1 is empty \(nothing but spaces or invisible characters\), so there is nothing"),
        (["\u200b", "hello bank", " \t"], r"text 0 is empty .* \(and 1 more\)"),
    ):
        with pytest.raises(NoTokens, match=message) as caught:
            backbones.tokenize(tok, texts, 32)
        assert caught.value.rows == [i for i, t in enumerate(texts) if t != "hello bank"]
    assert backbones.tokenize(tok, ["hello bank"], 32)[0]


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
def test_a_text_that_is_not_text_is_one_line(arch):
    """The tokenizer's TypeError ("TextEncodeInput must be Union[...]") named no text."""
    tok = backbones.load_tokenizer(backbones.resolve(f"tiny:{arch}"))
    with pytest.raises(TailtuneError, match=r"text 1 is not valid Unicode: character 3 is a lone surrogate"):
        backbones.tokenize(tok, ["fine", "ok \ud800 text"], 32)
    with pytest.raises(TailtuneError, match=r"text 0 is a NoneType, not a string"):
        backbones.tokenize(tok, [None, "fine"], 32)


def test_a_file_that_is_not_gguf_and_a_broken_config_fail_in_one_line(tmp_path, monkeypatch, capfd):
    """Both were "internal error" (ValueError: GGUF magic bytes; JSONDecodeError) with exit 1,
    and the GGUF one then printed "converting model.gguf ..." before its error line."""
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(TailtuneError, match=rf"could not read {junk} as a GGUF model: it does not start with the GGUF"):
        backbones.resolve(str(junk))
    assert "converting" not in capfd.readouterr().err
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert",')
    with pytest.raises(
        TailtuneError,
        match=rf"could not load backbone '{folder}': {folder}/config.json is not a "
        "readable JSON config",
    ):
        backbones.resolve(str(folder))


@pytest.mark.parametrize("in_cache", [False, True])
def test_truncated_weights_are_a_one_line_error_naming_the_folder(tmp_path, monkeypatch, in_cache):
    """A truncated model.safetensors in the conversion cache was "internal error SafetensorError"."""
    import shutil

    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    folder = (tmp_path / "cache" / "gguf" / "m") if in_cache else tmp_path / "m"
    shutil.copytree(backbones.resolve("tiny:bert").path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    bb = backbones.resolve(str(folder))
    with pytest.raises(TailtuneError, match=rf"could not read the weights of backbone '{folder}' in {folder}: ") as err:
        backbones.load_model(bb, backbones.load_tokenizer(bb))
    assert ("delete that folder and run again" in str(err.value)) == in_cache


def test_a_killed_conversion_leaves_no_temporary_folder_behind(tmp_path):
    """kill -9 during a GGUF conversion left a 239 MB temporary folder that nothing removed."""
    import os
    import time

    target = tmp_path / "gguf" / "SmolLM2-abc"
    stale, fresh = tmp_path / "gguf" / ".SmolLM2-abc.x1", tmp_path / "gguf" / ".SmolLM2-abc.x2"
    for folder in (stale, fresh):
        (folder / "sub").mkdir(parents=True)
    old = time.time() - rundir.STALE_SECONDS - 60
    os.utime(stale, (old, old))
    stale_file = tmp_path / "gguf" / ".SmolLM2-abc.x3.tmp"  # what atomic_write leaves (predict --output)
    stale_file.write_text("partial")
    os.utime(stale_file, (old, old))
    rundir.remove_stale(target)
    assert not stale.exists() and not stale_file.exists() and fresh.exists()  # work in progress is kept


def test_a_read_only_cache_fails_before_converting(tmp_path, monkeypatch):
    """A read-only TAILTUNE_CACHE failed only after the whole conversion (30 s for SmolLM2)."""

    def refuse(*args, **kwargs):
        raise AssertionError("converted before checking the cache")

    def read_only(*args, **kwargs):  # root writes anywhere, so the refusal is simulated
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(backbones.rundir.tempfile, "mkstemp", read_only)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("TAILTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        TailtuneError,
        match=r"cannot write the converted model to .+ \(permission denied: .+\); set "
        "TAILTUNE_CACHE to a writable folder",
    ):
        backbones.convert_gguf(gguf)


def test_a_cached_hub_model_loads_without_the_hub_when_it_cannot_be_reached(tmp_path):
    """Offline, a hub model in the local cache loaded, but its tokenizer took 141 s and its
    weights 53 s: every file was tried on the hub 5 times first."""
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hf" / "hub" / "models--acme--tinybert" / "snapshots" / "abc123"
    shutil.copytree(backbones.resolve("tiny:bert").path, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    # a sentence-transformers checkpoint: its pooling is read from the hub cache too (was CLS)
    (snapshot / "modules.json").write_text(
        json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (snapshot / "1_Pooling").mkdir()
    (snapshot / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    script = (
        "import huggingface_hub.constants as c; from tailtune import backbones as b\n"
        "bb = b.resolve('acme/tinybert'); tok = b.load_tokenizer(bb); b.load_model(bb, tok)\n"
        "print(c.HF_HUB_OFFLINE, bb.pooling, tok('hello')['input_ids'])\n"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": "https://hub.invalid",
        "TAILTUNE_CACHE": str(tmp_path / "cache"),
    }
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True mean [")  # offline for the rest of the process
    assert "Retrying" not in done.stderr and "hub.invalid" not in done.stderr


def test_role_that_matches_nothing_is_an_error():
    bb = backbones.resolve("tiny:bert")
    model = backbones.load_model(bb, backbones.load_tokenizer(bb))
    with pytest.raises(TailtuneError, match="no role map"):
        backbones.target_modules(model, "t5", ["attention"])


def test_top_layers_keeps_only_the_last_layers():
    bb = backbones.resolve("tiny:qwen2")
    model = backbones.load_model(bb, backbones.load_tokenizer(bb))
    top = backbones.target_modules(model, bb.model_type, ["attention", "ffn"], top_layers=1)
    assert top and all(".1." in n for n in top)
    assert (
        backbones.describe_targets(top)
        == "1 layers x [mlp.down_proj, mlp.gate_proj, mlp.up_proj, self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, self_attn.v_proj]"
    )


LONG_TEXT = "My servicer charged a late fee again; I paid on 03/04, see XXXX. " * 4000  # 260K chars


@pytest.mark.parametrize("arch", ["bert", "qwen2", "llama", "modernbert", "mpnet"])
def test_a_very_long_text_is_cut_before_tokenising_with_the_same_ids(arch):
    """A fast tokenizer tokenised a 9.4M-character text whole for 256 tokens: 7.7 s, 1.3 GB."""
    tok = backbones.load_tokenizer(backbones.resolve(f"tiny:{arch}"))
    texts = [LONG_TEXT, "short text", "x" * 300_000 + " tail", LONG_TEXT.replace(" ", "\n  ")]
    clipped = backbones.clip_long(tok, texts, 64)
    assert len(clipped[0]) < 10_000 and clipped[1] == "short text"
    assert clipped[2] == texts[2]  # one 300K-character word: no cut keeps enough tokens
    assert clipped[3] == texts[3]  # every space follows a line break: never cut there
    assert all(not c[-1].isspace() for c, t in zip(clipped, texts, strict=True) if c != t)
    for max_length in (16, 64):
        whole = tok(texts, truncation=True, max_length=max_length)["input_ids"]
        assert backbones.tokenize(tok, texts, max_length) == whole
