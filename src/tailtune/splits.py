"""Repeated splits: the same systems on several split seeds, and how far the split alone moves them.

On a long tail a class can have a single test row, so one split's macro-F1 is partly luck: on
the CFPB products sample the encoder probe scored 0.633 on split seed 0 and 0.700 on seed 1,
one row of "Other financial service" making most of the gap (docs/recipes.md, sections 10-11).
``tailtune run --split-seeds 0,1,2`` runs the config once per seed, each into
``<out>/seed-<s>/`` (an ordinary run directory: resumable, reported, benchmarkable), then writes,
over every seed folder in ``<out>`` (a later command may add seeds, with the same config),

    <out>/splits.csv           one row per system and seed: the seed's test metrics
    <out>/splits-summary.csv   one row per system: mean, sd, min and max over the seeds, and
                               its macro-F1 minus the reference system's, paired by seed

Only ``data.seed`` changes between the runs (it draws the split, and the ``max_rows`` subset
when one is set); training seeds stay as configured.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
from rich.markup import escape

from tailtune import rundir
from tailtune.config import MAX_SEED, Config
from tailtune.errors import TailtuneError

PER_SEED = "splits.csv"
SUMMARY = "splits-summary.csv"
METRICS = ("accuracy", "macro_f1", "zero_f1_classes")
_SEED_DIR = re.compile(r"seed-\d+")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; one line naming the problem otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise TailtuneError(f"--split-seeds takes non-negative integers separated by commas, got '{text}'")
    seeds = [int(p) for p in parts]
    if max(seeds) > MAX_SEED:  # data.seed's range, checked here so no seed runs before the error
        raise TailtuneError(f"--split-seeds: seed {max(seeds)} is above {MAX_SEED} (numpy's and scikit-learn's range)")
    if len(seeds) < 2:
        raise TailtuneError("--split-seeds needs at least 2 seeds (one seed is a plain run: data.seed=N)")
    if len(set(seeds)) != len(seeds):
        raise TailtuneError(f"--split-seeds lists a seed twice: '{text}'")
    return seeds


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def seed_runs(out: Path) -> list[Path]:
    """The ``seed-<s>`` run folders in ``out``, by name."""
    return sorted(p for p in Path(out).glob("seed-*") if p.is_dir() and _SEED_DIR.fullmatch(p.name))


def seed_configs(cfg: Config, seeds: list[int]) -> list[Config]:
    """One config per seed: ``data.seed`` set and ``out`` moved to ``<out>/seed-<s>``."""
    return [
        dataclasses.replace(cfg, out=str(seed_dir(Path(cfg.out), s)), data=dataclasses.replace(cfg.data, seed=s))
        for s in seeds
    ]


def check_out(out: Path, cfg: Config | None = None) -> None:
    """Refuse an ``<out>`` that holds anything but seed runs and their summaries, or (given
    ``cfg``) seed runs of another config: new seeds were run with the new settings next to the
    old seeds', in one folder that reads as one comparison."""
    if not out.exists():
        return
    if not out.is_dir():
        raise TailtuneError(f"output path exists and is not a directory: {out}")
    if (out / "config.yaml").exists():
        raise TailtuneError(f"{out} holds a single run, not split seeds; choose another --out")
    # Hidden entries are an interrupted atomic write's temporary files.
    strangers = [
        p.name
        for p in out.iterdir()
        if not (_SEED_DIR.fullmatch(p.name) or p.name in (PER_SEED, SUMMARY) or p.name.startswith("."))
    ]
    if strangers:
        raise TailtuneError(f"{out} exists and holds other files ({strangers[0]}); choose another --out")
    if cfg is None:
        return
    from tailtune.run import comparable_config, config_differences, saved_config

    for folder in seed_runs(out):
        saved = saved_config(folder / "config.yaml")
        if saved is None:
            continue  # not begun, or not a run: its own check names it when its seed runs
        now = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=saved.data.seed))
        if comparable_config(saved) != comparable_config(now):
            raise TailtuneError(
                f"{out} holds split seeds run with a different config ({folder.name}: "
                f"{config_differences(comparable_config(saved), comparable_config(now))}); choose another --out"
            )


def per_seed(out: Path, seeds: list[int]) -> pd.DataFrame:
    """system, seed, status and the test metrics of every seed's comparison.csv, in config order."""
    from tailtune.run import read_comparison

    frames = []
    for s in seeds:
        comparison = read_comparison(seed_dir(out, s), needs=METRICS)
        frames.append(comparison[["system", "status", *METRICS]].assign(seed=s))
    # A failed system's metrics are already empty (NaN) in comparison.csv.
    return pd.concat(frames, ignore_index=True)[["system", "seed", "status", *METRICS]]


def summarise(frame: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per system: the seeds summarised and those it finished on, mean / sd / min / max of each
    metric, and the paired difference of macro-F1 to ``reference`` (mean and sd over the seeds
    where both finished, and on how many of them the system was higher)."""
    ref = frame[frame["system"] == reference].set_index("seed")["macro_f1"]
    rows = []
    for system, g in frame.groupby("system", sort=False):
        ok = g.dropna(subset=["macro_f1"])
        # every seed summarised: a system that a later command added to some seeds only reads
        # "(2 of 4 finished)", not as if it had run on all of them
        row = {"system": system, "seeds": frame["seed"].nunique(), "finished": len(ok)}
        for m in METRICS:
            row.update(
                {
                    f"{m}_mean": ok[m].mean(),
                    f"{m}_sd": ok[m].std(ddof=1),
                    f"{m}_min": ok[m].min(),
                    f"{m}_max": ok[m].max(),
                }
            )
        diff = (ok.set_index("seed")["macro_f1"] - ref).dropna()
        row.update(
            {
                "reference": reference,
                "macro_f1_diff_mean": diff.mean() if len(diff) else np.nan,
                "macro_f1_diff_sd": diff.std(ddof=1) if len(diff) > 1 else np.nan,
                "seeds_higher": int((diff > 0).sum()),
                "seeds_paired": len(diff),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def write_summary(out: Path, seeds: list[int], reference: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = per_seed(out, seeds)
    summary = summarise(frame, reference)
    rundir.write_csv(out / PER_SEED, frame)
    rundir.write_csv(out / SUMMARY, summary)
    return frame, summary


def print_summary(console, summary: pd.DataFrame, seeds: list[int]) -> None:
    from rich.table import Table

    reference = summary["reference"].iloc[0]
    title = f"systems over {len(seeds)} split seeds ({', '.join(map(str, seeds))}): mean ± sd \\[min, max]"
    table = Table(title=title)
    for col in ("system", "accuracy", "macro-F1", "zero-F1", f"macro-F1 − {reference}", "higher on"):
        table.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)

    def cell(r, m: str, digits: int) -> str:
        if np.isnan(r[f"{m}_mean"]):
            return "-"
        sd = "" if np.isnan(r[f"{m}_sd"]) else f" ± {r[f'{m}_sd']:.{digits}f}"
        return f"{r[f'{m}_mean']:.{digits}f}{sd} [{r[f'{m}_min']:.{digits}f}, {r[f'{m}_max']:.{digits}f}]"

    for r in summary.to_dict("records"):
        is_ref = r["system"] == reference
        diff = (
            "-"
            if is_ref or not r["seeds_paired"]
            else f"{r['macro_f1_diff_mean']:+.3f}"
            + ("" if np.isnan(r["macro_f1_diff_sd"]) else f" ± {r['macro_f1_diff_sd']:.3f}")
        )
        higher = "-" if is_ref or not r["seeds_paired"] else f"{r['seeds_higher']} of {r['seeds_paired']}"
        finished = "" if r["finished"] == r["seeds"] else f" [red]({r['finished']} of {r['seeds']} finished)[/]"
        table.add_row(
            escape(r["system"]) + finished,
            cell(r, "accuracy", 3),
            cell(r, "macro_f1", 3),
            cell(r, "zero_f1_classes", 1),
            diff,
            higher,
        )
    console.print(table)


def run_splits(cfg: Config, seeds: list[int], report: bool = True, console=None) -> Path:
    """Run ``cfg`` once per split seed into ``<out>/seed-<s>/`` and summarise; returns ``<out>``.

    Every seed's run resumes like a plain run, so re-running the same command skips what is
    finished; adding a seed runs only that one. The reference of the paired differences is
    the config's first system (the cheap baseline in every preset).
    """
    from tailtune.distributed import state
    from tailtune.run import make_console
    from tailtune.run import run as run_one

    out = Path(cfg.out)
    check_out(out, cfg)
    main = state().is_main_process
    console = console or make_console()
    for i, seed_cfg in enumerate(seed_configs(cfg, seeds), 1):
        if main:
            console.rule(
                f"[bold]split seed {seed_cfg.data.seed}[/] ({i}/{len(seeds)}) -> {escape(str(seed_cfg.out))}",
                characters="=",
            )
        run_one(seed_cfg, console if main else None, report=report)
    if main:
        # seeds an earlier command ran into <out> (same config, checked above) count too: the
        # summary was rewritten with this command's seeds only, next to the others' folders
        seeds = sorted({*seeds, *(int(p.name[5:]) for p in seed_runs(out) if (p / "comparison.csv").exists())})
        _, summary = write_summary(out, seeds, cfg.systems[0])
        print_summary(console, summary, seeds)
        console.print(f"written: {out / PER_SEED}, {out / SUMMARY}", markup=False)
    return out
