"""Adaptation methods, registered by name: how a backbone is made trainable, saved and reloaded.

A method only touches the backbone. The classification head (``score``) belongs to
:class:`tailtune.classifier.PooledClassifier`, is always trainable and is always saved next
to whatever the method saves, so a reload can never come back with a random head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tailtune.backbones import Backbone, target_modules
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


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in METHODS:
        raise TailtuneError(f"unknown method '{name}' (methods: {', '.join(METHODS)})")
    return METHODS[name]


# ----------------------------------------------------------------------------- lora


def _lora_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    from peft import LoraConfig, get_peft_model

    names = target_modules(model, backbone.model_type, cfg.targets, top_layers)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names)
    return get_peft_model(model, config), names


def _lora_save(model, folder: Path) -> None:
    model.save_pretrained(folder / "adapter")


def _lora_load(base, folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder / "adapter")


register(Method("lora", True, _lora_apply, _lora_save, _lora_load))


# ----------------------------------------------------------------------------- full


def _full_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model, ["*"]


def _full_save(model, folder: Path) -> None:
    model.save_pretrained(folder / "backbone")


def _full_load(base, folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder / "backbone", dtype=base.dtype)


register(Method("full", True, _full_apply, _full_save, _full_load))


# ----------------------------------------------------------------------------- head only


def _head_apply(model, backbone: Backbone, cfg: MethodConfig, top_layers: int | None = None):
    for p in model.parameters():
        p.requires_grad_(False)
    return model, []


register(Method("head", True, _head_apply, lambda model, folder: None, lambda base, folder: base))
