"""What the benchmark scripts share: finding the systems and texts to time, and printing results."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np


def entry(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; a TailtuneError (bad path, unsuitable system) is one line, exit 2."""
    from tailtune.errors import TailtuneError

    try:
        main()
    except TailtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def locate(
    path: str, system: str | None, wanted: Callable[[dict], bool], what: str = "system"
) -> tuple[list[Path], Path | None]:
    """(system folders to benchmark, run directory or None) for a run dir or a system folder.

    Every folder returned has a ``tailtune.json`` that satisfies ``wanted`` (``what`` names such
    a system in the error): in a run directory, ``system`` picks one, else every finished one is
    a candidate; a system folder given directly must satisfy it too.
    """
    from tailtune import deploy
    from tailtune.errors import TailtuneError

    path = Path(path)
    if (path / "comparison.csv").exists():
        names = deploy.finished_systems(path, [system] if system else None)
        folders = [path / "systems" / n for n in names]
        chosen = [f for f in folders if wanted(_meta(f))]
        if not chosen:
            raise TailtuneError(f"no {what} in {path} (finished: {', '.join(names)})")
        return chosen, path
    if not wanted(_meta(path)):
        raise TailtuneError(f"{path} is not a {what}")
    run_dir = next((p for p in path.resolve().parents if (p / "config.yaml").exists()), None)
    return [path], run_dir


def _meta(system_dir: Path) -> dict:
    from tailtune import deploy

    kind, folder = deploy.resolve_system(system_dir)
    return {"kind": kind, **(deploy.load_meta(folder) if kind != "export" else {})}


def texts_for(run_dir: Path | None, n: int) -> list[str]:
    """``n`` texts of the run's data at their real lengths (all splits), else the export check texts."""
    from tailtune import bench, deploy

    if run_dir is None:
        return deploy.export_check_texts()
    return bench.sample_texts(run_dir, n, split=None)[0]


def report(seconds: dict[str, np.ndarray], n_texts: int, reference: str, unit: str = "ms/ex") -> None:
    """Median and p95 ms per example (``n_texts`` per pass) of every contender, and each one's
    ratio to ``reference``; ``unit`` heads the columns (ms/step with ``n_texts`` = 1)."""
    ref = np.median(seconds[reference])
    print(f"{'contender':<12} {'median ' + unit:>15} {'p95 ' + unit:>12} {'vs ' + reference:>16}")
    for name, s in seconds.items():
        per_example = s * 1000 / n_texts
        print(
            f"{name:<12} {np.median(per_example):15.4f} {np.percentile(per_example, 95):12.4f} "
            f"{np.median(s) / ref:15.3f}x"
        )


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (--texts 0 printed inf ms, --repeats 0 an IndexError)."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
