"""One self-contained HTML report per run: the memo that turns a run directory into a decision.

:func:`build_report` reads only the run directory (``config.yaml``, ``data.json``,
``comparison.csv``, ``systems/<name>/{metrics.json,per_class.csv,predictions.csv}`` and the
optional ``bench.json``) and writes ``<run>/report.html``. Every number in the report comes
from those files; the only new numbers are paired bootstraps (:func:`tailtune.metrics.paired_bootstrap`)
and counts taken from the predictions. Figures are PNGs inlined as base64 and the CSS is
inline, so the file opens offline and prints.

Sections follow the memo: (1) systems comparison, (2) class weighting, (3) per-class analysis,
(4) latency and deployment, (5) next steps; with a data summary before them and the machine,
versions and resolved config after.

Sign conventions: encoder-vs-decoder differences are decoder minus encoder; weighting
differences are weighted minus unweighted. "Within noise" means the 95% paired-bootstrap
interval of the difference covers 0.
"""

from __future__ import annotations

import base64
import io
import json
import math
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from markupsafe import Markup

from tailtune import __version__
from tailtune.errors import TailtuneError

if TYPE_CHECKING:
    import pandas as pd

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
# Yellow comes last: it is hard to see on white.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"]
# Tiers read warm (rare) -> cool (common), same palette.
TIER_COLOURS = ["#D55E00", "#E69F00", "#56B4E9", "#0072B2", "#009E73", "#CC79A7"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
GREY = "#9a9a9a"

EM_DASH = "\u2014"
N_GAIN_LOSS = 5  # classes listed as gaining / losing most under weighting
N_DISAGREE = 10  # classes listed where encoder and decoder disagree most
N_CONFUSIONS = 10
CASCADE_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


# ----------------------------------------------------------------------------- blocks
# The template renders a list of sections, each a list of these blocks, by ``kind``.


@dataclass
class Cell:
    text: Any  # str or Markup
    num: bool = False
    best: bool = False
    sub: Any = ""  # a smaller second line (a CI, an architecture name)
    muted: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: Any = ""
    kind: str = "table"


@dataclass
class Figure:
    uri: str  # data:image/png;base64,...
    alt: str
    caption: Any
    width: int  # CSS pixels: the figure's size in inches at 96 px/inch, so fonts read as points
    kind: str = "figure"


@dataclass
class Para:
    text: Any
    style: str = ""  # "" | "callout" | "warning"
    kind: str = "p"


@dataclass
class Bullets:
    items: list[Any]
    kind: str = "ul"


@dataclass
class Heading:
    text: Any
    kind: str = "h3"


@dataclass
class Pre:
    text: str
    kind: str = "pre"


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)


# ----------------------------------------------------------------------------- loading


@dataclass
class SystemRun:
    """One row of comparison.csv plus whatever systems/<name>/ holds."""

    name: str
    status: str
    note: str
    row: dict
    metrics: dict | None = None
    per_class: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.metrics is not None

    @property
    def info(self) -> dict:
        return (self.metrics or {}).get("system") or {}

    def value(self, key: str) -> Any:
        """A number from metrics.json, else from comparison.csv; None when neither has it."""
        if self.metrics is not None and self.metrics.get(key) is not None:
            return self.metrics[key]
        return _clean(self.row.get(key))

    @property
    def macro_f1(self) -> float:
        return float(self.value("macro_f1"))

    def tier_f1(self, tier: str) -> float | None:
        return ((self.metrics or {}).get("tiers", {}).get(tier) or {}).get("macro_f1")


@dataclass
class Run:
    path: Path
    config_text: str | None
    config: dict
    data: dict
    systems: list[SystemRun]
    bench: dict | None
    labels: list[str]  # class index -> name
    tier_names: list[str]  # tiers holding at least one class, rare -> common
    tier_of: dict[str, str]
    train_counts: dict[str, int]
    y_true: np.ndarray | None  # (n_test,) class indices, shared by every system
    preds: dict[str, np.ndarray]  # system name -> (n_test,) class indices
    confidence: dict[str, np.ndarray]  # system name -> (n_test,)
    problems: list[str]  # files that were missing or unreadable, in words

    @property
    def ok_systems(self) -> list[SystemRun]:
        return [s for s in self.systems if s.ok]

    def tier_classes(self, tier: str | None = None) -> np.ndarray:
        """Indices of classes with test support (in ``tier``, or all), as metrics.py scores."""
        if self.y_true is None:
            return np.array([], dtype=int)
        present = np.unique(self.y_true)
        if tier is None:
            return present
        return np.array([i for i in present if self.tier_of.get(self.labels[i]) == tier])


def _clean(value: Any) -> Any:
    """NaN / empty cells of comparison.csv -> None; numpy scalars -> Python."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value.item() if hasattr(value, "item") else value


def _read_json(path: Path) -> dict:
    from tailtune.rundir import read_json_or_fail

    return read_json_or_fail(path, "run the same tailtune run command again to rewrite it")


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory into memory; only data.json and comparison.csv are required."""
    import pandas as pd
    import yaml

    path = Path(run_dir)
    if not path.is_dir():
        raise TailtuneError(f"run directory {path} does not exist")
    for required in ("data.json", "comparison.csv"):
        if not (path / required).is_file():
            raise TailtuneError(f"{path / required} is missing; is {path} a finished run?")
    problems: list[str] = []

    data = _read_json(path / "data.json")
    config_text = None
    config: dict = {}
    if (path / "config.yaml").is_file():
        config_text = (path / "config.yaml").read_text(encoding="utf-8")
        try:
            config = yaml.safe_load(config_text) or {}
        except yaml.YAMLError:
            problems.append("config.yaml is not valid YAML; it is shown as text only")
    else:
        problems.append("config.yaml is missing")

    from tailtune.run import files_intact, read_comparison

    comparison = read_comparison(path)

    systems = []
    for row in comparison.to_dict("records"):
        name = str(row["system"])
        status = str(_clean(row.get("status")) or "ok")
        system = SystemRun(name, status, str(_clean(row.get("note")) or ""), row)
        folder = path / "systems" / name
        if (folder / "metrics.json").is_file():
            system.metrics = _read_json(folder / "metrics.json")
        elif status == "ok":  # deleted since comparison.csv was written: its row's numbers are stale
            system.status = "missing"
            system.note = f"systems/{name}/metrics.json is missing; train it again with the run's command"
        if system.status == "ok" and not files_intact(folder):
            system.status = "missing"  # a file deleted or cut since it was written (files.json)
            system.note = (
                f"a file of systems/{name} is missing or cut since it was written; "
                "train it again with the run's command"
            )
        # Class names are text, even "None" or "N/A"; only the score columns may be missing.
        if (folder / "per_class.csv").is_file():
            system.per_class = pd.read_csv(
                folder / "per_class.csv",
                dtype={"label": str, "tier": str},
                keep_default_na=False,
                na_values={c: ["", "nan", "NaN"] for c in ("precision", "recall", "f1")},
            )
        if (folder / "predictions.csv").is_file():
            system.predictions = pd.read_csv(
                folder / "predictions.csv",
                dtype={"label": str, "prediction": str},
                keep_default_na=False,
                na_values={"confidence": ["", "nan", "NaN"]},
            )
        systems.append(system)
    versions = {
        json.dumps(s.metrics.get("versions") if isinstance(s.metrics, dict) else None, sort_keys=True)
        for s in systems
        if s.metrics is not None
    }
    if len(versions) > 1:  # a run resumed after an upgrade, or systems of a tailtune that kept none
        problems.append(
            "the systems were trained with different library versions (see where the numbers come "
            "from); train the older ones again for a like-for-like comparison"
        )

    tiers = data.get("tiers") or {}
    tier_classes = tiers.get("classes") or {}
    tier_names = [t for t in tiers.get("names", list(tier_classes)) if tier_classes.get(t)]
    tier_of = {label: tier for tier in tier_names for label in tier_classes[tier]}
    train_counts = {str(k): int(v) for k, v in (data.get("train_counts") or {}).items()}

    labels = list(train_counts)
    known = set(labels)
    for label in [*tier_of, *_prediction_labels(systems)]:
        if label not in known:
            labels.append(label)
            known.add(label)

    y_true, preds, confidence = _align_predictions(systems, labels, problems)
    bench = _read_json(path / "bench.json") if (path / "bench.json").is_file() else None
    if isinstance(bench, dict) and isinstance(bench.get("systems"), dict):
        bench["systems"] = _current_bench(path, bench["systems"], systems, problems)
    return Run(
        path=path,
        config_text=config_text,
        config=config if isinstance(config, dict) else {},
        data=data,
        systems=systems,
        bench=bench,
        labels=labels,
        tier_names=tier_names,
        tier_of=tier_of,
        train_counts=train_counts,
        y_true=y_true,
        preds=preds,
        confidence=confidence,
        problems=problems,
    )


def _current_bench(path: Path, measured: dict, systems: list[SystemRun], problems: list[str]) -> dict:
    """bench.json's entries for systems that are finished and unchanged since they were timed:
    a system that failed afterwards, or was trained again, kept its old latency row."""
    from tailtune.bench import unchanged

    ok = {s.name for s in systems if s.ok}
    current = {}
    for name, entry in measured.items():
        if name not in ok:
            continue
        if unchanged(path / "systems" / name, entry) is False:
            problems.append(
                f"bench.json's numbers for {name} predate its last training and are left out; "
                f"run tailtune bench {path} --systems {name}"
            )
            continue
        current[name] = entry
    return current


def _prediction_labels(systems: list[SystemRun]) -> list[str]:
    seen: dict[str, None] = {}
    for s in systems:
        if s.ok and s.predictions is not None:
            for col in ("label", "prediction"):
                seen.update(dict.fromkeys(s.predictions[col].astype(str)))
    return list(seen)


def _align_predictions(
    systems: list[SystemRun], labels: list[str], problems: list[str]
) -> tuple[np.ndarray | None, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Class-index arrays per system, all in the row order of the first system's file."""
    index = {label: i for i, label in enumerate(labels)}
    ref_ids = None
    y_true = None
    preds: dict[str, np.ndarray] = {}
    confidence: dict[str, np.ndarray] = {}
    for s in systems:
        if not s.ok or s.predictions is None:
            continue
        frame = s.predictions
        if ref_ids is None:
            ref_ids = frame["id"].tolist()
            y_true = frame["label"].astype(str).map(index).to_numpy(dtype=np.intp)
        elif frame["id"].tolist() != ref_ids:
            frame = frame.set_index("id").reindex(ref_ids)
            if frame["prediction"].isna().any():
                problems.append(
                    f"systems/{s.name}/predictions.csv covers other test rows; it is left out of the paired comparisons"
                )
                continue
            frame = frame.reset_index()
        preds[s.name] = frame["prediction"].astype(str).map(index).to_numpy(dtype=np.intp)
        if "confidence" in frame:
            confidence[s.name] = frame["confidence"].to_numpy(dtype=float)
    return y_true, preds, confidence


# ----------------------------------------------------------------------------- formatting


def fmt_metric(x: float | None) -> str:
    """Quality numbers everywhere in the report: three decimals."""
    return EM_DASH if x is None or _isnan(x) else f"{x:.3f}"


def fmt_delta(x: float | None) -> str:
    return EM_DASH if x is None or _isnan(x) else f"{x:+.3f}"


def fmt_ci(ci: list[float] | tuple[float, float] | None) -> str:
    if not ci or any(v is None for v in ci):
        return ""
    if ci[0] == ci[1]:  # every class's test rows all right or all wrong: resampling within classes cannot move it
        return "[no spread]"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def fmt_diff_ci(res: dict) -> str:
    """The interval of a paired difference, signed like the difference: '[-0.004, +0.066]'."""
    return f"[{res['lo']:+.3f}, {res['hi']:+.3f}]"


def fmt_share(part: float, whole: float) -> str:
    pct = 100 * part / whole
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def fmt_int(n: Any) -> str:
    return EM_DASH if n is None or _isnan(n) else f"{int(n):,}"


def fmt_count(n: float) -> str:
    """Parameter counts: 149M, 3.52M, 12.3K."""
    if n is None or _isnan(n):
        return EM_DASH
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return f"{int(n)}"


def fmt_bytes(n: float | None) -> str:
    if n is None or _isnan(n):
        return EM_DASH
    for size, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= size:
            return f"{n / size:.1f} {suffix}"
    return f"{int(n)} B"


def fmt_seconds(s: float | None) -> str:
    if s is None or _isnan(s):
        return EM_DASH
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_cost(usd: float) -> str:
    """'$0.000136' for fractions of a cent, '$1.23' otherwise: a cost never reads $0.00."""
    return f"${usd:,.2f}" if usd >= 0.01 or usd == 0 else f"${usd:.2g}"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def code(text: str) -> Markup:
    return Markup("<code>{}</code>").format(text)


def noise_word(res: dict) -> str:
    from tailtune.metrics import MIN_DECISIVE, beyond_noise

    if beyond_noise(res):
        return "outside noise"
    if not res["lo"] <= 0 <= res["hi"]:  # an interval off 0 that too few rows carry
        n = res["decisive"]
        return f"within noise (it rests on {n} test row{'' if n == 1 else 's'}; {MIN_DECISIVE} needed)"
    return "within noise"


def _better(res: dict | None) -> bool:
    """``res`` (a minus b) says a is better, beyond noise."""
    from tailtune.metrics import beyond_noise

    return res is not None and beyond_noise(res) and res["diff"] > 0


def _worse(res: dict | None) -> bool:
    from tailtune.metrics import beyond_noise

    return res is not None and beyond_noise(res) and res["diff"] < 0


def fmt_boot(res: dict) -> str:
    """'+0.031 [-0.004, +0.066]'."""
    return f"{res['diff']:+.3f} {fmt_diff_ci(res)}"


def _best_cells(values: list[float | None], higher_is_better: bool) -> list[bool]:
    real = [v for v in values if v is not None and not _isnan(v)]
    if len(real) < 2:
        return [False] * len(values)
    best = max(real) if higher_is_better else min(real)
    return [v is not None and not _isnan(v) and math.isclose(v, best) for v in values]


# ----------------------------------------------------------------------------- figures


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(
        {
            "font.size": 11,
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "legend.frameon": False,
            "legend.fontsize": 10,
        }
    ):
        yield


def _new_figure(width: float, height: float):
    # A bare Figure on the Agg canvas: unlike pyplot it leaves the caller's backend and
    # global figure list alone, so a notebook that calls build_report keeps working.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend_columns(names: list[str], width_in: float, most: int = 4, fontsize: float = 10) -> int:
    """Legend columns that fit ``width_in`` inches: four columns of sweep names such as
    "encoder-lora@rank=16+targets=attention" were wider than the figure, and constrained layout
    gave up ("axes sizes collapsed to zero") with a warning on the user's terminal."""
    # about 0.55 em per character, plus the handle and the padding between columns
    column = max(len(n) for n in names) * 0.55 * fontsize / 72 + 0.8
    return max(1, min(len(names), most, int(0.9 * width_in / column)))


def _png(fig, alt: str, caption: Any) -> Figure:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Figure(uri, alt, caption, width=round(fig.get_figwidth() * 96))


def _colours(run: Run) -> dict[str, str]:
    return {s.name: OKABE_ITO[i % len(OKABE_ITO)] for i, s in enumerate(run.systems)}


def _markers(run: Run) -> dict[str, str]:
    return {s.name: MARKERS[i % len(MARKERS)] for i, s in enumerate(run.systems)}


def _tier_colour(run: Run, tier: str) -> str:
    return TIER_COLOURS[run.tier_names.index(tier) % len(TIER_COLOURS)]


def plot_long_tail(run: Run) -> Figure | None:
    counts = sorted(run.train_counts.items(), key=lambda kv: -kv[1])
    if not counts:
        return None
    with _style():
        fig = _new_figure(10, 3.2)
        ax = fig.add_subplot()
        colours = [_tier_colour(run, run.tier_of[label]) if label in run.tier_of else GREY for label, _ in counts]
        ax.bar(range(len(counts)), [c for _, c in counts], width=0.85, color=colours)
        ax.set_yscale("log")
        ax.set_xlim(-0.8, len(counts) - 0.2)
        ax.set_xticks([])
        ax.grid(axis="x", visible=False)
        ax.set_xlabel(f"{len(counts)} classes, sorted by training examples")
        ax.set_ylabel("training examples (log scale)")
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color=_tier_colour(run, t), label=t) for t in run.tier_names],
            title="tier",
            loc="upper right",
        )
        return _png(
            fig,
            "Bar chart of training examples per class on a log scale, coloured by tier.",
            "Training examples per class (log scale), coloured by frequency tier.",
        )


def plot_tier_bars(run: Run, systems: list[SystemRun]) -> Figure | None:
    tiers = run.tier_names
    if not tiers or not systems:
        return None
    colours = _colours(run)
    n = len(systems)
    width = 0.8 / max(n, 2)
    with _style():
        fig = _new_figure(10, 4.2)
        ax = fig.add_subplot()
        top = 0.0
        for i, s in enumerate(systems):
            values = [s.tier_f1(t) for t in tiers]
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(tiers))]
            heights = [v if v is not None else 0 for v in values]
            bars = ax.bar(xs, heights, width * 0.95, color=colours[s.name], label=s.name)
            for bar, v in zip(bars, values, strict=True):
                label = "n/a" if v is None else f"{v:.2f}"
                ax.annotate(
                    label,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=8 if n <= 6 else 7,
                    rotation=90 if n > 8 else 0,
                )
            top = max(top, *heights)
        ax.set_xticks(range(len(tiers)), [_tier_tick(run, t) for t in tiers])
        ax.grid(axis="x", visible=False)
        ax.set_ylabel("macro-F1 within tier")
        ax.set_ylim(0, min(1.05, max(0.1, top) * 1.22))
        ax.legend(loc="upper left", ncols=_legend_columns([s.name for s in systems], fig.get_figwidth()))
        return _png(
            fig,
            "Grouped bar chart of macro-F1 per frequency tier for every system.",
            "Macro-F1 within each tier, rarest tier on the left. The number above a bar is its value.",
        )


def fmt_span(lo, hi) -> str:
    """ "5–26", or "30" when both ends are one count ("30–30" read like a typo)."""
    return f"{lo:,}" if lo == hi else f"{lo:,}\u2013{hi:,}"


def _tier_tick(run: Run, tier: str) -> str:
    members = [run.train_counts.get(c, 0) for c in run.data["tiers"]["classes"][tier]]
    if not members:
        return f"{tier}\nno classes"
    return (
        f"{tier}\n{len(members)} class{'es' if len(members) != 1 else ''}, {fmt_span(min(members), max(members))} train"
    )


def plot_weighting_deltas(run: Run, pairs: list[dict]) -> Figure | None:
    rows = [p for p in pairs if p["tiers"]]
    if not rows:
        return None
    tiers = run.tier_names
    n = len(rows)
    width = 0.8 / n
    with _style():
        fig = _new_figure(10, 3.8)
        ax = fig.add_subplot()
        ax.axhline(0, color="black", lw=0.8)
        for i, p in enumerate(rows):
            xs, ys, lo, hi = [], [], [], []
            for j, tier in enumerate(tiers):
                res = p["tiers"].get(tier)
                if res is None:
                    continue
                xs.append(j + (i - (n - 1) / 2) * width)
                ys.append(res["diff"])
                # A percentile interval need not contain the point estimate; clip to draw it.
                lo.append(max(0.0, res["diff"] - res["lo"]))
                hi.append(max(0.0, res["hi"] - res["diff"]))
            colour = OKABE_ITO[i % len(OKABE_ITO)]
            ax.bar(xs, ys, width * 0.9, color=colour, alpha=0.85, label=p["label"])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, lw=1)
        ax.set_xticks(range(len(tiers)), [_tier_tick(run, t) for t in tiers])
        ax.grid(axis="x", visible=False)
        ax.set_ylabel("\u0394 macro-F1 (weighted \u2212 unweighted)")
        ax.legend(loc="best")
        return _png(
            fig,
            "Bar chart of the change in per-tier macro-F1 from class weighting, with 95% paired-bootstrap intervals.",
            "Change in macro-F1 per tier from class weighting (above 0 = weighting helped), "
            "with 95% paired-bootstrap intervals. A bar whose interval crosses 0 is within noise.",
        )


def plot_enc_dec_scatter(enc: SystemRun, dec: SystemRun, joined: pd.DataFrame):
    from matplotlib.colors import Normalize

    x = joined["f1_enc"].to_numpy()
    y = joined["f1_dec"].to_numpy()
    logc = np.log10(np.maximum(joined["train_count"].to_numpy(dtype=float), 1))
    with _style():
        fig = _new_figure(7.4, 6.0)
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], ls="--", color=GREY, lw=1, zorder=1)
        norm = Normalize(vmin=logc.min(), vmax=max(logc.max(), logc.min() + 1e-9))
        points = ax.scatter(
            x,
            y,
            s=18 + 55 * norm(logc),
            c=logc,
            cmap="cividis",
            norm=norm,
            alpha=0.8,
            edgecolors="black",
            linewidths=0.4,
            zorder=2,
        )
        cbar = fig.colorbar(points, ax=ax, shrink=0.85)
        cbar.set_label("log\u2081\u2080 training examples")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_aspect("equal")
        ax.set_xlabel(f"per-class F1, encoder ({enc.name})")
        ax.set_ylabel(f"per-class F1, decoder ({dec.name})")
        above, below = int((y > x).sum()), int((y < x).sum())
        both_zero = int(((x == 0) & (y == 0)).sum())
        ax.set_title(f"decoder better on {above} classes, encoder on {below}, tied on {len(x) - above - below}")
        if both_zero:
            ax.annotate(
                f"{both_zero} at (0, 0)",
                (0, 0),
                xytext=(14, 22),
                textcoords="offset points",
                fontsize=8,
                arrowprops={"arrowstyle": "-", "color": GREY, "lw": 0.8},
            )
        return _png(
            fig,
            f"Scatter plot of per-class F1, {enc.name} on x against {dec.name} on y.",
            f"Each point is a class with test support: F1 of {enc.name} (x) against "
            f"{dec.name} (y). Above the dashed diagonal the decoder is better. Colour and size "
            "grow with the class's training examples (log scale).",
        )


def _binned_trend(logc: np.ndarray, f1: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean log-count and mean F1 in bins holding equal numbers of classes."""
    order = np.argsort(logc, kind="stable")
    chunks = np.array_split(order, n_bins)
    return (
        np.array([logc[c].mean() for c in chunks if c.size]),
        np.array([f1[c].mean() for c in chunks if c.size]),
    )


def plot_f1_vs_count(run: Run, systems: list[SystemRun]) -> Figure | None:
    curves = {}
    for s in systems:
        if s.per_class is None:
            continue
        pc = s.per_class[s.per_class["f1"].notna()]
        if len(pc):
            logc = np.log10(np.maximum(pc["train_count"].to_numpy(dtype=float), 1))
            curves[s.name] = (logc, pc["f1"].to_numpy(dtype=float))
    if not curves:
        return None
    colours = _colours(run)
    markers = _markers(run)
    boundaries = _tier_boundaries(run)
    panels = [*curves, "all systems: trend lines"] if len(curves) > 1 else list(curves)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with _style():
        fig = _new_figure(10, 3.1 * nrows + 0.3)
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        trends = {}
        for name, ax in zip(panels, axes, strict=False):
            for b in boundaries:
                ax.axvline(b, color=GREY, ls=":", lw=1)
            if name in curves:
                logc, f1 = curves[name]
                n_bins = max(2, min(8, len(f1) // 5))
                trends[name] = _binned_trend(logc, f1, n_bins)
                ax.scatter(
                    logc,
                    f1,
                    s=12,
                    alpha=0.45,
                    color=colours[name],
                    marker=markers[name],
                    linewidths=0,
                )
                ax.plot(*trends[name], color=colours[name], lw=2.4, solid_capstyle="round")
                ax.set_title(name)
            else:
                for other, (tx, ty) in trends.items():
                    ax.plot(tx, ty, color=colours[other], marker=markers[other], ms=4, label=other)
                ax.set_title("trend lines of all systems")
                # Below the panels: inside the small panel the legend would hide the lines.
                fig.legend(loc="outside lower center", ncols=_legend_columns(list(trends), fig.get_figwidth()))
            ax.set_ylim(-0.04, 1.04)
        for ax in axes[::ncols]:
            ax.set_ylabel("per-class F1")
        for k, ax in enumerate(axes[: len(panels)]):
            if k + ncols >= len(panels):  # no panel below this one: it carries the x axis
                ax.set_xlabel("log\u2081\u2080 training examples")
                ax.tick_params(labelbottom=True)
        return _png(
            fig,
            "Per-class F1 against log10 training examples, one panel per system, with a binned trend line.",
            "Per-class F1 against log\u2081\u2080 of the class's training examples. Dots are "
            "classes; the line joins the mean F1 of bins holding equal numbers of classes. "
            "Dotted verticals separate the tiers.",
        )


def _tier_boundaries(run: Run) -> list[float]:
    """log10 positions between adjacent tiers' training-count ranges."""
    out = []
    tiers = run.data["tiers"]["classes"]
    for lower, upper in zip(run.tier_names, run.tier_names[1:], strict=False):
        hi = max(run.train_counts.get(c, 0) for c in tiers[lower])
        lo = min(run.train_counts.get(c, 0) for c in tiers[upper])
        out.append((math.log10(max(hi, 1)) + math.log10(max(lo, 1))) / 2)
    return out


def plot_pareto(points: list[dict], frontier: list[str], colours: dict[str, str]) -> Figure:
    from matplotlib.ticker import FuncFormatter

    with _style():
        fig = _new_figure(10, 4.8)
        ax = fig.add_subplot()
        front = sorted((p for p in points if p["name"] in frontier), key=lambda p: p["ms"])
        ax.plot(
            [p["ms"] for p in front],
            [p["f1"] for p in front],
            color="black",
            lw=1.2,
            zorder=1,
            label="Pareto frontier",
        )
        for i, p in enumerate(sorted(points, key=lambda p: p["ms"])):
            on = p["name"] in frontier
            colour = colours[p["name"]] if on else GREY
            if p["ci"]:
                ax.errorbar(
                    p["ms"],
                    p["f1"],
                    yerr=[[max(0.0, p["f1"] - p["ci"][0])], [max(0.0, p["ci"][1] - p["f1"])]],
                    fmt="none",
                    ecolor=colour,
                    lw=1,
                    capsize=3,
                    zorder=2,
                )
            ax.scatter(p["ms"], p["f1"], s=70 if on else 45, color=colour, edgecolors="black", zorder=3)
            ax.annotate(
                p["name"] + ("" if on else " (dominated)"),
                (p["ms"], p["f1"]),
                xytext=(8, 8 if i % 2 == 0 else -14),
                textcoords="offset points",
                fontsize=9,
                color="black" if on else "#555555",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                zorder=4,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("latency, ms per example (log scale; left is faster)")
        ax.set_ylabel("macro-F1 (test, 95% CI)")
        lo_ms = min(p["ms"] for p in points)
        hi_ms = max(p["ms"] for p in points)
        ax.set_xlim(lo_ms / 1.6, hi_ms * 2.2)
        ax.margins(y=0.12)
        ax.legend(loc="lower right")
        return _png(
            fig,
            "Scatter plot of macro-F1 against milliseconds per example with the Pareto frontier drawn.",
            "Quality against latency. Systems on the frontier (joined) have no other system that "
            "is both faster and better; grey systems are dominated. Bars are 95% bootstrap CIs.",
        )


# ----------------------------------------------------------------------------- analysis


@dataclass
class Analysis:
    """Numbers several sections share, computed once."""

    n_boot: int
    seed: int
    best: SystemRun | None  # highest macro-F1 of all systems
    enc: SystemRun | None  # highest macro-F1 fine-tuned encoder
    dec: SystemRun | None  # highest macro-F1 fine-tuned decoder
    enc_dec: dict[str, dict] = field(default_factory=dict)  # "all" / tier -> bootstrap (dec-enc)
    weighting: list[dict] = field(default_factory=list)


def _best(systems: list[SystemRun]) -> SystemRun | None:
    return max(systems, key=lambda s: s.macro_f1, default=None)


def _bootstrap(run: Run, a: str, b: str, an_seed: int, n_boot: int, **kw) -> dict | None:
    """Paired bootstrap of metric(a) - metric(b); None without predictions for both."""
    from tailtune.metrics import paired_bootstrap

    if run.y_true is None or a not in run.preds or b not in run.preds:
        return None
    return paired_bootstrap(run.y_true, run.preds[a], run.preds[b], n_boot=n_boot, seed=an_seed, **kw)


def _tier_bootstraps(run: Run, a: str, b: str, n_boot: int, seed: int) -> dict[str, dict]:
    """macro-F1(a) - macro-F1(b) overall ("all") and per tier; {} without predictions."""
    overall = _bootstrap(run, a, b, seed, n_boot)
    if overall is None:
        return {}
    out = {"all": overall}
    for tier in run.tier_names:
        classes = run.tier_classes(tier)
        if classes.size:
            out[tier] = _bootstrap(run, a, b, seed, n_boot, classes=classes.tolist())
    return out


def analyse(run: Run, n_boot: int, seed: int) -> Analysis:
    ok = run.ok_systems
    finetuned = [s for s in ok if s.info.get("kind") == "finetune"]
    enc = _best([s for s in finetuned if s.info.get("backbone") == "encoder"])
    dec = _best([s for s in finetuned if s.info.get("backbone") == "decoder"])
    an = Analysis(n_boot=n_boot, seed=seed, best=_best(ok), enc=enc, dec=dec)
    if enc and dec:
        an.enc_dec = _tier_bootstraps(run, dec.name, enc.name, n_boot, seed)
    an.weighting = _weighting_pairs(run, n_boot, seed)
    return an


def _weighting_pairs(run: Run, n_boot: int, seed: int) -> list[dict]:
    """Each weighted system against its unweighted twin (same kind, backbone and method)."""
    groups: dict[tuple, dict[str, list[SystemRun]]] = {}
    for s in run.ok_systems:
        info = s.info
        key = (
            info.get("kind"),
            info.get("backbone"),
            info.get("method"),
            info.get("backbone_name"),
            s.name.partition("@")[2],  # a sweep point's settings: rank=4 pairs with rank=4 only
        )
        side = "none" if (info.get("weighting") or "none") == "none" else "weighted"
        groups.setdefault(key, {"none": [], "weighted": []})[side].append(s)
    pairs = []
    for (kind, backbone, method, _, _), group in groups.items():
        base = _best(group["none"])
        for w in group["weighted"]:
            if base is None:
                continue
            tiers = _tier_bootstraps(run, w.name, base.name, n_boot, seed)
            overall = tiers.pop("all", None)
            pairs.append(
                {
                    "backbone": backbone or kind,
                    "label": f"{backbone or kind}: {w.name} vs {base.name}",
                    "base": base,
                    "weighted": w,
                    "method": method,
                    "macro": overall,
                    "accuracy": _bootstrap(run, w.name, base.name, seed, n_boot, metric="accuracy"),
                    "tiers": tiers,
                    "single_row": _single_row_flips(base, w),
                }
            )
    return pairs


def _per_class_f1(s: SystemRun) -> pd.Series:
    """label -> F1, classes with test support only."""
    pc = s.per_class
    return pc[pc["f1"].notna()].set_index("label")["f1"]


def _joined_per_class(a: SystemRun, b: SystemRun, suffixes: tuple[str, str]) -> pd.DataFrame:
    """Per-class rows of a and b side by side (support > 0 only) with f1_<suffix> columns."""
    left = a.per_class[a.per_class["f1"].notna()]
    right = b.per_class[b.per_class["f1"].notna()][["label", "f1"]]
    joined = left[["label", "tier", "train_count", "support", "f1"]].merge(
        right, on="label", suffixes=tuple(f"_{x}" for x in suffixes)
    )
    return joined


# ----------------------------------------------------------------------------- sections


def section_summary(run: Run, an: Analysis) -> Section:
    from tailtune.metrics import MIN_DECISIVE

    sec = Section("summary", "At a glance")
    items: list[Any] = []
    ok = run.ok_systems
    if an.best is not None:
        ci = (an.best.metrics.get("ci") or {}).get("macro_f1")
        items.append(
            Markup("Highest macro-F1: <strong>{}</strong> with {} {} (accuracy {}).").format(
                an.best.name,
                fmt_metric(an.best.macro_f1),
                fmt_ci(ci),
                fmt_metric(an.best.value("accuracy")),
            )
        )
    if an.enc and an.dec and "all" in an.enc_dec:
        res = an.enc_dec["all"]
        items.append(
            Markup("Decoder minus encoder ({} \u2212 {}), macro-F1: {} ({}).").format(
                an.dec.name, an.enc.name, fmt_boot(res), noise_word(res)
            )
        )
    items.append(Markup("Recommendation (section 4): {}").format(_decide(run, an)[0]))
    for status in ("failed", "missing"):
        names = [s.name for s in run.systems if s.status == status]
        if names:
            items.append(Markup("{}: {} (reasons in table 1).").format(status.capitalize(), ", ".join(names)))
    items.append(
        f"{len(ok)} of {len(run.systems)} systems have results; "
        + ("bench.json is present." if run.bench else "bench.json is missing (no latency numbers).")
    )
    items.extend(run.problems)
    sec.blocks.append(Bullets(items))
    sec.blocks.append(
        Para(
            Markup(
                "<strong>How to read this.</strong> Macro-F1 averages F1 over classes, so a "
                "class with 5 training examples counts as much as one with 5,000; accuracy and "
                "weighted-F1 follow the common classes. Classes are grouped into tiers by their "
                "number of training examples, rarest first. Square brackets are 95% bootstrap "
                "intervals over test rows, redrawn within each class (<em>[no spread]</em>: each "
                "class's test rows are all right or all wrong, so no resample moves the score; "
                "that is not certainty). A difference between two systems is a "
                "<em>paired</em> bootstrap (both scored on the same resamples); when its "
                "interval covers 0, or fewer than {} test rows are right in one system and wrong in "
                "the other (too few for a sign test to reach p &lt; 0.05), the report calls it "
                "<em>within noise</em>. The intervals "
                "resample this split's test rows only: another split changes the training rows "
                "too, and where classes have one or two test rows it can move macro-F1 by more than "
                "these intervals show (<code>tailtune run --split-seeds 0,1,2</code> measures it). Zero-F1 counts "
                "classes with test examples that a system never gets right. The best value of a "
                'column is <span class="best-key">highlighted</span>.'
            ).format(MIN_DECISIVE),
            style="callout",
        )
    )
    return sec


def section_data(run: Run) -> Section:
    d = run.data
    sec = Section("data", "Data")
    kept = d.get("rows_kept")
    read = d.get("rows_read")
    share = f" ({fmt_pct(kept / read)})" if kept is not None and read else ""
    sec.blocks.append(
        Para(
            Markup(
                "Source {}, text column {}, label column {}. {} rows read, {} kept{}; "
                "{} classes after cleaning; split seed {}."
            ).format(
                code(str(d.get("source", "?"))),
                code(str(d.get("text_column", "?"))),
                code(str(d.get("label_column", "?"))),
                fmt_int(read),
                fmt_int(kept),
                share,
                fmt_int(d.get("n_classes", len(run.train_counts))),
                d.get("seed", EM_DASH),
            )
        )
    )
    dropped = d.get("dropped") or {}
    if dropped:
        rows = [[Cell(reason), Cell(fmt_int(n), num=True)] for reason, n in dropped.items()]
        sec.blocks.append(Table(["dropped because", "rows"], rows, "Rows removed while cleaning."))
    dropped_classes = d.get("dropped_classes") or []
    if dropped_classes:
        shown = ", ".join(map(str, dropped_classes[:12]))
        more = f" and {len(dropped_classes) - 12} more" if len(dropped_classes) > 12 else ""
        sec.blocks.append(Para(f"{len(dropped_classes)} classes were dropped: {shown}{more}."))

    test_counts = np.bincount(run.y_true, minlength=len(run.labels)) if run.y_true is not None else None
    total_train = sum(run.train_counts.values()) or 1
    rows = []
    for tier in run.tier_names:
        members = run.data["tiers"]["classes"][tier]
        counts = [run.train_counts.get(c, 0) for c in members]
        train_rows = sum(counts)
        test_rows = int(sum(test_counts[run.labels.index(c)] for c in members)) if test_counts is not None else None
        rows.append(
            [
                Cell(tier),
                Cell(fmt_int(len(members)), num=True),
                Cell(fmt_span(min(counts), max(counts)), num=True),
                Cell(f"{train_rows:,} ({fmt_pct(train_rows / total_train)})", num=True),
                Cell(
                    EM_DASH if test_rows is None else f"{test_rows:,} ({fmt_pct(test_rows / len(run.y_true))})",
                    num=True,
                ),
            ]
        )
    edges = (d.get("tiers") or {}).get("edges")
    sec.blocks.append(
        Table(
            ["tier", "classes", "training examples per class", "training rows", "test rows"],
            rows,
            f"Frequency tiers, rarest first (edges on training count: {edges})."
            if edges
            else "Frequency tiers, rarest first.",
        )
    )
    splits = d.get("splits") or {}
    if splits:
        sec.blocks.append(
            Table(
                list(splits),
                [[Cell(fmt_int(v), num=True) for v in splits.values()]],
                "Rows per split.",
            )
        )
    fig = plot_long_tail(run)
    if fig:
        sec.blocks.append(fig)
    return sec


def section_systems(run: Run, an: Analysis) -> Section:
    sec = Section("systems", "1. Systems comparison")
    header = [
        "system",
        "backbone",
        "method",
        "weighting",
        "params trained / total",
        "adapter on disk",
        "train time",
        "accuracy",
        "macro-F1",
        "weighted-F1",
        "zero-F1 classes",
        "note",
    ]

    def column(key: str) -> list[bool]:
        """Which rows hold the column's best value (failed systems never do)."""
        values = [_num(s.value(key)) if s.status == "ok" else None for s in run.systems]
        return _best_cells(values, higher_is_better=key in ("accuracy", "macro_f1", "weighted_f1"))

    best = {k: column(k) for k in ("accuracy", "macro_f1", "weighted_f1", "zero_f1_classes")}
    best["train_seconds"] = column("train_seconds")
    best["adapter_bytes"] = _best_cells(
        [_num(s.info.get("adapter_bytes")) for s in run.systems], higher_is_better=False
    )
    rows = []
    for i, s in enumerate(run.systems):
        info, failed = s.info, s.status != "ok"
        ci = (s.metrics or {}).get("ci") or {}
        total, trainable = _num(s.value("total_params")), _num(s.value("trainable_params"))
        # comparison.csv's note is the warnings joined with "; " (or a failure's reason)
        notes = list((s.metrics or {}).get("warnings", [])) or ([s.note] if s.note else [])

        shown = {  # column -> (value, line under it)
            "accuracy": (fmt_metric(_num(s.value("accuracy"))), fmt_ci(ci.get("accuracy"))),
            "macro_f1": (fmt_metric(_num(s.value("macro_f1"))), fmt_ci(ci.get("macro_f1"))),
            "weighted_f1": (fmt_metric(_num(s.value("weighted_f1"))), ""),
            "zero_f1_classes": (
                fmt_int(_num(s.value("zero_f1_classes"))),
                f"of {s.metrics['n_classes']}" if s.metrics else "",
            ),
        }
        quality = [
            Cell(EM_DASH if failed else text, num=True, best=best[key][i], sub=sub)
            for key, (text, sub) in shown.items()
        ]
        rows.append(
            [
                Cell(Markup("<strong>{}</strong>").format(s.name), sub=info.get("kind", "")),
                Cell(_breakable(info.get("backbone_name")), sub=info.get("backbone") or ""),
                Cell(
                    info.get("method") or EM_DASH,
                    sub=_method_sub(info),
                ),
                Cell(info.get("weighting") or EM_DASH),
                Cell(
                    f"{fmt_count(trainable)} / {fmt_count(total)}",
                    num=True,
                    sub=f"{fmt_share(trainable, total)} trained" if total and trainable else "",
                ),
                Cell(
                    fmt_bytes(_num(info.get("adapter_bytes"))),
                    num=True,
                    best=best["adapter_bytes"][i],
                ),
                Cell(
                    fmt_seconds(_num(s.value("train_seconds"))),
                    num=True,
                    best=best["train_seconds"][i],
                ),
                *quality,
                Cell(
                    Markup("<strong>{}</strong>: {}").format(s.status, s.note or "no reason recorded")
                    if failed
                    else "; ".join(notes) or "ok",
                    muted=not failed and not notes,
                ),
            ]
        )
    n_test = an.best.metrics.get("n_test") if an.best else None
    sec.blocks.append(
        Table(
            header,
            rows,
            "One row per system. Quality is on the test split"
            + (f" ({n_test:,} rows)" if n_test else "")
            + ", with the 95% bootstrap interval under accuracy and macro-F1. Trained parameters "
            "are those that received gradients. Highlighted: best in column (higher quality; "
            "fewer zero-F1 classes, bytes and seconds).",
        )
    )
    sec.blocks.extend(_systems_prose(run, an))
    tuned = [s for s in run.ok_systems if s.info.get("kind") == "finetune" and _num(s.value("trainable_params"))]
    if len(tuned) >= 3:  # a method comparison or a sweep: quality against what was trained
        sec.blocks.append(plot_quality_vs_params(tuned, _colours(run)))
    return sec


def _method_sub(info: dict) -> str:
    """The line under a method: its pooling, learning rate, and whether it merges away."""
    parts = [f"{info['pooling']} pooling"] if info.get("pooling") else []
    if info.get("lr") is not None:
        parts.append(f"lr {info['lr']:g}" + (" (tuned)" if info.get("tuned") else ""))
    if info.get("mergeable") is not None:
        parts.append("merges" if info["mergeable"] else "stays in forward")
    settings = info.get("settings") or {}
    parts += [f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in settings.items()]
    return ", ".join(parts)


def plot_quality_vs_params(systems: list[SystemRun], colours: dict[str, str]) -> Figure:
    from matplotlib.ticker import FuncFormatter

    with _style():
        fig = _new_figure(10, 4.4)
        ax = fig.add_subplot()
        for i, s in enumerate(sorted(systems, key=lambda s: _num(s.value("trainable_params")))):
            x, y = _num(s.value("trainable_params")), s.macro_f1
            ax.scatter(
                x,
                y,
                s=55,
                color=colours.get(s.name, GREY),
                edgecolors="black",
                zorder=3,
                marker="o" if s.info.get("mergeable", True) else "s",
            )
            ax.annotate(
                s.name,
                (x, y),
                xytext=(7, 7 if i % 2 == 0 else -13),
                textcoords="offset points",
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_count(v)))
        ax.set_xlabel("trained parameters (log scale)")
        ax.set_ylabel("macro-F1 (test)")
        ax.margins(x=0.25, y=0.15)
        return _png(
            fig,
            "Scatter plot of macro-F1 against the number of trained parameters of each fine-tuned system.",
            "Quality against trained parameters, one point per fine-tuned system. Circles merge into "
            "the base weights (no added latency); squares stay in the forward pass.",
        )


def _breakable(name: str | None) -> Any:
    """A hub id that may wrap after its '/' (long ids otherwise widen the whole table)."""
    if not name:
        return EM_DASH
    return Markup("/<wbr>").join(name.split("/"))


def _num(x: Any) -> float | None:
    x = _clean(x)
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _systems_prose(run: Run, an: Analysis) -> list[Any]:
    ok = run.ok_systems
    if not ok:
        return [Para("No system finished; there is nothing to compare.", style="warning")]
    if len(ok) == 1:
        return [
            Para(
                f"Only one system ({ok[0].name}) has results, so nothing is compared. "
                "List more systems in the config (for example tfidf-logreg, encoder-lora, "
                "decoder-lora) to get a comparison.",
                style="warning",
            )
        ]
    by_acc = max(ok, key=lambda s: _num(s.value("accuracy")) or 0)
    text = [
        Markup("<strong>{}</strong> has the highest macro-F1 ({}).").format(an.best.name, fmt_metric(an.best.macro_f1))
    ]
    if by_acc is not an.best:
        text.append(
            Markup(
                " The accuracy leader is a different system, <strong>{}</strong> ({} vs {}): "
                "the two metrics disagree about what matters, so read section 3."
            ).format(
                by_acc.name,
                fmt_metric(by_acc.value("accuracy")),
                fmt_metric(an.best.value("accuracy")),
            )
        )
    baseline = _best([s for s in ok if s.info.get("kind") == "baseline"])
    if baseline is not None and baseline is not an.best:
        text.append(
            f" The best baseline, {baseline.name}, reaches {fmt_metric(baseline.macro_f1)}: "
            f"{fmt_delta(an.best.macro_f1 - baseline.macro_f1)} for the best system."
        )
    seen = set()
    for s in ok:
        key = (s.info.get("backbone_name"), s.info.get("method"))
        total, trainable = _num(s.value("total_params")), _num(s.value("trainable_params"))
        if s.info.get("kind") == "finetune" and total and trainable and key not in seen:
            seen.add(key)
            text.append(
                f" {key[0] or s.info.get('backbone')} with {key[1] or 'fine-tuning'} trains "
                f"{fmt_count(trainable)} of {fmt_count(total)} parameters "
                f"({fmt_share(trainable, total)})."
            )
    return [Para(Markup("").join(text))]


def section_weighting(run: Run, an: Analysis) -> Section:
    sec = Section("weighting", "2. Class weighting")
    if not an.weighting:
        sec.blocks.append(Para(_missing_pair_advice(run), style="warning"))
        return sec
    for pair in an.weighting:
        base, w = pair["base"], pair["weighted"]
        sec.blocks.append(Heading(Markup("{}: {} vs {}").format(pair["backbone"], w.name, base.name)))
        zero = {
            tier: [((x.metrics.get("tiers") or {}).get(tier) or {}).get("zero_f1_classes") for x in (base, w)]
            for tier in run.tier_names
        }
        rows = [
            _paired_row("accuracy", base.value("accuracy"), w.value("accuracy"), pair["accuracy"]),
            _paired_row("macro-F1, all classes", base.macro_f1, w.macro_f1, pair["macro"]),
            _paired_row(
                "zero-F1 classes",
                base.value("zero_f1_classes"),
                w.value("zero_f1_classes"),
                None,
                count=True,
            ),
            *(
                _paired_row(
                    f"macro-F1, {tier} tier",
                    base.tier_f1(tier),
                    w.tier_f1(tier),
                    pair["tiers"].get(tier),
                    sub=f"zero-F1: {zero[tier][0]} \u2192 {zero[tier][1]}",
                )
                for tier in run.tier_names
            ),
        ]
        sec.blocks.append(
            Table(
                [
                    "",
                    base.name,
                    w.name,
                    "\u0394",
                    "95% paired CI of \u0394",
                    "P(weighted better)",
                    "",
                ],
                rows,
                f"Weighting ({w.info.get('weighting')}) against no weighting on the same "
                f"backbone and method. \u0394 = weighted \u2212 unweighted; "
                f"paired bootstrap, {an.n_boot} resamples.",
            )
        )
        sec.blocks.append(Para(_weighting_verdict(pair)))
        if base.per_class is not None and w.per_class is not None:
            sec.blocks.extend(_gain_loss_tables(base, w))
    fig = plot_weighting_deltas(run, an.weighting)
    if fig:
        sec.blocks.append(fig)
    sec.blocks.append(Para(_transfer_verdict(an), style="callout"))
    return sec


def _paired_row(label: str, a: Any, b: Any, res: dict | None, *, count: bool = False, sub: str = "") -> list[Cell]:
    """One row of a before/after table: a, b, b - a, and the paired bootstrap of b - a."""
    a, b = _num(a), _num(b)
    delta = None if a is None or b is None else b - a
    if count:
        shown = [fmt_int(a), fmt_int(b), EM_DASH if delta is None else f"{int(delta):+d}"]
    else:
        shown = [fmt_metric(a), fmt_metric(b), fmt_delta(delta)]
    return [
        Cell(label, sub=sub),
        *(Cell(text, num=True) for text in shown),
        Cell(fmt_diff_ci(res) if res else EM_DASH, num=True),
        Cell(fmt_pct(res["p_better"]) if res else EM_DASH, num=True),
        Cell(noise_word(res) if res else EM_DASH),
    ]


def _weighted_name(name: str) -> str:
    """The weighted twin's system name: the suffix goes before a sweep point's ``@settings``."""
    base, at, settings = name.partition("@")
    return f"{base}-weighted{at}{settings}"


def _missing_pair_advice(run: Run) -> Markup:
    from tailtune.systems import parse_system

    have = [s for s in run.ok_systems if s.info.get("kind") == "finetune"]
    unweighted = [s.name for s in have if (s.info.get("weighting") or "none") == "none"]
    # a -weighted system that --tune set to no weighting has no weighted twin to add
    tuned_none = [n for n in unweighted if parse_system(n).weighting == "config"]
    names = {s.name for s in run.systems}
    suggestions = [w for n in unweighted if n not in tuned_none and (w := _weighted_name(n)) not in names]
    if not suggestions and not tuned_none:
        suggestions = ["encoder-lora", "encoder-lora-weighted"]
    text = Markup(
        "No system has both an unweighted and a weighted version, so the effect of class "
        "weighting cannot be measured in this run."
    )
    if tuned_none:
        text += Markup(" <code>--tune</code> chose no weighting for {}.").format(
            Markup(", ").join(code(x) for x in tuned_none)
        )
    if suggestions:
        text += Markup(
            " Add {} to <code>systems</code> in the config (same backbone and method, with "
            "<code>train.weighting</code> set) and run again."
        ).format(Markup(" and ").join(code(x) for x in suggestions))
    return text


def _effect(res: dict | None) -> str:
    if res is None:
        return "unknown"
    if _better(res):
        return "helped"
    if _worse(res):
        return "hurt"
    return "within noise"


def _weighting_verdict(pair: dict) -> Markup:
    res = pair["macro"]
    if res is None:
        return Markup("Predictions are missing, so no paired interval could be computed.")
    effect = _effect(res)
    lead = {
        "helped": "Weighting <strong>helped</strong> macro-F1 on the {} backbone",
        "hurt": "Weighting <strong>hurt</strong> macro-F1 on the {} backbone",
        "within noise": "On the {} backbone the change in macro-F1 is <strong>within noise</strong>",
    }[effect]
    text = Markup(lead).format(pair["backbone"]) + Markup(": {} (P(better) = {}).").format(
        fmt_boot(res), fmt_pct(res["p_better"])
    )
    tier_bits = []
    for tier, tres in pair["tiers"].items():
        if _effect(tres) != "within noise":
            tier_bits.append(f"{tier} {fmt_delta(tres['diff'])} ({_effect(tres)})")
    if tier_bits:
        text += Markup(" Tiers outside noise: {}.").format("; ".join(tier_bits))
    else:
        text += Markup(" No single tier moves outside noise.")
    acc = pair["accuracy"]
    if acc is not None:
        text += Markup(" Accuracy changes by {} ({}).").format(fmt_boot(acc), noise_word(acc))
    return text + pair["single_row"]


def _single_row_flips(base: SystemRun, other: SystemRun) -> Markup:
    """A sentence when most of a macro-F1 change is classes with one test row flipping between
    F1 0 and 1: the stratified bootstrap always draws that row, so its interval cannot show
    how little such a flip says (a review: "helped, P(better) = 100%" on 3 such classes)."""
    if base.per_class is None or other.per_class is None:
        return Markup("")
    joined = _joined_per_class(base, other, ("a", "b"))
    delta = joined["f1_b"] - joined["f1_a"]
    single = (joined["support"] == 1) & (delta.abs() == 1)
    up, down = int((single & (delta > 0)).sum()), int((single & (delta < 0)).sum())
    total, flipped = delta.sum(), delta[single].sum()
    if not up + down or abs(flipped) < 0.5 * abs(total) or np.sign(flipped) != np.sign(total):
        return Markup("")
    return Markup(
        " The macro-F1 change rests on classes with a single test row: {} went from F1 0 to 1 and {} from 1 to 0, "
        "{:+.2f} in F1 summed over classes against {:+.2f} for the whole change. One row per class "
        "is little evidence, whatever the interval says."
    ).format(up, down, flipped, total)


def _gain_loss_tables(base: SystemRun, w: SystemRun) -> list[Any]:
    joined = _joined_per_class(base, w, ("base", "w"))
    joined["delta"] = joined["f1_w"] - joined["f1_base"]
    joined = joined.sort_values(["delta", "train_count"], ascending=[False, True], kind="stable")
    gains = joined[joined["delta"] > 0].head(N_GAIN_LOSS)
    losses = joined[joined["delta"] < 0].iloc[::-1].head(N_GAIN_LOSS)
    blocks: list[Any] = []
    header = ["class", "tier", "train", "test", base.name, w.name, "\u0394 F1"]
    for title, frame in (("gained most", gains), ("lost most", losses)):
        if frame.empty:
            blocks.append(Para(f"No class {title.split()[0]} F1 under weighting."))
            continue
        rows = [
            [
                Cell(r.label),
                Cell(r.tier),
                Cell(fmt_int(r.train_count), num=True),
                Cell(fmt_int(r.support), num=True),
                Cell(fmt_metric(r.f1_base), num=True),
                Cell(fmt_metric(r.f1_w), num=True),
                Cell(fmt_delta(r.delta), num=True),
            ]
            for r in frame.itertuples()
        ]
        blocks.append(
            Table(
                header,
                rows,
                f"Classes that {title} F1 with weighting. A class with one or two test rows moves "
                "by 0.5 or more on a single prediction: read the test column first.",
            )
        )
    return blocks


def _transfer_verdict(an: Analysis) -> Markup:
    by_backbone = {}
    for pair in an.weighting:
        if pair["backbone"] in ("encoder", "decoder"):
            by_backbone.setdefault(pair["backbone"], pair)
    enc, dec = by_backbone.get("encoder"), by_backbone.get("decoder")
    if enc and dec:
        e, d = _effect(enc["macro"]), _effect(dec["macro"])
        nums = Markup("encoder {}, decoder {}").format(fmt_boot(enc["macro"]), fmt_boot(dec["macro"]))
        if e == d == "within noise":
            return Markup(
                "<strong>Does the effect transfer from encoder to decoder?</strong> Neither "
                "backbone moves outside noise ({}), so there is no effect to transfer at this "
                "test-set size."
            ).format(nums)
        if e == d:
            return Markup(
                "<strong>Does the effect transfer from encoder to decoder?</strong> Yes: weighting {} both ({})."
            ).format(e, nums)
        return Markup(
            "<strong>Does the effect transfer from encoder to decoder?</strong> No: on the "
            "encoder weighting {}, on the decoder it {} ({})."
        ).format(*(f"is {x}" if x == "within noise" else x for x in (e, d)), nums)
    have, missing = ("encoder", "decoder") if enc else ("decoder", "encoder")
    source = enc or dec
    missing_base = an.dec if missing == "decoder" else an.enc
    suggestion = (
        _weighted_name(missing_base.name)
        if missing_base and (missing_base.info.get("weighting") or "none") == "none"
        else f"{missing}-lora and {missing}-lora-weighted"
    )
    if source is None:
        return Markup(
            "Whether weighting transfers from encoder to decoder needs an unweighted/weighted "
            "pair on both backbones: add {} and {}."
        ).format(code("encoder-lora-weighted"), code("decoder-lora-weighted"))
    return Markup(
        "Only the {} has a weighted/unweighted pair (weighting {}), so whether the effect "
        "transfers to the {} is untested. Add {} to the config."
    ).format(have, _effect(source["macro"]), missing, code(suggestion))


def section_per_class(run: Run, an: Analysis) -> Section:
    sec = Section("per-class", "3. Per-class analysis")
    ok = run.ok_systems
    if not ok:
        sec.blocks.append(Para("No system has results.", style="warning"))
        return sec
    sec.blocks.append(Heading("Macro-F1 by frequency tier"))
    fig = plot_tier_bars(run, ok)
    if fig:
        sec.blocks.append(fig)
    sec.blocks.append(_zero_f1_table(run, ok))
    sec.blocks.append(Para(_tier_prose(run, ok)))

    sec.blocks.append(Heading("Encoder against decoder, class by class"))
    if an.enc is None or an.dec is None:
        missing = [b for b, s in (("encoder", an.enc), ("decoder", an.dec)) if s is None]
        failed = [
            s.name
            for s in run.systems
            if s.status != "ok"
            and s.info.get("kind") in ("finetune", None)
            and s.info.get("backbone", s.name.split("-", 1)[0]) in missing
        ]
        all_failed = all(s.status == "failed" for s in run.systems if s.name in failed)
        one = len(failed) == 1
        advice = (
            Markup("{} {} ({} in section 1); {} and run again.").format(
                Markup(", ").join(code(n) for n in failed),
                "failed" if all_failed else ("has no results" if one else "have no results or failed"),
                "its reason is" if one else "their reasons are",
                ("fix " if all_failed else "train ") + ("it" if one else "them"),
            )
            if failed
            else Markup("Add {} to the config.").format(Markup(" and ").join(code(f"{b}-lora") for b in missing))
        )
        sec.blocks.append(
            Para(
                Markup(
                    "This comparison needs a fine-tuned encoder and a fine-tuned decoder "
                    "system; this run has no finished fine-tuned {}. {}"
                ).format(" and ".join(missing), advice),
                style="warning",
            )
        )
    elif an.enc.per_class is None or an.dec.per_class is None:
        sec.blocks.append(Para("per_class.csv is missing for the encoder or decoder system."))
    else:
        joined = _joined_per_class(an.enc, an.dec, ("enc", "dec"))
        sec.blocks.append(
            Para(
                f"The best fine-tuned system of each backbone by macro-F1: {an.enc.name} "
                f"(encoder) and {an.dec.name} (decoder)."
            )
        )
        sec.blocks.append(plot_enc_dec_scatter(an.enc, an.dec, joined))
        sec.blocks.append(_disagreement_table(an, joined))
        if an.enc_dec:
            sec.blocks.append(_enc_dec_tier_table(run, an))
            sec.blocks.append(Para(_enc_dec_prose(an), style="callout"))

    sec.blocks.append(Heading("F1 against training examples"))
    fig = plot_f1_vs_count(run, ok)
    if fig:
        sec.blocks.append(fig)
    sec.blocks.extend(_confusions(run, an))
    return sec


def _zero_f1_table(run: Run, systems: list[SystemRun]) -> Table:
    header = ["tier", "classes in test", *(s.name for s in systems)]
    rows = []
    for tier in [*run.tier_names, None]:
        counts = [
            (s.metrics.get("tiers", {}).get(tier) or {}).get("zero_f1_classes") if tier else s.value("zero_f1_classes")
            for s in systems
        ]
        n = (
            next(
                (s.metrics["tiers"][tier]["n_classes"] for s in systems if tier in s.metrics.get("tiers", {})),
                None,
            )
            if tier
            else systems[0].metrics.get("n_classes")
        )
        best = _best_cells([_num(c) for c in counts], False)
        rows.append(
            [
                Cell(tier or Markup("<strong>all</strong>")),
                Cell(fmt_int(n), num=True),
                *(
                    Cell(
                        fmt_int(c),
                        num=True,
                        best=b,
                        sub=fmt_pct(c / n) if n and c is not None else "",
                    )
                    for c, b in zip(counts, best, strict=True)
                ),
            ]
        )
    return Table(header, rows, "Classes with zero F1 per tier (share of the tier's test classes).")


def _tier_prose(run: Run, systems: list[SystemRun]) -> Markup:
    bits = []
    for tier in run.tier_names:
        scored = [(s, s.tier_f1(tier)) for s in systems if s.tier_f1(tier) is not None]
        if not scored:
            continue
        leader, value = max(scored, key=lambda x: x[1])
        low, low_value = min(scored, key=lambda x: x[1])
        bits.append(
            Markup("{} tier: {} leads with {}").format(tier, leader.name, fmt_metric(value))
            + (
                Markup(" ({} lowest at {})").format(low.name, fmt_metric(low_value))
                if low is not leader
                else Markup("")
            )
        )
    if not bits:
        return Markup("No tier has test classes.")
    first, last = run.tier_names[0], run.tier_names[-1]
    gaps = [
        (s.tier_f1(last) or 0) - (s.tier_f1(first) or 0)
        for s in systems
        if s.tier_f1(first) is not None and s.tier_f1(last) is not None
    ]
    text = Markup("; ").join(bits) + Markup(".")
    if len(gaps) == 1:
        text += Markup(" The {} tier scores {} macro-F1 {} than the {} tier.").format(
            last, fmt_metric(abs(gaps[0])), "more" if gaps[0] >= 0 else "less", first
        )
    elif gaps:
        text += Markup(" The gap between the {} and the {} tier ranges from {} to {} macro-F1 across systems.").format(
            last, first, fmt_metric(min(gaps)), fmt_metric(max(gaps))
        )
    if run.y_true is not None and run.tier_classes(last).size:
        text += Markup(" Accuracy in section 1 weighs classes by their test rows: the {} tier is {} of them.").format(
            last, fmt_pct(np.isin(run.y_true, run.tier_classes(last)).mean())
        )
    return text


def _disagreement_table(an: Analysis, joined: pd.DataFrame) -> Table:
    joined = joined.assign(delta=joined["f1_dec"] - joined["f1_enc"])
    joined = joined.assign(size=joined["delta"].abs())
    # Ties (common among tiny classes) go to the class with more test rows: the sturdier number.
    ranked = joined[joined["size"] > 0].sort_values(["size", "support"], ascending=[False, False], kind="stable")
    top = ranked.head(N_DISAGREE)
    # classes left out that differ as much as the last one shown: the cut is arbitrary among them
    tied = int((ranked["size"].iloc[len(top) :] == top["size"].iloc[-1]).sum()) if len(top) else 0
    rows = [
        [
            Cell(r.label),
            Cell(r.tier),
            Cell(fmt_int(r.train_count), num=True),
            Cell(fmt_int(r.support), num=True),
            Cell(fmt_metric(r.f1_enc), num=True),
            Cell(fmt_metric(r.f1_dec), num=True),
            Cell(fmt_delta(r.delta), num=True),
            Cell("decoder" if r.delta > 0 else "encoder"),
        ]
        for r in top.itertuples()
    ]
    return Table(
        [
            "class",
            "tier",
            "train",
            "test",
            an.enc.name,
            an.dec.name,
            "\u0394 (dec \u2212 enc)",
            "better",
        ],
        rows,
        f"The {len(rows)} classes where the two systems' F1 differ most"
        + (
            f" ({tied} more differ by as much, {fmt_metric(top['size'].iloc[-1])}; ties go to the class with "
            "more test rows)"
            if tied
            else ""
        )
        + ". Classes with few test rows swing easily: read the test column before the \u0394.",
    )


def _enc_dec_tier_table(run: Run, an: Analysis) -> Table:
    rows = []
    for key in [*run.tier_names, "all"]:
        res = an.enc_dec.get(key)
        if res is None:
            continue
        if key == "all":
            enc_v, dec_v, n = an.enc.macro_f1, an.dec.macro_f1, an.enc.metrics.get("n_classes")
        else:
            enc_v, dec_v = an.enc.tier_f1(key), an.dec.tier_f1(key)
            n = len(run.tier_classes(key))
        rows.append(
            [
                Cell(key if key != "all" else Markup("<strong>all classes</strong>")),
                Cell(fmt_int(n), num=True),
                Cell(fmt_metric(enc_v), num=True),
                Cell(fmt_metric(dec_v), num=True),
                Cell(fmt_delta(res["diff"]), num=True),
                Cell(fmt_diff_ci(res), num=True),
                Cell(fmt_pct(res["p_better"]), num=True),
                Cell(noise_word(res)),
            ]
        )
    return Table(
        [
            "tier",
            "classes",
            an.enc.name,
            an.dec.name,
            "\u0394 (dec \u2212 enc)",
            "95% paired CI",
            "P(decoder better)",
            "",
        ],
        rows,
        f"Macro-F1 per tier, decoder against encoder; paired bootstrap over test rows, {an.n_boot} resamples.",
    )


def _enc_dec_prose(an: Analysis) -> Markup:
    outside = {k: v for k, v in an.enc_dec.items() if k != "all" and (_better(v) or _worse(v))}
    inside = [k for k in an.enc_dec if k != "all" and k not in outside]
    overall = an.enc_dec["all"]
    text = Markup("Over all classes the decoder is {} ({}).").format(
        "ahead" if overall["diff"] > 0 else "behind" if overall["diff"] < 0 else "level",
        Markup("{} {}").format(fmt_boot(overall), noise_word(overall)),
    )
    if outside:
        text += Markup(" Outside noise: {}.").format(
            "; ".join(
                f"{t} tier, {'decoder' if r['diff'] > 0 else 'encoder'} better by {abs(r['diff']):.3f}"
                for t, r in outside.items()
            )
        )
    if inside:
        text += Markup(" Within noise: {}.").format(", ".join(inside))
    return text


def _confusions(run: Run, an: Analysis) -> list[Any]:
    best = an.best
    if best is None or run.y_true is None or best.name not in run.preds:
        return []
    y, p = run.y_true, run.preds[best.name]
    wrong = y != p
    if not wrong.any():
        return [Para(f"{best.name} makes no errors on the test split.")]
    n = len(run.labels)
    pairs = np.bincount(y[wrong] * n + p[wrong], minlength=n * n)
    support = np.bincount(y, minlength=n)
    order = np.argsort(-pairs, kind="stable")[:N_CONFUSIONS]
    order = order[pairs[order] > 0]
    rows = [
        [
            Cell(run.labels[k // n], sub=run.tier_of.get(run.labels[k // n], "")),
            Cell(run.labels[k % n], sub=run.tier_of.get(run.labels[k % n], "")),
            Cell(fmt_int(pairs[k]), num=True),
            Cell(fmt_pct(pairs[k] / support[k // n]), num=True),
        ]
        for k in order
    ]
    share = pairs[order].sum() / wrong.sum()
    into_common = sum(1 for k in order if run.tier_names and run.tier_of.get(run.labels[k % n]) == run.tier_names[-1])
    return [
        Heading(f"Top confusions of {best.name}"),
        Table(
            ["true class", "predicted as", "test rows", "share of the true class"],
            rows,
            "The most frequent errors of the highest-macro-F1 system; "
            + (f"these {len(rows)} pairs are" if len(rows) != 1 else "this pair is")
            + f" {fmt_pct(share)} of its {int(wrong.sum()):,} errors, and {into_common} of them "
            f"predict a class from the {run.tier_names[-1] if run.tier_names else 'top'} tier.",
        ),
    ]


def section_latency(run: Run, an: Analysis) -> Section:
    sec = Section("latency", "4. Latency and deployment")
    bench = run.bench
    points = []
    if bench is None:
        sec.blocks.append(
            Para(
                Markup(
                    "<strong>bench.json is missing</strong>: this run has no latency, "
                    "throughput or memory numbers. Produce them with {} (it measures every "
                    "finished system on this machine, writes {} and rebuilds this report), or pass "
                    "{} to {}. "
                    "The recommendation below uses quality only and is provisional."
                ).format(code(f"tailtune bench {run.path}"), code("bench.json"), code("--bench"), code("tailtune run")),
                style="warning",
            )
        )
    else:
        sec.blocks.extend(_bench_tables(run, bench))
        colours = _colours(run)
        for s in run.ok_systems:
            b = bench.get("systems", {}).get(s.name)
            if b and b.get("ms_per_example"):
                ci = (s.metrics.get("ci") or {}).get("macro_f1")
                points.append({"name": s.name, "ms": b["ms_per_example"], "f1": s.macro_f1, "ci": ci})
        if points:
            frontier = pareto_frontier(points)
            sec.blocks.append(plot_pareto(points, frontier, colours))
            dominated = [p["name"] for p in points if p["name"] not in frontier]
            sec.blocks.append(
                Para(
                    f"On the frontier: {', '.join(frontier)}."
                    + (f" Dominated: {', '.join(dominated)}." if dominated else "")
                )
            )
    sec.blocks.extend(_recommendation(run, an))
    return sec


def pareto_frontier(points: list[dict]) -> list[str]:
    """Names of points no other point beats on both ms (lower) and f1 (higher), fastest first."""
    frontier, best_f1 = [], -math.inf
    for p in sorted(points, key=lambda p: (p["ms"], -p["f1"])):
        if p["f1"] > best_f1:
            frontier.append(p["name"])
            best_f1 = p["f1"]
    return frontier


def _bench_tables(run: Run, bench: dict) -> list[Any]:
    from tailtune.bench import JOB_SIZE  # the volume bench.json's time_64k_s / cost_64k are for

    systems = [s for s in run.ok_systems if s.name in (bench.get("systems") or {})]
    if not systems:
        return [Para("bench.json holds no measurements of this run's systems.", style="warning")]
    entries = [bench["systems"][s.name] for s in systems]
    price = bench.get("price_per_hour")

    def col(key):
        return [_num(e.get(key)) for e in entries]

    best = {
        "ms_per_example": _best_cells(col("ms_per_example"), False),
        "examples_per_s": _best_cells(col("examples_per_s"), True),
        # each measured in a fresh process since bench.json has model_stamp; one process before
        "peak_mem_mb": _best_cells(col("peak_mem_mb"), False)
        if all("model_stamp" in e for e in entries)
        else [False] * len(entries),
        "time_64k_s": _best_cells(col("time_64k_s"), False),
        "cost_64k": _best_cells(col("cost_64k"), False),
    }
    rows = []
    for i, (s, e) in enumerate(zip(systems, entries, strict=True)):
        chosen = next(
            (
                v
                for v in e.get("variants", [])
                if v.get("variant") == e.get("variant") and v.get("batch_size") == bench.get("batch_size")
            ),
            {},
        )
        p50, p95 = chosen.get("p50_ms"), chosen.get("p95_ms")
        rows.append(
            [
                Cell(Markup("<strong>{}</strong>").format(s.name)),
                Cell(
                    e.get("variant") or EM_DASH,
                    sub=f"batch {chosen['batch_size']}" if "batch_size" in chosen else "",
                ),
                Cell(
                    f"{e['ms_per_example']:.2f}" if e.get("ms_per_example") is not None else EM_DASH,
                    num=True,
                    best=best["ms_per_example"][i],
                ),
                Cell(
                    f"{p50:.1f} / {p95:.1f}" if p50 is not None and p95 is not None else EM_DASH,
                    num=True,
                ),
                Cell(
                    f"{e['examples_per_s']:,.1f}" if e.get("examples_per_s") is not None else EM_DASH,
                    num=True,
                    best=best["examples_per_s"][i],
                ),
                Cell(
                    f"{e['peak_mem_mb']:,.0f} MB" if e.get("peak_mem_mb") is not None else EM_DASH,
                    num=True,
                    best=best["peak_mem_mb"][i],
                ),
                Cell(fmt_seconds(_num(e.get("time_64k_s"))), num=True, best=best["time_64k_s"][i]),
                Cell(
                    fmt_cost(e["cost_64k"]) if e.get("cost_64k") is not None else EM_DASH,
                    num=True,
                    best=best["cost_64k"][i],
                ),
            ]
        )
    machine = bench.get("machine") or {}
    where = machine.get("gpu") or machine.get("cpu") or "this machine"
    blocks: list[Any] = [
        Table(
            [
                "system",
                "variant",
                "ms / example",
                "p50 / p95 ms per batch",
                "examples / s",
                "peak memory",
                f"{JOB_SIZE // 1000}K complaints",
                f"cost of {JOB_SIZE // 1000}K",
            ],
            rows,
            f"Inference on {where}, batch size {bench.get('batch_size', EM_DASH)}; cost at "
            + (f"${price:,.2f} per hour" if price is not None else "an unknown price")
            + ". The variant is the one tailtune predict runs by default for each system (merged "
            "weights; bf16 only on hardware with native bf16), and serve for a system alone on its "
            "base; LoRA systems that share a base are served unmerged (the unmerged rows below). "
            "Peak memory is the resident-memory growth of a fresh process that loads the system "
            "and classifies the texts once (peak allocated memory on a GPU), after the libraries "
            "every system needs are imported.",
        )
    ]
    variant_rows = [
        [
            Cell(s.name),
            Cell(v.get("variant", EM_DASH)),
            Cell(fmt_int(v.get("batch_size")), num=True),
            Cell(
                f"{v['ms_per_example']:.2f}" if v.get("ms_per_example") is not None else EM_DASH,
                num=True,
            ),
            Cell(f"{v['p50_ms']:.1f}" if v.get("p50_ms") is not None else EM_DASH, num=True),
            Cell(f"{v['p95_ms']:.1f}" if v.get("p95_ms") is not None else EM_DASH, num=True),
            Cell(
                f"{v['examples_per_s']:,.1f}" if v.get("examples_per_s") is not None else EM_DASH,
                num=True,
            ),
        ]
        for s, e in zip(systems, entries, strict=True)
        for v in e.get("variants", [])
    ]
    if len(variant_rows) > len(systems):
        blocks.append(
            Table(
                ["system", "variant", "batch", "ms / example", "p50 ms", "p95 ms", "examples / s"],
                variant_rows,
                "Every measured serving variant.",
            )
        )
    missing = [s.name for s in run.ok_systems if s.name not in bench.get("systems", {})]
    if missing:
        blocks.append(Para(f"Not benchmarked: {', '.join(missing)}.", style="warning"))
    return blocks


RULES = [
    ("Common classes matter most, latency budget is tight", "encoder + LoRA"),
    ("Rare classes matter, and there is a latency budget to spend", "decoder + LoRA"),
    ("Maximum accuracy, cost no object", "full fine-tune (or a larger model)"),
    ("Many fine-tuned variants served at once", "adapters on one shared base"),
    # not in the study's rule, where the decoder wins the rare classes; runs here often say otherwise
    ("The encoder is no worse on the rare classes", "encoder + LoRA: the decoder buys nothing there"),
]


def _recommendation(run: Run, an: Analysis) -> list[Any]:
    blocks: list[Any] = [Heading("Recommendation")]
    rare = run.tier_names[0] if run.tier_names else None
    facts: list[Any] = []
    if run.y_true is not None and rare:
        rare_rows = np.isin(run.y_true, run.tier_classes(rare)).mean()
        n_rare = len(run.data["tiers"]["classes"][rare])
        facts.append(
            f"The {rare} tier is {n_rare} of {len(run.train_counts)} classes and "
            f"{fmt_pct(rare_rows)} of test rows: it weighs "
            f"{fmt_pct(n_rare / max(1, len(run.train_counts)))} in macro-F1 and {fmt_pct(rare_rows)} "
            "in accuracy."
        )
    ms = _ms_per_example(run)
    tail = [s for s in run.ok_systems if rare and s.tier_f1(rare) is not None]
    best_tail = max(tail, key=lambda s: s.tier_f1(rare), default=None)
    if best_tail is not None:
        fact = f"Best on the {rare} tier: {best_tail.name} ({fmt_metric(best_tail.tier_f1(rare))})"
        if ms and best_tail.name in ms:
            slowest = max(ms, key=ms.get)
            fact += (
                "; it is also the slowest benchmarked system."
                if slowest == best_tail.name
                else f"; it is not the slowest benchmarked system ({slowest} is)."
            )
        else:
            fact += "."
        facts.append(fact)
    ratio = _latency_ratio(run, an)
    if ratio is not None:
        facts.append(
            f"Latency: {an.dec.name} takes {ms[an.dec.name]:.2f} ms per example, "
            f"{an.enc.name} {ms[an.enc.name]:.2f} ms: "
            + (
                f"the decoder costs {ratio:.1f}\u00d7 the encoder."
                if ratio >= 1
                else f"the decoder is {1 / ratio:.1f}\u00d7 faster than the encoder here."
            )
        )
    rare_res = an.enc_dec.get(rare) if rare else None
    if rare_res is not None:
        facts.append(
            f"Decoder minus encoder on the {rare} tier: {fmt_boot(rare_res)} macro-F1, {noise_word(rare_res)}."
        )
    adapters = [s for s in run.ok_systems if _num(s.info.get("adapter_bytes"))]
    if adapters:
        small = min(adapters, key=lambda s: s.info["adapter_bytes"])
        total, trained = _num(small.value("total_params")), _num(small.value("trainable_params"))
        base = "" if total is None else f" against a base of {fmt_count(total - (trained or 0))} parameters"
        facts.append(
            f"One adapter is {fmt_bytes(small.info['adapter_bytes'])} on disk ({small.name}){base}, "
            "so many variants can share one base model."
        )

    rows = [[Cell(situation), Cell(choice)] for situation, choice in RULES]
    verdict, situation = _decide(run, an)
    for row, (sit, _) in zip(rows, RULES, strict=True):
        if sit == situation:
            row[0].best = row[1].best = True
    blocks.append(
        Table(
            ["situation", "reach for"],
            rows,
            "The rule. The highlighted row is where this run's numbers put it.",
        )
    )
    if facts:
        blocks.append(Bullets(facts))
    blocks.append(Para(verdict, style="callout"))
    return blocks


def _ms_per_example(run: Run) -> dict[str, float]:
    """Benchmarked latency of each finished system; {} without bench.json."""
    bench = (run.bench or {}).get("systems") or {}
    return {
        s.name: float(bench[s.name]["ms_per_example"])
        for s in run.ok_systems
        if (bench.get(s.name) or {}).get("ms_per_example")
    }


def _latency_ratio(run: Run, an: Analysis) -> float | None:
    """ms per example of the best decoder over the best encoder."""
    ms = _ms_per_example(run)
    if an.enc and an.dec and an.enc.name in ms and an.dec.name in ms:
        return ms[an.dec.name] / ms[an.enc.name]
    return None


def _beat_words(run: Run, res: dict, a: str, b: str, other: str) -> Markup:
    """'did not beat <other> beyond noise (+0.004 [-0.015, +0.022] macro-F1)', 'scored below ...'
    when ``a`` is worse, or, when ``a`` and ``b`` predict the same class on every test row (a
    fine-tuned system that kept its LP-FT start), 'made the same prediction as <other> on every
    test row' instead of a difference of +0.000 [+0.000, +0.000]."""
    if np.array_equal(run.preds[a], run.preds[b]):
        return Markup("made the same prediction as {} on every test row").format(other)
    verb = "scored below" if _worse(res) else "did not beat"
    return Markup("{} {} beyond noise ({} macro-F1)").format(verb, other, fmt_boot(res))


def _deployable(run: Run, an: Analysis, tuned: SystemRun) -> tuple[SystemRun, Markup, Markup]:
    """(system to deploy, its description, why) for the fine-tuned system the rule picked.

    Its backbone's frozen probe instead, when fine-tuning does not beat the probe beyond noise:
    at serving time both are one forward pass of the same backbone, and the probe needs no
    fine-tuning (on the products sample LoRA kept the probe's head on two of three splits, so
    the two made the same predictions). And the TF-IDF baseline when that system does not beat
    it beyond noise either: nothing then earns the extra serving cost.
    """
    backbone, method = tuned.info.get("backbone"), tuned.info.get("method")
    pick = tuned
    name = Markup("{} ({} + {})").format(tuned.name, backbone, "LoRA" if method == "lora" else method)
    why = Markup("")
    probe = _best([s for s in run.ok_systems if s.info.get("kind") == "probe" and s.info.get("backbone") == backbone])
    diff = None if probe is None else _bootstrap(run, tuned.name, probe.name, an.seed, an.n_boot)
    if diff is not None and not _better(diff):
        pick = probe
        name = Markup("{} (frozen {} + linear head)").format(probe.name, backbone)
        why = Markup(
            " It is the frozen probe, not {}: fine-tuning {}, and at serving time both "
            "are one forward pass of the same {}: the probe is the simpler system{}."
        ).format(
            tuned.name,
            _beat_words(run, diff, tuned.name, probe.name, "the probe"),
            backbone,
            ", and better" if _worse(diff) else ", with no measurable loss",
        )
    baseline = _best([s for s in run.ok_systems if s.info.get("kind") == "baseline"])
    versus = None if baseline is None else _bootstrap(run, pick.name, baseline.name, an.seed, an.n_boot)
    if versus is not None and not _better(versus):
        steps = Markup("")
        if pick is not tuned:  # the probe's step, told as a step towards the baseline
            steps = Markup(" Fine-tuning {} {};").format(
                tuned.name, _beat_words(run, diff, tuned.name, probe.name, f"its frozen probe {probe.name}")
            )
        return (
            baseline,
            Markup("{} (TF-IDF + logistic regression)").format(baseline.name),
            steps
            + Markup(
                " {}{} {}: on this data the baseline, the simplest system to "
                "serve, is the one to deploy until a system beats it."
            ).format(
                "and " if steps else "",
                pick.name,
                _beat_words(run, versus, pick.name, baseline.name, f"the baseline {baseline.name}"),
            ),
        )
    ms = _ms_per_example(run)
    if pick.name in ms:
        why += Markup(" {} takes {:.2f} ms per example in bench.json.").format(pick.name, ms[pick.name])
    return pick, name, why


def _decide(run: Run, an: Analysis) -> tuple[Markup, str | None]:
    """The recommendation in words and the row of RULES it corresponds to."""
    rare_res = an.enc_dec.get(run.tier_names[0]) if run.tier_names else None
    ratio = _latency_ratio(run, an)
    provisional = (
        Markup(" <em>Provisional: without bench.json the latency side of the rule is unknown.</em>")
        if run.bench is None
        else Markup("")
    )
    if an.enc is None or an.dec is None:
        if an.best is None:
            return Markup("No system finished, so there is nothing to recommend."), None
        return (
            Markup(
                "This run cannot place itself in the rule: it needs both a fine-tuned encoder "
                "and a fine-tuned decoder. On quality alone the best system is <strong>{}</strong> "
                "(macro-F1 {}).{}"
            ).format(an.best.name, fmt_metric(an.best.macro_f1), provisional),
            None,
        )
    enc, dec = an.enc.name, an.dec.name
    _, enc_pick, enc_why = _deployable(run, an, an.enc)
    dec_system, dec_pick, dec_why = _deployable(run, an, an.dec)
    baseline = dec_system.info.get("kind") == "baseline"
    cost = Markup("")
    if ratio:
        cost = (
            Markup(", at {:.1f}\u00d7 the encoder's latency").format(ratio)
            if ratio >= 1
            else Markup(", though it runs {:.1f}\u00d7 faster than the encoder in bench.json").format(1 / ratio)
        )
    overall = an.enc_dec.get("all")
    if _better(rare_res) and not baseline:  # a decoder the baseline matches is not worth its cost
        return (
            Markup(
                "<strong>Deploy {} if the rare classes matter and the latency "
                "budget allows it.</strong> {} beats {} on the rare tier beyond noise ({}){}. If "
                "latency is tight or the rare classes carry little value, {} is the fallback.{}{}{}"
            ).format(dec_pick, dec, enc, fmt_boot(rare_res), cost, enc_pick, dec_why, enc_why, provisional),
            RULES[1][0],
        )
    rare_words = (
        Markup("its rare-tier difference is {} ({})").format(noise_word(rare_res), fmt_boot(rare_res))
        if rare_res is not None
        else Markup("the rare tier could not be compared (no paired predictions)")
    )
    if _better(overall):
        return (
            Markup(
                "<strong>Deploy {} under a latency budget; {} only if cost is "
                "no object.</strong> The decoder is better over all classes beyond noise ({}), "
                "but {}: it buys quality on the classes that already work{}.{}{}"
            ).format(enc_pick, dec, fmt_boot(overall), rare_words, cost, enc_why, provisional),
            RULES[2][0],
        )
    if _worse(rare_res):
        why = Markup("The decoder is worse on the rare tier, beyond noise ({})").format(fmt_boot(rare_res))
    elif ratio and ratio >= 1:  # not better where it should be, and slower: measured
        why = Markup("The decoder does not earn its cost here: {}").format(rare_words)
    else:
        why = Markup("The decoder is not better here: {}").format(rare_words)
    return (
        Markup("<strong>Deploy {}.</strong> {}{}.{}{}").format(enc_pick, why, cost, enc_why, provisional),
        RULES[4][0] if rare_res is not None else None,
    )


def section_next(run: Run, an: Analysis) -> Section:
    sec = Section("next", "5. Next steps")
    ok = [s for s in run.ok_systems if s.per_class is not None]
    items: list[Any] = []
    experiment: Any = None
    if ok:
        f1 = [_per_class_f1(s) for s in ok]
        zero_everywhere = set(f1[0][f1[0] == 0].index)
        for series in f1[1:]:
            zero_everywhere &= set(series[series == 0].index)
        if zero_everywhere:
            counts = sorted(run.train_counts.get(c, 0) for c in zero_everywhere)
            per_tier = [sum(run.tier_of.get(c) == t for c in zero_everywhere) for t in run.tier_names]
            where = ", ".join(f"{n} {t}" for t, n in zip(run.tier_names, per_tier, strict=True) if n)
            every = "in every system" if len(ok) > 1 else f"in {ok[0].name}, the only system"
            if len(zero_everywhere) == 1:
                found = f"1 class has zero F1 {every} ({where}); its training count is {counts[0]:,}. No method here learns it: it needs"
            else:
                found = (
                    f"{len(zero_everywhere)} classes have zero F1 {every} ({where}); their training counts run "
                    f"{fmt_span(counts[0], counts[-1])}. No method here learns them: they need"
                )
            items.append(
                f"{found} more labelled examples, merging into a parent class, or a different signal (e.g. few-shot "
                "prompting)."
            )
            experiment = (
                f"Double the training examples of the {len(zero_everywhere)} never-learned "
                + ("class" if len(zero_everywhere) == 1 else "classes")
                + f" (training counts {fmt_span(counts[0], counts[-1])}), by labelling or by augmentation, and "
                f"rerun {an.best.name}: does macro-F1 on "
                + ", ".join(
                    f"the {t} tier" for t in run.tier_names if any(run.tier_of.get(c) == t for c in zero_everywhere)
                )
                + " move?"
            )
        else:
            items.append("Every class with test rows is learned by at least one system.")
        best = an.best
        if best is not None and best.metrics.get("tiers"):
            worst_tier, stats = max(best.metrics["tiers"].items(), key=lambda kv: kv[1].get("zero_f1_classes") or 0)
            if stats.get("zero_f1_classes"):
                lo, hi = stats.get("train_range") or [None, None]
                items.append(
                    f"In {best.name}, the {worst_tier} tier holds the most zero-F1 classes: "
                    f"{stats['zero_f1_classes']} of {stats['n_classes']}"
                    + (f" (training counts {fmt_span(lo, hi)})." if lo is not None else ".")
                )
    for pair in an.weighting:
        acc = pair["accuracy"]
        items.append(
            Markup("Weighting ({}): macro-F1 {} ({}){}.").format(
                pair["label"],
                _effect(pair["macro"]),
                fmt_boot(pair["macro"]) if pair["macro"] else "no predictions",
                Markup("; accuracy {} ({})").format(_effect(acc), fmt_boot(acc)) if acc else "",
            )
            + pair["single_row"]
        )
    if not an.weighting:
        items.append(_missing_pair_advice(run))
    elif an.enc and an.dec and not all(any(p["backbone"] == b for p in an.weighting) for b in ("encoder", "decoder")):
        items.append(_transfer_verdict(an))
    items.extend(_probe_checks(run, an))
    items.extend(_collapse_checks(run))
    items.extend(_pooling_advice(an))
    for s in run.systems:
        if s.status != "ok":
            items.append(Markup("Fix and rerun {}: {}").format(s.name, s.note or "failed"))
    if run.bench is None:
        items.append(Markup("Run {} to add latency and cost.").format(code(f"tailtune bench {run.path}")))
    sec.blocks.append(Bullets(items))

    cascade = _cascade(run, an)
    if cascade is not None:
        table, best_row = cascade
        sec.blocks.append(Heading("A cheap experiment: encoder first, decoder when unsure"))
        sec.blocks.append(table)
        if best_row is None:
            sec.blocks.append(
                Para(
                    f"No threshold beats {an.enc.name} alone on macro-F1 here, so routing "
                    f"rows to {an.dec.name} is not worth trying on this run."
                )
            )
        elif experiment is None:
            experiment = (
                f"Serve {an.enc.name} and send rows whose confidence is below "
                f"{best_row['t']:.1f} to {an.dec.name}; tune the threshold on the validation "
                "split and measure macro-F1 and mean latency on test."
            )
    if experiment is None and an.enc and an.dec and not any(p["backbone"] == "decoder" for p in an.weighting):
        experiment = f"Train {_weighted_name(an.dec.name)} to test whether weighting transfers to the decoder."
    if experiment is None and an.best is not None:
        experiment = _rank_experiment(run, an.best)
    if experiment:
        sec.blocks.append(Para(Markup("<strong>Next experiment.</strong> {}").format(experiment), style="callout"))
    return sec


def _pooling_advice(an: Analysis) -> list[Markup]:
    """When the decoder reads its last token and trails the encoder beyond noise: the mean of its
    hidden states was the larger lever on the products sample (docs/recipes.md section 15)."""
    if an.dec is None or an.dec.info.get("pooling") != "last" or not _worse(an.enc_dec.get("all")):
        return []
    return [
        Markup(
            "{} reads the decoder's last token. On the CFPB products sample, the mean of a frozen "
            "SmolLM2's hidden states scored +0.15 macro-F1 over its last token as a probe, and +0.07 "
            "with LoRA, on three splits (docs/recipes.md, section 15): try {} (the model then exports "
            "with {} only)."
        ).format(an.dec.name, code("decoder.pooling=mean"), code("--format tailtune"))
    ]


def _rank_experiment(run: Run, best: SystemRun) -> str:
    """The next experiment on the best system, in terms of what that system is."""
    tier = run.tier_names[0] if run.tier_names else "rarest"
    from tailtune import methods

    kind, method = best.info.get("kind"), best.info.get("method")
    if kind == "finetune" and method in methods.METHODS and "rank" in methods.get(method).uses:
        return (
            f"Raise the rank or add target modules on {best.name} and check whether the {tier} tier "
            "moves outside noise."
        )
    if kind == "finetune":
        return (
            f"Try LoRA on the same backbone against {best.name} ({best.info.get('backbone')}-lora) and "
            f"check whether the {tier} tier moves outside noise."
        )
    have = {s.name.split("@")[0] for s in run.systems}
    missing = [n for n in ("encoder-probe", "encoder-lora") if n not in have]
    if missing:
        return f"Add {' and '.join(missing)} and check whether they beat {best.name} on the {tier} tier outside noise."
    return (
        f"No backbone here beats {best.name}: try a larger encoder (encoder.name=<folder or hub name>) "
        "or a longer encoder.max_length, and check the per-class table for classes that need more examples."
    )


def _probe_checks(run: Run, an: Analysis) -> list[str]:
    """Per backbone, the best fine-tuned system against the frozen probe, by paired bootstrap
    (as the recommendation of section 4 judges them)."""
    out = []
    ok = run.ok_systems
    for backbone in ("encoder", "decoder"):
        probes = [s for s in ok if s.info.get("kind") == "probe" and s.info.get("backbone") == backbone]
        tuned = [s for s in ok if s.info.get("kind") == "finetune" and s.info.get("backbone") == backbone]
        if not probes or not tuned:
            continue
        probe, tune = _best(probes), _best(tuned)
        res = _bootstrap(run, tune.name, probe.name, an.seed, an.n_boot)
        versus = f"{tune.name} {fmt_metric(tune.macro_f1)} vs {probe.name} {fmt_metric(probe.macro_f1)}" + (
            f", {fmt_boot(res)} {noise_word(res)}" if res else ""
        )
        if _better(res):
            out.append(f"Fine-tuning beats the frozen {backbone} probe: {versus}.")
        elif _worse(res):
            out.append(
                f"Fine-tuning is worse than the frozen {backbone} probe, beyond noise ({versus}): it "
                "lost what the probe's features knew, or collapsed. Check its training loss, learning "
                "rate and epochs, or start it from the probe's head (train.head_init=probe)."
            )
        else:
            out.append(
                f"Fine-tuning does not beat the frozen {backbone} probe beyond noise ({versus}): "
                "it added nothing measurable, or collapsed. Check its training loss, learning "
                "rate and epochs before trusting the fine-tuned numbers."
            )
    return out


def _collapse_checks(run: Run) -> list[str]:
    out = []
    for name, pred in run.preds.items():
        counts = np.bincount(pred, minlength=len(run.labels))
        top = int(counts.argmax())
        share, used = counts[top] / pred.size, np.count_nonzero(counts)
        true_share = float(np.mean(run.y_true == top)) if run.y_true is not None else 0.0
        collapsed = used == 1 or (used == 2 and len(run.labels) >= 5)
        if collapsed or (share > 0.5 and share > 1.5 * true_share):
            out.append(
                f"{name} predicts {run.labels[top]!r} for {fmt_pct(share)} of test rows (the "
                f"labels: {fmt_pct(true_share)}) and uses {used} of {len(run.labels)} classes: "
                + ("it looks collapsed." if collapsed else "it over-predicts that class.")
            )
    return out


def _cascade(run: Run, an: Analysis) -> tuple[Table, dict | None] | None:
    """Route low-confidence encoder rows to the decoder, on the test split (optimistic)."""
    from tailtune.metrics import macro_f1

    if not (an.enc and an.dec) or run.y_true is None:
        return None
    if an.enc.name not in run.confidence or an.dec.name not in run.preds:
        return None
    y, conf = run.y_true, run.confidence[an.enc.name]
    enc_p, dec_p = run.preds[an.enc.name], run.preds[an.dec.name]
    n = len(run.labels)
    ms = {k: v.get("ms_per_example") for k, v in ((run.bench or {}).get("systems") or {}).items()}
    enc_ms, dec_ms = ms.get(an.enc.name), ms.get(an.dec.name)
    rows, results = [], []
    for t in CASCADE_THRESHOLDS:
        routed = conf < t
        pred = np.where(routed, dec_p, enc_p)
        f1 = macro_f1(y, pred, n)
        mean_ms = enc_ms + routed.mean() * dec_ms if enc_ms and dec_ms else None
        results.append({"t": t, "f1": f1, "routed": routed.mean()})
        rows.append(
            [
                Cell(f"below {t:.1f}"),
                Cell(fmt_pct(routed.mean()), num=True),
                Cell(fmt_metric(f1), num=True),
                Cell(f"{mean_ms:.2f}" if mean_ms else EM_DASH, num=True),
            ]
        )
    rows.append(
        [
            Cell("encoder only"),
            Cell("0.0%", num=True),
            Cell(fmt_metric(an.enc.macro_f1), num=True),
            Cell(f"{enc_ms:.2f}" if enc_ms else EM_DASH, num=True),
        ]
    )
    rows.append(
        [
            Cell("decoder only"),
            Cell("100.0%", num=True),
            Cell(fmt_metric(an.dec.macro_f1), num=True),
            Cell(f"{dec_ms:.2f}" if dec_ms else EM_DASH, num=True),
        ]
    )
    best_row = max(results, key=lambda r: r["f1"])
    if best_row["f1"] <= an.enc.macro_f1:
        best_row = None
    return (
        Table(
            ["encoder confidence", "rows sent to decoder", "macro-F1", "mean ms / example"],
            rows,
            f"What-if: {an.enc.name} answers, and rows where its confidence is below the threshold "
            f"go to {an.dec.name}. Computed on the test split, so optimistic; pick the threshold "
            "on validation data. Mean latency counts the encoder on every row.",
        ),
        best_row,
    )


def section_machine(run: Run) -> Section:
    sec = Section("machine", "Machine and versions")
    rows = []
    machine = (run.bench or {}).get("machine") or {}
    for key, label in (("cpu", "CPU"), ("threads", "threads"), ("gpu", "GPU"), ("torch", "torch")):
        if key in machine:
            rows.append(
                [
                    Cell(f"benchmark {label}"),
                    Cell(str(machine[key] if machine[key] is not None else "none")),
                ]
            )
    if run.bench is not None:
        rows.append([Cell("benchmark batch size"), Cell(str(run.bench.get("batch_size", EM_DASH)))])
    users: dict[tuple, list[str]] = {}
    for s in run.ok_systems:
        if s.info.get("backbone_name"):
            key = (s.info.get("backbone"), s.info["backbone_name"], s.info.get("architecture"))
            users.setdefault(key, []).append(s.name)
    for (role, name, arch), names in users.items():
        rows.append(
            [
                Cell(f"{role or 'model'} backbone"),
                Cell(
                    name,
                    sub=" \u00b7 ".join([*([arch] if arch else []), "used by " + ", ".join(names)]),
                ),
            ]
        )
    trained_with: dict[str, list[str]] = {}
    for s in run.systems:
        if s.metrics is None:
            continue
        versions = s.metrics.get("versions") if isinstance(s.metrics, dict) else None
        text = (
            ", ".join(f"{k} {v}" for k, v in versions.items() if v)
            if isinstance(versions, dict)
            else "not recorded (trained before versions were kept)"
        )
        trained_with.setdefault(text, []).append(s.name)
    for text, names in trained_with.items():
        sub = "all systems" if len(trained_with) == 1 else "used by " + ", ".join(names)
        rows.append([Cell("trained with"), Cell(text, sub=sub)])
    rows.append(
        [
            Cell("report built by"),
            Cell(f"tailtune {__version__}, Python {platform.python_version()}"),
        ]
    )
    rows.append([Cell("run directory"), Cell(str(run.path))])
    sec.blocks.append(Table([], rows, "Where the numbers come from."))
    if not machine:
        sec.blocks.append(Para("No machine description: bench.json is missing."))
    return sec


def section_config(run: Run) -> Section:
    sec = Section("config", "Appendix: resolved config")
    if run.config_text is None:
        sec.blocks.append(Para("config.yaml is missing from the run directory.", style="warning"))
    else:
        sec.blocks.append(Para(Markup("{} exactly as the run saved it:").format(code("config.yaml"))))
        sec.blocks.append(Pre(run.config_text))
    return sec


# ----------------------------------------------------------------------------- entry point


def build_report(run_dir: str | Path, out: Path | None = None, *, n_boot: int | None = None) -> Path:
    """Write the run's HTML report and return its path.

    Args:
        run_dir: a run directory (see the module docstring for the files it reads).
        out: where to write; default ``<run_dir>/report.html``.
        n_boot: paired-bootstrap resamples; default the config's ``eval.n_boot`` (else 1000).

    The file is written to a temporary name next to ``out`` and moved into place, so a reader
    never sees half a report.
    """
    import jinja2

    run = load_run(run_dir)
    eval_cfg = run.config.get("eval") or {}
    n_boot = int(n_boot or eval_cfg.get("n_boot") or 1000)
    seed = int(eval_cfg.get("seed") or run.data.get("seed") or 0)
    an = analyse(run, n_boot, seed)
    sections = [
        section_summary(run, an),
        section_data(run),
        section_systems(run, an),
        section_weighting(run, an),
        section_per_class(run, an),
        section_latency(run, an),
        section_next(run, an),
        section_machine(run),
        section_config(run),
    ]
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tailtune", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    html = env.get_template("report.html.j2").render(
        title=f"tailtune report: {run.path.resolve().name}",
        run=run,
        sections=sections,
        version=__version__,
    )
    out = Path(out) if out is not None else run.path / "report.html"
    from tailtune.rundir import write_text

    return write_text(out, html)
