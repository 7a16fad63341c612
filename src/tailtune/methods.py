"""Adaptation methods, registered by name: how a backbone is made trainable, saved and reloaded.

A method only touches the backbone. The classification head (``score``) belongs to
:class:`tailtune.classifier.PooledClassifier`, is always trainable and is always saved next
to whatever the method saves, so a reload can never come back with a random head.

Each entry records what a deployment decision needs: whether it folds into the base weights
(``mergeable``: no added inference latency) or stays in the forward pass (adapters, prompts,
prefixes), and the backbone learning rate its paper trains with (``lr``; ``None`` = the run's
``train.lr``, tuned for the LoRA family). The knobs come from :class:`~tailtune.config.MethodConfig`:
``rank``/``alpha``/``targets`` (LoRA family, LoHa, LoKr), ``dropout`` (LoRA family),
``virtual_tokens`` (prompt, prefix), ``bottleneck`` (adapter); ``uses`` lists each method's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tailtune.backbones import Backbone, in_top_layers, layer_depth, target_modules
from tailtune.config import MethodConfig
from tailtune.errors import TailtuneError

ROLES = ("attention", "ffn", "all")


@dataclass(frozen=True)
class Method:
    name: str
    mergeable: bool  # can be folded into the base weights (no added inference latency)
    apply: Callable  # (model, backbone, cfg, top_layers) -> (model, targeted module names)
    save: Callable  # (model, folder) -> None
    load: Callable  # (base model, folder) -> model
    lr: float | None = None  # backbone learning rate from the method's paper; None = train.lr
    # Trains base weights themselves (full, head, bitfit): "merged" and "unmerged" are one model.
    in_place: bool = False
    # Saves the whole backbone (full): ``load(None, folder)`` needs no base model.
    saves_backbone: bool = False
    # The MethodConfig keys it reads: a system name may set only these (ia3@rank=64 trained what
    # ia3 trains, under another name).
    uses: frozenset = frozenset()
    # Changes the model's output before any step (virtual tokens): the LP-FT start's probe score
    # is not this model's, so it must not compete for "best" (prompt/prefix kept a collapsed state).
    changes_output_at_init: bool = False
    # Trains backbone weights at the backbone lr (not head: only the head's head_lr matters), so
    # an @lr setting and an lr search mean something.
    uses_lr: bool = True


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in METHODS:
        from tailtune.config import suggest

        raise TailtuneError(f"unknown method '{name}'{suggest(name, list(METHODS))} (methods: {', '.join(METHODS)})")
    return METHODS[name]


# ----------------------------------------------------------------------------- peft methods


def _peft_save(model, folder: Path) -> None:
    model.save_pretrained(folder / "adapter")


def _peft_load(base, folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder / "adapter")


def _peft_method(
    name: str, make_config: Callable, *, mergeable=True, lr=None, uses=frozenset(), changes_output_at_init=False
) -> Method:
    """A method that is one peft config: ``make_config(model, backbone, cfg, top_layers)`` -> (config, names)."""

    def apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
        from peft import get_peft_model

        config, names = make_config(model, backbone, cfg, top_layers)
        return get_peft_model(model, config), names

    return register(
        Method(
            name, mergeable, apply, _peft_save, _peft_load, lr, uses=uses, changes_output_at_init=changes_output_at_init
        )
    )


def _lora_config(**extra) -> Callable:
    def make(model, backbone, cfg, top_layers):
        from peft import LoraConfig

        names = target_modules(model, backbone.model_type, cfg.targets, top_layers)
        return LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names, **extra
        ), names

    return make


LORA_KEYS = frozenset({"rank", "alpha", "dropout", "targets"})
_peft_method("lora", _lora_config(), uses=LORA_KEYS)  # Hu et al. 2021
# scaling alpha / sqrt(r) instead of alpha / r keeps high ranks learning (Kalajdzievski 2023)
_peft_method("rslora", _lora_config(use_rslora=True), uses=LORA_KEYS)
# LoRA on the direction, a learned magnitude per output (Liu et al. 2024); merges like LoRA
_peft_method("dora", _lora_config(use_dora=True), uses=LORA_KEYS)


def _lycoris_config(kind: str) -> Callable:
    def make(model, backbone, cfg, top_layers):
        from peft import LoHaConfig, LoKrConfig

        names = target_modules(model, backbone.model_type, cfg.targets, top_layers)
        config_cls = LoHaConfig if kind == "loha" else LoKrConfig
        return config_cls(r=cfg.rank, alpha=cfg.alpha, target_modules=names), names

    return make


# LoHa: Hyeon-Woo et al. 2022 (FedPara); LoKr: Edalati et al. 2022
_peft_method("loha", _lycoris_config("loha"), uses=frozenset({"rank", "alpha", "targets"}))
_peft_method("lokr", _lycoris_config("lokr"), uses=frozenset({"rank", "alpha", "targets"}))


def _ia3_config(model, backbone, cfg, top_layers):
    from peft import IA3Config

    # (IA)^3 learns a scale on keys, values and the FFN's hidden activations (Liu et al. 2022);
    # it has no rank and no role choice. On ModernBERT the fused Wqkv output is scaled (q too).
    ffn = target_modules(model, backbone.model_type, ["ffn_out"], top_layers)
    names = target_modules(model, backbone.model_type, ["keys_values"], top_layers) + ffn
    return IA3Config(target_modules=names, feedforward_modules=ffn), names


_peft_method("ia3", _ia3_config, lr=3e-3)  # Liu et al. 2022, (IA)^3 / T-Few


def _prompt_config(model, backbone, cfg, top_layers):
    from peft import PromptTuningConfig, PromptTuningInit

    # Initialised from sampled vocabulary embeddings, Lester et al.'s best initialisation.
    config = PromptTuningConfig(
        task_type="FEATURE_EXTRACTION",
        num_virtual_tokens=cfg.virtual_tokens,
        prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
    )
    return config, []


# Lester et al. train with lr 0.3 under Adafactor; 3e-2 is peft's AdamW equivalent.
_peft_method(
    "prompt", _prompt_config, mergeable=False, lr=3e-2, uses=frozenset({"virtual_tokens"}), changes_output_at_init=True
)


def _prefix_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    # No reparameterisation MLP: P-tuning v2 (Liu et al. 2022) showed it unnecessary for NLU.
    peft_model = get_peft_model(
        model, PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=cfg.virtual_tokens)
    )
    # Some architectures accept past_key_values and silently ignore them (ModernBERT has no
    # KV cache): a prefix that cannot change the output is refused, not trained. (A model
    # without weights, as pre-flight builds, cannot run: training applies it again for real.)
    if next(model.parameters()).is_meta:
        return peft_model, []
    ids = torch.full((1, 4), 1 + (getattr(model.config, "pad_token_id", None) or 0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        before = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
        params = list(peft_model.prompt_encoder.parameters())
        saved = [p.detach().clone() for p in params]
        for p in params:  # not a constant: a layer norm would remove that
            p.add_(torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape))
        after = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
    if torch.equal(before, after):
        raise TailtuneError(
            f"prefix tuning does not apply to {backbone.model_type}: its attention takes no past "
            "key/values, so a prefix cannot change the output; use prompt or lora"
        )
    return peft_model, []


# Li & Liang 2021
register(
    Method(
        "prefix",
        False,
        _prefix_apply,
        _peft_save,
        _peft_load,
        1e-2,
        uses=frozenset({"virtual_tokens"}),
        changes_output_at_init=True,
    )
)


def _qlora_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    import torch

    if not torch.cuda.is_available():
        raise TailtuneError("qlora needs a CUDA GPU (bitsandbytes 4-bit kernels) and this machine has none; use lora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TailtuneError("qlora needs bitsandbytes: pip install bitsandbytes") from None
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModel, BitsAndBytesConfig

    # The 4-bit NF4 base with double quantisation and bf16 compute of Dettmers et al. 2023;
    # the fp32 model passed in is replaced by one loaded quantised from the same files.
    quantised = AutoModel.from_pretrained(
        backbone.path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        device_map={"": 0},
    )
    quantised.config.pad_token_id = model.config.pad_token_id
    quantised = prepare_model_for_kbit_training(quantised, use_gradient_checkpointing=False)
    names = target_modules(quantised, backbone.model_type, cfg.targets, top_layers)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names)
    return get_peft_model(quantised, config), names


# Reloaded for inference onto the full-precision base, where the adapter merges like LoRA.
register(Method("qlora", True, _qlora_apply, _peft_save, _peft_load, None, uses=LORA_KEYS))  # Dettmers et al. 2023


# ----------------------------------------------------------------------------- weights in place


def _full_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model, ["*"]


def _full_save(model, folder: Path) -> None:
    model.save_pretrained(folder / "backbone")


def _full_load(base, folder: Path):
    import torch
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder / "backbone", dtype=torch.float32 if base is None else base.dtype)


register(Method("full", True, _full_apply, _full_save, _full_load, 2e-5, in_place=True, saves_backbone=True))


def _head_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    for p in model.parameters():
        p.requires_grad_(False)
    return model, []


# linear probing, trained end to end
register(
    Method(
        "head",
        True,
        _head_apply,
        lambda model, folder: None,
        lambda base, folder: base,
        None,
        in_place=True,
        uses_lr=False,
    )
)


BIASES_FILE = "biases.safetensors"


def _bitfit_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    depth = layer_depth(n for n, _ in model.named_parameters())
    names = []
    for name, p in model.named_parameters():
        train = name.endswith(".bias") and in_top_layers(name, depth, top_layers)
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise TailtuneError(f"bitfit needs bias terms and this {backbone.model_type} model has none; use lora or ia3")
    return model, names


def _bitfit_save(model, folder: Path) -> None:
    from safetensors.torch import save_file

    # Every bias, trained or not: the file alone rebuilds the adapted backbone from the base.
    biases = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n.endswith(".bias")}
    save_file(biases, str(folder / BIASES_FILE))


def _bitfit_load(base, folder: Path):
    return _load_named(base, folder / BIASES_FILE)


def _load_named(model, file: Path):
    """Load a partial state dict; every saved tensor must find its parameter."""
    from safetensors.torch import load_file

    state = load_file(str(file))
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise TailtuneError(f"{file} holds weights this backbone lacks (e.g. {unexpected[0]}); wrong base model?")
    return model


# BitFit changes only biases, which live in the base weights: nothing to merge, no latency.
register(
    Method("bitfit", True, _bitfit_apply, _bitfit_save, _bitfit_load, 1e-3, in_place=True)
)  # Ben Zaken et al. 2022


# ----------------------------------------------------------------------------- bottleneck adapters

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapters.json"


def _bottleneck_class():
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        """``base(x) + up(gelu(down(base(x))))`` after a projection that feeds a residual sum.

        ``up`` starts at zero, so the adapted model starts exactly as the pretrained one
        (Houlsby et al. 2019's near-identity initialisation). Shapes: (..., H) -> (..., H).
        """

        def __init__(self, base: nn.Linear, size: int):
            super().__init__()
            self.base = base
            self.adapter_down = nn.Linear(base.out_features, size)
            self.adapter_up = nn.Linear(size, base.out_features)
            nn.init.normal_(self.adapter_down.weight, std=1e-2)
            nn.init.zeros_(self.adapter_down.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

        def forward(self, x):
            h = self.base(x)
            return h + self.adapter_up(torch.nn.functional.gelu(self.adapter_down(h)))

    return Bottleneck


def _inject_adapters(model, names: list[str], size: int):
    bottleneck = _bottleneck_class()
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, bottleneck(getattr(owner, child), size))
    for n, p in model.named_parameters():
        p.requires_grad_(".adapter_" in n)
    return model


def _adapter_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    # Houlsby placement: after the attention output and after the FFN, before each residual sum.
    names = target_modules(model, backbone.model_type, ["residual_out"], top_layers)
    model = _inject_adapters(model, names, cfg.bottleneck)
    model._tailtune_adapters = {"names": names, "size": cfg.bottleneck}
    return model, names


def _adapter_save(model, folder: Path) -> None:
    from safetensors.torch import save_file

    state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if ".adapter_" in n}
    save_file(state, str(folder / ADAPTER_FILE))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(model._tailtune_adapters, indent=2))


def _adapter_load(base, folder: Path):
    placed = json.loads((folder / ADAPTER_CONFIG).read_text())
    model = _inject_adapters(base, placed["names"], placed["size"])
    model._tailtune_adapters = placed
    return _load_named(model, folder / ADAPTER_FILE)


# bottleneck adapters, Houlsby et al. 2019
register(Method("adapter", False, _adapter_apply, _adapter_save, _adapter_load, 1e-3, uses=frozenset({"bottleneck"})))
