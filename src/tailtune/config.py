"""Typed run configuration: dataclasses, YAML presets and dotted ``key=value`` overrides.

A run is described by one :class:`Config`. Presets live in ``configs/*.yaml`` (shipped inside
the package); a user passes a preset name or a YAML path plus overrides such as
``train.epochs=3 data.path=complaints.csv``. Every value is validated at load time so a typo
fails before any model is loaded, and the resolved config is written into the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tailtune.errors import TailtuneError, first_line

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "demo"


@dataclass
class DemoConfig:
    """Size of the built-in synthetic corpus (see :mod:`tailtune.demo`)."""

    n_classes: int = 100
    max_count: int = 1100
    min_count: int = 4
    exponent: float = 1.3
    seed: int = 0
    # Tier edges of the synthetic corpus, used instead of data.tier_edges when data.path is
    # null: the corpus is ~20x smaller than CFPB's, so the reference edges would put nearly
    # every class in "rare". A --data file always gets data.tier_edges.
    tier_edges: list[int] | None = None


@dataclass
class DataConfig:
    """Where the labelled texts come from and how they are cleaned and split."""

    path: str | None = None  # CSV / JSONL / Parquet; None = the built-in synthetic demo corpus
    # Text encoding of CSV / TSV / JSON files. A file that does not decode is an error naming
    # the line, never silently read as mojibake; set e.g. "cp1252" for old Excel exports.
    encoding: str = "utf-8"
    text_column: str = "Consumer complaint narrative"
    # A column name, or columns joined with "+" (e.g. "Product+Issue") for a combined label.
    label_column: str = "Issue"
    id_column: str = "Complaint ID"  # used when present, else the row number
    min_class_count: int = 2  # classes with fewer rows are dropped (and reported)
    val_size: float = 0.15
    test_size: float = 0.15
    seed: int = 0
    max_rows: int | None = None  # keep a seeded random subset of this many rows after cleaning
    # Tier edges are inclusive upper bounds on a class's training count, rare -> common.
    tier_edges: list[int] = field(default_factory=lambda: [27, 99, 999])
    tier_names: list[str] = field(default_factory=lambda: ["rare", "uncommon", "common", "head"])
    demo: DemoConfig = field(default_factory=DemoConfig)

    @property
    def effective_tier_edges(self) -> list[int]:
        """The edges this data is tiered with: the demo corpus's own, or ``tier_edges``."""
        if self.path is None and self.demo.tier_edges:
            return list(self.demo.tier_edges)
        return list(self.tier_edges)


@dataclass
class BackboneConfig:
    """One pretrained backbone and how it reads text.

    ``name`` is ``bundled:minilm`` / ``bundled:smollm2`` (the offline defaults), a local model
    folder, a ``.gguf`` file, a hub id such as ``answerdotai/ModernBERT-base``, or
    ``tiny:<bert|modernbert|qwen2|llama>`` (random weights, for tests).
    """

    name: str = "bundled:minilm"
    pooling: str = "auto"  # auto | mean | cls | last
    max_length: int = 256
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float | None = None  # overrides train.lr for this backbone
    epochs: float | None = None  # overrides train.epochs for this backbone (CPU budgets)
    # Adapt only the top N transformer layers (None = all). Backpropagation then stops at the
    # lowest adapted layer, which is what makes a 30-layer decoder trainable on a small CPU.
    adapt_layers: int | None = None

    def effective_lr(self, train: TrainConfig) -> float:
        """The backbone's learning rate in training: its own ``lr``, else ``train.lr``."""
        return self.lr if self.lr is not None else train.lr

    def effective_epochs(self, train: TrainConfig) -> float:
        """The backbone's epochs in training: its own ``epochs``, else ``train.epochs``."""
        return self.epochs if self.epochs is not None else train.epochs


@dataclass
class MethodConfig:
    """The parameter-efficient method applied to a backbone (see :mod:`tailtune.methods`)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["attention", "ffn"])
    virtual_tokens: int = 20  # prompt / prefix tuning: learned tokens (Lester et al. 2021: 20 is enough at scale)
    bottleneck: int = 64  # adapter: hidden size of each bottleneck (Houlsby et al. 2019 used 8-256)


@dataclass
class TrainConfig:
    """Optimisation recipe shared by every fine-tuned system of a run."""

    epochs: float = 3
    lr: float = 2e-4  # backbone / adapter learning rate
    head_lr: float = 2e-3  # the freshly initialised classification head learns faster
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_accum: int = 1
    weighting: str = "sqrt_inverse"  # scheme used by the "-weighted" systems
    logit_tau: float = 1.0  # temperature of the "logit_adjusted" strategy (Menon et al. use 1)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    head_init: str = "probe"  # probe (LP-FT: start from the probe's logistic regression) | random
    # Dropout inside the backbone while training (None: the checkpoint's own, 0: off). The probe
    # that starts LP-FT was fit on dropout-free features (docs/recipes.md section 8).
    backbone_dropout: float | None = None
    early_stopping_patience: int = 2  # evaluations without val macro-F1 gain before stopping
    eval_per_epoch: int = 1
    # Evaluations between checkpoints that an interrupted `tailtune run` resumes from (0 = none).
    checkpoint_every: int = 1
    seed: int = 0


@dataclass
class TfidfConfig:
    """The TF-IDF + logistic regression baseline of the reference study."""

    max_features: int = 50000
    ngram_max: int = 2
    C: float = 1.0  # scikit-learn default, as in the reference baseline
    class_weight: str | None = None  # None reproduces the reference; "balanced" for the probe-style variant


@dataclass
class EvalConfig:
    n_boot: int = 1000
    seed: int = 0


@dataclass
class TuneChoice:
    """What ``--tune`` chose for one system, and the validation macro-F1 that chose it."""

    system: str
    lr: float
    weighting: str
    val_macro_f1: float


@dataclass
class TuneConfig:
    """``tailtune run --tune``: a small search per fine-tuned system, judged on validation macro-F1.

    Each trial trains on a stratified subset of the training rows and is scored by the best
    validation macro-F1 its training reaches. The learning rate is searched unless the system's
    name sets ``@lr=``; the weighting only for ``-weighted`` systems (the others name theirs).
    """

    enabled: bool = False
    lr_factors: list[float] = field(default_factory=lambda: [0.25, 1.0, 4.0])  # times the system's own lr
    weightings: list[str] = field(default_factory=lambda: ["none", "sqrt_inverse", "logit_adjusted"])
    max_rows: int = 1000  # training rows per trial (stratified; every class keeps at least one)
    epochs: float = 1.0
    chosen: list[TuneChoice] = field(default_factory=list)  # written by the search into the run's config.yaml


@dataclass
class Config:
    """Everything one ``tailtune run`` needs."""

    out: str = "runs/demo"
    systems: list[str] = field(
        default_factory=lambda: ["tfidf-logreg", "encoder-probe", "encoder-lora", "decoder-lora"]
    )
    data: DataConfig = field(default_factory=DataConfig)
    encoder: BackboneConfig = field(default_factory=BackboneConfig)
    decoder: BackboneConfig = field(
        default_factory=lambda: BackboneConfig(name="bundled:smollm2", max_length=128, batch_size=8)
    )
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tfidf: TfidfConfig = field(default_factory=TfidfConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


POOLINGS = ("auto", "mean", "cls", "last")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HEAD_INITS = ("probe", "random")
MAX_SEED = 2**32 - 1
MAX_LOGIT_TAU = 100.0


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line error."""
    if precision not in PRECISIONS:
        raise TailtuneError(f"unknown precision '{precision}' (one of {', '.join(PRECISIONS)})")
    return precision


# ----------------------------------------------------------------------------- loading


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_description(name: str) -> str:
    """A shipped preset's one-line description: the first line of its YAML, a comment."""
    return (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").rstrip(":")


def _preset_path(source: str | None) -> Path:
    if source is None:
        return PRESET_DIR / f"{DEFAULT_PRESET}.yaml"
    if source in available_presets():  # a run folder called "smoke" (--out smoke) must not hide the preset
        return PRESET_DIR / f"{source}.yaml"
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        raise TailtuneError(f"config '{source}' is a directory, expected a YAML file or preset name")
    stem = path.stem if path.suffix in (".yaml", ".yml") else source
    if (PRESET_DIR / f"{stem}.yaml").is_file():
        return PRESET_DIR / f"{stem}.yaml"
    hint = suggest(stem, available_presets())
    raise TailtuneError(
        f"unknown preset or missing config file '{source}'{hint} (presets: {', '.join(available_presets())})"
    )


# Paths, column names and model names: an override's value is the text as typed, not YAML
# ("complaints #2.csv" lost " #2.csv" as a comment; a column "yes" or "2024" was not a string).
TEXT_KEYS = frozenset(
    {
        "out",
        "data.path",
        "data.encoding",
        "data.text_column",
        "data.label_column",
        "data.id_column",
        "encoder.name",
        "decoder.name",
    }
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: the last one won silently, so a second
    ``train:`` section dropped the first one's settings."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor may repeat a key: the mapping's own wins
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a preset name or YAML path (None = the demo preset), then apply ``key=value`` overrides."""
    path = _preset_path(source)
    try:
        raw = _yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TailtuneError(f"config {path} is not valid YAML: {first_line(exc)}") from None
    except UnicodeDecodeError as exc:
        raise TailtuneError(
            f"config {path} is not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "re-save it as UTF-8"
        ) from None
    if raw is None:  # an empty file (or only comments) would have started a run with the built-in defaults
        raise TailtuneError(
            f"config {path} is empty; give it keys, or name a preset ({', '.join(available_presets())})"
        )
    if not isinstance(raw, dict):
        raise TailtuneError(f"config {path} must be a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TailtuneError(f"override '{item}' must look like key=value (e.g. train.epochs=3)")
        _set_dotted(raw, key, _parse_text(value) if key in TEXT_KEYS else _parse_value(value))
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return _yaml(text) if text.strip() else None
    except yaml.constructor.ConstructorError as exc:  # train={epochs: 1, epochs: 2}
        raise TailtuneError(f"override value '{text}' is not valid: {exc.problem}") from None
    except yaml.YAMLError:
        return text


def _parse_text(text: str) -> str | None:
    """The value of a :data:`TEXT_KEYS` override: as typed but for the spaces around it, or YAML
    when quoted as a whole (``"..."``, which is how the CLI passes ``--data`` and
    ``--label-column``, spaces kept); empty or ``null`` is null (``data.path=null``: the demo
    corpus)."""
    text = text.strip()
    if text in ("", "null", "Null", "NULL", "~"):
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        parsed = _parse_value(text)
        if isinstance(parsed, str):
            return parsed
    return text


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise TailtuneError(f"override '{key}': '{part}' is not a section")
        node = child
    current = node.get(parts[-1])
    if isinstance(current, dict):  # a section the config sets: replacing it dropped its other keys
        if not isinstance(value, dict):
            raise TailtuneError(
                f"override '{key}=...': '{key}' is a section; set its keys one by one ({key}.<key>=value)"
            )
        for sub, sub_value in value.items():
            _set_dotted(tree, f"{key}.{sub}", sub_value)
        return
    node[parts[-1]] = value


def suggest(word: str, choices: list[str], prefix: str = "") -> str:
    """`` (did you mean '<prefix><closest choice>'?)``, or nothing when no choice is close (case aside: LoRA -> lora)."""
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{lowered[close[0]]}'?)" if close else ""


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise TailtuneError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise TailtuneError(f"unknown config key '{prefix}{key}'{suggest(str(key), names, prefix)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            raise TailtuneError(f"config key '{prefix}{f.name}' is required")
    return cls(**kwargs)


def parse_names(text: str, what: str) -> list[str]:
    """A comma-separated list (``"a, b"``), each entry stripped. An empty entry (``","``,
    ``"a,"``) or one given twice is an error naming ``what`` (a flag or a config key), not a
    system called '' or one trained twice."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise TailtuneError(f"{what} '{text}' has an empty name; separate names with single commas")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise TailtuneError(f"{what} '{text}' names '{twice}' twice")
    return names


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, f"{key}.")
    if origin is list:
        if isinstance(value, str):
            value = parse_names(value, f"config key '{key}' value") if value.strip() else []
        if not isinstance(value, list):
            raise TailtuneError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value]
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "5e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise TailtuneError(f"config key '{key}' must be {hint.__name__}, got {value!r}")
    return value


def to_dict(cfg: Config) -> dict:
    """Plain values only (a ``Path`` becomes its string), as config.yaml holds them."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return plain(dataclasses.asdict(cfg))


def resolved(cfg: Config) -> Config:
    """``cfg`` as a run records it: read back through YAML, so its values have the types
    config.yaml gives them (``epochs=3`` becomes 3.0, a ``Path`` a string), ``data.path``
    absolute, and validated.

    For configs built in Python, which skip ``load_config``'s checks otherwise.
    """
    cfg = from_dict(Config, yaml.safe_load(dump(cfg)))
    if cfg.data.path and "://" not in cfg.data.path:
        # config.yaml records it, and bench / report read the data again, from anywhere
        cfg.data.path = os.path.abspath(os.path.expanduser(cfg.data.path))
    validate(cfg)
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- validation


def check_method(m: MethodConfig, who: str = "", key: str = "method.") -> None:
    """The method section; errors start with ``who`` and name each setting as ``key<name>``."""
    from tailtune import methods

    if m.rank < 1 or not 0 < m.alpha < math.inf:
        raise TailtuneError(f"{who}{key}rank must be >= 1 and {key}alpha > 0")
    if m.virtual_tokens < 1 or m.bottleneck < 1:
        raise TailtuneError(f"{who}{key}virtual_tokens and {key}bottleneck must be >= 1")
    if not 0 <= m.dropout < 1:
        raise TailtuneError(f"{who}{key}dropout must be in [0, 1)")
    if not m.targets:
        raise TailtuneError(f"{who}{key}targets must name at least one role ({', '.join(methods.ROLES)})")
    for role in m.targets:
        if role not in methods.ROLES:
            raise TailtuneError(
                f"{who}unknown target role '{role}'{suggest(role, list(methods.ROLES))} "
                f"(roles: {', '.join(methods.ROLES)})"
            )


def _at_least(key: str, value, low, *, above: bool = False) -> None:
    """``key`` must be a finite number >= ``low`` (> with ``above``); NaN and inf fail too."""
    if not ((low < value) if above else (low <= value)) or not value < math.inf:
        raise TailtuneError(f"{key} must be a number {'>' if above else '>='} {low:g}, got {value}")


def check_backbone(bb: BackboneConfig, slot: str) -> None:
    """The rules for one backbone section (``slot``: encoder, decoder; the library says backbone)."""
    if bb.pooling not in POOLINGS:
        raise TailtuneError(f"{slot}.pooling must be one of {', '.join(POOLINGS)}")
    _at_least(f"{slot}.max_length", bb.max_length, 8)
    _at_least(f"{slot}.batch_size", bb.batch_size, 1)
    _at_least(f"{slot}.eval_batch_size", bb.eval_batch_size, 1)
    if bb.epochs is not None and not 0 < bb.epochs < math.inf:
        raise TailtuneError(f"{slot}.epochs must be > 0 (or null for train.epochs)")
    if bb.lr is not None and not 0 <= bb.lr < math.inf:
        raise TailtuneError(f"{slot}.lr must be >= 0 (or null for train.lr)")
    if bb.adapt_layers is not None and bb.adapt_layers < 1:
        raise TailtuneError(f"{slot}.adapt_layers must be >= 1 (or null for all layers)")


def check_train(t: TrainConfig) -> None:
    """The rules for the train section."""
    from tailtune import weighting

    if t.precision not in PRECISIONS:
        raise TailtuneError(f"train.precision must be one of {', '.join(PRECISIONS)}")
    if t.head_init not in HEAD_INITS:
        raise TailtuneError(f"train.head_init must be one of {', '.join(HEAD_INITS)}")
    weighting.check(t.weighting)
    if not 0 < t.logit_tau <= MAX_LOGIT_TAU:
        # tau * log prior overflowed float32 far above this: the run failed its padding check with "nan"
        raise TailtuneError(f"train.logit_tau must be in (0, {MAX_LOGIT_TAU:g}] (Menon et al. use 1)")
    _at_least("train.epochs", t.epochs, 0, above=True)
    _at_least("train.lr", t.lr, 0)
    _at_least("train.head_lr", t.head_lr, 0)
    _at_least("train.grad_accum", t.grad_accum, 1)
    _at_least("train.eval_per_epoch", t.eval_per_epoch, 1)
    if t.early_stopping_patience < 1:
        raise TailtuneError("train.early_stopping_patience must be >= 1 (evaluations without a gain before stopping)")
    if t.checkpoint_every < 0:
        raise TailtuneError("train.checkpoint_every must be >= 0 (0 = no checkpoints)")
    if t.backbone_dropout is not None and not 0 <= t.backbone_dropout < 1:
        raise TailtuneError("train.backbone_dropout must be in [0, 1) (or null for the checkpoint's own)")
    if not 0 <= t.warmup_ratio < 1:
        raise TailtuneError("train.warmup_ratio must be in [0, 1)")
    if not 0 <= t.weight_decay < math.inf:
        raise TailtuneError("train.weight_decay must be >= 0")
    if not 0 <= t.seed <= MAX_SEED:
        raise TailtuneError(
            f"train.seed must be between 0 and {MAX_SEED} (numpy's and scikit-learn's range), got {t.seed}"
        )


def validate(cfg: Config) -> None:
    """Check cross-field rules; raise :class:`TailtuneError` naming the first problem."""
    from tailtune import systems, weighting
    from tailtune.data import text_codec

    if not cfg.systems:
        raise TailtuneError("config 'systems' is empty: name at least one system (e.g. tfidf-logreg)")
    specs = [systems.parse_system(name) for name in cfg.systems]
    if len(set(cfg.systems)) != len(cfg.systems):
        raise TailtuneError("config 'systems' lists a system twice")
    first: dict[tuple, str] = {}
    for spec in specs:
        other = first.setdefault(spec.identity, spec.name)
        if other != spec.name:
            raise TailtuneError(f"systems '{other}' and '{spec.name}' are the same system spelt two ways; list it once")
    d = cfg.data
    text_codec(d.encoding)
    if not (0 < d.val_size < 1 and 0 < d.test_size < 1 and d.val_size + d.test_size < 1):
        raise TailtuneError("data.val_size and data.test_size must be in (0, 1) and sum below 1")
    if d.min_class_count < 2:
        raise TailtuneError("data.min_class_count must be >= 2 so every class can be split")
    if d.max_rows is not None and d.max_rows < 1:
        raise TailtuneError("data.max_rows must be >= 1 (or null for every row)")
    for key, edges in (("data.tier_edges", d.tier_edges), ("data.demo.tier_edges", d.demo.tier_edges or [])):
        if list(edges) != sorted(set(edges)) or any(e < 1 for e in edges):
            raise TailtuneError(f"{key} must be strictly increasing positive counts")
    if len(d.tier_names) != len(d.effective_tier_edges) + 1:
        raise TailtuneError(
            f"data.tier_names needs {len(d.effective_tier_edges) + 1} names for {len(d.effective_tier_edges)} edges"
        )
    if len(set(d.tier_names)) != len(d.tier_names):
        raise TailtuneError(f"data.tier_names names a tier twice: {', '.join(d.tier_names)}")
    if not 0 <= d.demo.exponent < math.inf:
        raise TailtuneError("data.demo.exponent must be >= 0")
    for key, seed in (("data.seed", d.seed), ("data.demo.seed", d.demo.seed), ("eval.seed", cfg.eval.seed)):
        if not 0 <= seed <= MAX_SEED:
            raise TailtuneError(
                f"{key} must be between 0 and {MAX_SEED} (numpy's and scikit-learn's range), got {seed}"
            )
    for slot in ("encoder", "decoder"):
        check_backbone(getattr(cfg, slot), slot)
    check_method(cfg.method)
    check_train(cfg.train)
    for spec in specs:  # settings in a system's name: the same rules
        if spec.overrides:
            method, train, backbone, lr = spec.configs(cfg)
            where = f"system '{spec.name}': "
            check_method(method, who=where, key="")
            if backbone.epochs is not None and not 0 < backbone.epochs < math.inf:
                raise TailtuneError(f"{where}epochs must be > 0")
            if not all(0 <= v < math.inf for v in (train.head_lr, 0 if lr is None else lr)):
                raise TailtuneError(f"{where}lr and head_lr must be >= 0")
    if cfg.tfidf.class_weight not in (None, "balanced"):
        raise TailtuneError("tfidf.class_weight must be null or 'balanced'")
    _at_least("tfidf.C", cfg.tfidf.C, 0, above=True)
    _at_least("tfidf.max_features", cfg.tfidf.max_features, 1)
    _at_least("tfidf.ngram_max", cfg.tfidf.ngram_max, 1)
    if cfg.eval.n_boot < 10:
        raise TailtuneError("eval.n_boot must be >= 10")
    tune = cfg.tune
    if not tune.lr_factors or not all(0 < f < math.inf for f in tune.lr_factors):
        raise TailtuneError("tune.lr_factors must be a non-empty list of factors > 0")
    if len(set(tune.lr_factors)) < len(tune.lr_factors):  # the same trial trained twice
        raise TailtuneError(f"tune.lr_factors lists a factor twice: {tune.lr_factors}")
    if not tune.weightings:
        raise TailtuneError("tune.weightings must name at least one weighting")
    if len(set(tune.weightings)) < len(tune.weightings):
        raise TailtuneError(f"tune.weightings lists a weighting twice: {tune.weightings}")
    for scheme in tune.weightings:
        weighting.check(scheme)
    _at_least("tune.max_rows", tune.max_rows, 2)
    _at_least("tune.epochs", tune.epochs, 0, above=True)
    for choice in tune.chosen:
        if choice.system not in cfg.systems:
            raise TailtuneError(f"tune.chosen names '{choice.system}', which is not in systems")
        if not 0 <= choice.lr < math.inf:
            raise TailtuneError(f"tune.chosen: lr of '{choice.system}' must be >= 0")
        weighting.check(choice.weighting)
