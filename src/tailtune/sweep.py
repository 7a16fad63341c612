"""``tailtune sweep``: a grid of method settings, each point a system of one run.

``tailtune sweep demo method=lora,dora,ia3 method.rank=4,16`` crosses the axes and turns every
fine-tuned system of the config into one system per grid point, named with the grammar of
:mod:`tailtune.systems` (``encoder-dora@rank=4``). Baselines and probes stay once, as the
reference. The result is an ordinary run directory: resumable, reported, benchmarkable, and
its report plots quality against trained parameters and against latency.
"""

from __future__ import annotations

import dataclasses
import itertools

from tailtune.errors import TailtuneError

METHOD_AXIS = "method"


def axis_keys() -> list[str]:
    """The keys a sweep can vary: the method, its settings, and a few of the training recipe."""
    from tailtune.config import MethodConfig
    from tailtune.systems import TRAIN_KEYS

    return (
        [METHOD_AXIS]
        + [f"method.{f.name}" for f in dataclasses.fields(MethodConfig)]
        + [f"train.{k}" for k in TRAIN_KEYS]
    )


def split_values(text: str) -> list[str]:
    """'4,16,[attention,ffn]' -> ['4', '16', 'attention|ffn'] (a bracketed list is one value)."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    out = [v.strip().strip("[]").replace(",", "|").replace(" ", "") for v in values]
    if any(not v for v in out):
        raise TailtuneError(f"sweep axis value list '{text}' has an empty value")
    return out


def parse_args(items: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split ``key=value`` items into sweep axes (``key=v1,v2``) and ordinary config overrides."""
    from tailtune.config import suggest

    axes, overrides = {}, []
    keys = axis_keys()
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TailtuneError(f"'{item}' must look like key=value (e.g. method.rank=4,16)")
        if key in keys:
            if key in axes:
                raise TailtuneError(f"sweep axis '{key}' given twice")
            axes[key] = split_values(value)
        else:
            overrides.append(item)
    if not axes:
        for item in overrides:
            key, _, value = item.partition("=")
            # v1,v2 as an axis takes it; a [list] or the systems are a plain override's values
            if "," in value and not value.startswith("[") and key != "systems":
                section, _, leaf = key.rpartition(".")
                near = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == section]
                hint = suggest(leaf, near, f"{section}." if section else "")
                raise TailtuneError(f"'{key}' is not a sweep axis{hint}; the axes are {', '.join(keys)}")
        raise TailtuneError(f"nothing to sweep: give at least one axis ({', '.join(keys)})")
    return axes, overrides


def grid_systems(systems: list[str], axes: dict[str, list[str]]) -> list[str]:
    """The run's system list with each fine-tuned system replaced by one system per grid point."""
    from tailtune import methods
    from tailtune.systems import parse_system, settings_of

    for method in axes.get(METHOD_AXIS, []):
        methods.get(method)
    out, tuned = [], []
    for name in systems:
        spec = parse_system(name)
        (tuned if spec.kind == "finetune" else out).append(spec)
    if not tuned:
        raise TailtuneError("the config has no fine-tuned system to sweep (e.g. systems=encoder-lora)")
    setting_axes = [(k.split(".", 1)[1], v) for k, v in axes.items() if k != METHOD_AXIS]
    names = [s.name for s in out]
    crossed: set[str] = set()
    points = list(out)
    for spec in tuned:
        if spec.overrides:
            raise TailtuneError(f"system '{spec.name}' already has settings; sweep a plain system name")
        suffix = spec.name[len(f"{spec.slot}-{spec.method}") :]  # "", "-weighted", "-<scheme>"
        for method in axes.get(METHOD_AXIS, [spec.method]):
            # an axis the method does not use (ia3 has no rank) is not crossed with it
            used = [(k, v) for k, v in setting_axes if k in settings_of("finetune", method)]
            crossed.update(k for k, _ in used)
            for point in itertools.product(*(values for _, values in used)):
                settings = "+".join(f"{k}={v}" for (k, _), v in zip(used, point, strict=True))
                name = f"{spec.slot}-{method}{suffix}" + (f"@{settings}" if settings else "")
                points.append(parse_system(name))  # every point must be a valid system before anything trains
                names.append(name)
    idle = [k for k in axes if k != METHOD_AXIS and k.split(".", 1)[1] not in crossed]
    if idle:  # it was dropped without a word: method.rank=4,16 with ia3 trained plain ia3 once
        swept = sorted({m for spec in tuned for m in axes.get(METHOD_AXIS, [spec.method])})
        raise TailtuneError(f"sweep axis '{idle[0]}' applies to none of the swept methods ({', '.join(swept)})")
    seen: dict[tuple, str] = {}
    for spec in points:  # by value: rank=4 and rank=04, lr=1e-3 and lr=0.001 are one system
        if spec.identity in seen:
            raise TailtuneError(
                f"the sweep produces the same system twice ({seen[spec.identity]} and {spec.name}); check the axes"
            )
        seen[spec.identity] = spec.name
    return names


def sweep_config(cfg, axes: dict[str, list[str]], out: str | None = None):
    """``cfg`` with its systems expanded over ``axes``; the run goes to ``out`` or ``<cfg.out>-sweep``."""
    from tailtune.config import validate

    swept = dataclasses.replace(cfg, systems=grid_systems(list(cfg.systems), axes), out=out or f"{cfg.out}-sweep")
    validate(swept)
    return swept
