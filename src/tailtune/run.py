"""``tailtune run``: prepare data, train every system, evaluate class by class, write the run directory.

Run directory contract (other commands and users build on it)::

    <out>/config.yaml                    resolved config (with what ``--tune`` chose, in tune.chosen)
    <out>/tune.json                      with ``--tune``: every trial of the search (tailtune.tune)
    <out>/data.json                      rows read/kept/dropped by reason, classes, tiers, split sizes
    <out>/comparison.csv                 one row per system
    <out>/systems/<name>/metrics.json    aggregate, CI and per-tier metrics + system description
    <out>/systems/<name>/per_class.csv   label, tier, train_count, support, precision, recall, f1
    <out>/systems/<name>/predictions.csv id, label, prediction, confidence
    <out>/systems/<name>/model/          everything needed to reload and predict
    <out>/systems/<name>/files.json      size of every file above, to tell a cut or deleted one
    <out>/cache/                         frozen features per backbone and split (the probes')
    <out>/systems/.<name>.failed/        a failed system: reason.txt (one line), error.txt (traceback)

Nothing is written before the data and backbones pass their checks. A system is built in
``<out>/systems/.<name>.partial/`` (``staging/`` for its files, ``checkpoints/`` for a
fine-tuning's latest checkpoint) and its folder appears only when all its files are complete.
Re-running the same command skips finished systems and resumes an interrupted fine-tuning
from its checkpoint, ending with the same numbers as an uninterrupted run. ``tailtune train``
trains only the systems it names and adds them to the run's: several such jobs can fill one run
directory at once; config.yaml and comparison.csv are updated under a lock on the directory.

Under ``torchrun`` / ``accelerate launch`` (or ``tailtune run --processes N``) every process
runs this same pipeline. Fine-tuning is shared out by the Trainer (DDP, see
:func:`tailtune.train.fit`); everything else (TF-IDF, probes, test predictions, guards) is
deterministic and simply computed the same way in every process: cheaper to reason about than
running it on the main process and broadcasting, no process idles at a barrier for long, and
on GPUs it costs no wall time. Only the main process writes into ``<out>`` (other processes
send their model files to a scratch folder they delete), the main process fills the backbone
cache before the others read it, and every process decides which systems are finished before
the main one writes any, so all of them skip, train and resume the same systems.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
from rich.markup import escape

from tailtune import rundir
from tailtune.config import Config, dump
from tailtune.errors import TailtuneError, first_line

COMPARISON_COLUMNS = [
    "system",
    "status",
    "accuracy",
    "macro_f1",
    "weighted_f1",
    "zero_f1_classes",
    "trainable_params",
    "total_params",
    "train_seconds",
    "note",
]


def _preflight(cfg: Config, names: list[str], console):
    """What can be checked before any backbone is touched, for the systems ``names``. Returns
    their specs and the prepared data.

    The backbone checks (:func:`tailtune.preflight.check_backbones`) follow in :func:`run`.
    """
    from tailtune import data as data_lib
    from tailtune import preflight
    from tailtune.systems import parse_system
    from tailtune.train import resolve_precision

    specs = [parse_system(name) for name in names]
    preflight.check_writable(Path(cfg.out))
    with console.status("reading and cleaning data..."):
        prepared = data_lib.prepare(cfg.data)
    preflight.check_splits(prepared, specs)
    # every run: a TF-IDF-only run saved train.precision=fp16 on a CPU machine, and systems
    # trained into it later inherited it
    resolve_precision(cfg.train.precision)
    return specs, prepared


def saved_config(path: Path) -> Config | None:
    """The config a run directory saved (None when it is not a valid config)."""
    import yaml

    from tailtune.config import from_dict

    try:
        return from_dict(Config, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (TailtuneError, yaml.YAMLError, TypeError):
        return None


def comparable_config(cfg: Config) -> str:
    """A config's text without what may change between runs in one directory: what ``--tune``
    chose (written into the run's config.yaml), the systems (a run can gain systems), and the
    directory's own path.

    Read back as config.yaml is, so that a Config built in Python (``epochs=3``) equals the
    one its run saved (``epochs: 3.0``).
    """
    from tailtune.config import resolved

    cfg = resolved(cfg)
    cfg.tune.chosen, cfg.systems = [], []
    cfg.out = ""  # where the run is: --out t5, --out /abs/t5 and a moved folder are one run
    return dump(cfg)


def config_differences(before: str, after: str, shown: int = 3) -> str:
    """'train.epochs: 1 in the run, 5 now; ...' for the keys where two dumped configs differ."""
    import yaml

    def flat(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from flat(value, f"{prefix}{key}.")
        else:
            yield prefix.rstrip("."), node

    old, new = dict(flat(yaml.safe_load(before))), dict(flat(yaml.safe_load(after)))
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    listed = "; ".join(f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now" for k in keys[:shown])
    return listed + (f"; and {len(keys) - shown} more" if len(keys) > shown else "")


def _check_run_dir(out: Path, cfg: Config, *, keep_others: bool = False) -> Config | None:
    """The config saved in ``out`` when it holds this run (resume); None for a new run; an
    error when it holds something else.

    The same config resumes. So does one that only adds systems: the finished ones are kept
    and the run's config.yaml gains the new names (see :func:`_joined`). Leaving out a system
    the run has is refused (the command would no longer describe the run), unless
    ``keep_others``: ``tailtune train`` names only the systems it trains.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise TailtuneError(f"output path exists and is not a directory: {out}")
    config_file = out / "config.yaml"
    if config_file.exists():
        saved = saved_config(config_file)
        before, now = (None, None) if saved is None else (comparable_config(saved), comparable_config(cfg))
        if before is None or before != now:
            changed = "" if before is None else f" ({config_differences(before, now)})"
            raise TailtuneError(
                f"{out} holds a run with a different config{changed}; choose another --out or delete it"
            )
        dropped = [s for s in saved.systems if s not in cfg.systems]
        if dropped and not keep_others:
            raise TailtuneError(
                f"{out} holds a run that also has {', '.join(dropped)}; list every system of the run "
                "(a run can gain systems, not lose them), or choose another --out"
            )
        return saved
    if any(out.iterdir()):
        from tailtune.splits import seed_runs

        if seed_runs(out):  # run --split-seeds' folder, given without the flag
            raise TailtuneError(
                f"{out} holds one run per split seed; add --split-seeds to resume or extend "
                "them, or choose another --out"
            )
        raise TailtuneError(f"{out} exists, is not empty and is not a tailtune run directory")
    return None


def run_data(out: Path) -> dict:
    """``out``'s data.json; empty when there is none yet (killed before it was written: nothing
    was trained on the data) or it cannot be read."""
    try:
        return rundir.read_json(Path(out) / "data.json")
    except (OSError, ValueError):
        return {}


def _check_same_data(out: Path, summary: dict) -> None:
    """Refuse to resume ``out`` on data other than its systems were trained and tested on."""
    before = run_data(out).get("fingerprint")
    if before is not None and before != summary["fingerprint"]:
        raise TailtuneError(
            f"{out} holds a run on other data: {summary['source']} has changed since (rows, texts, "
            "labels or split); choose another --out, or restore the data the run was made with"
        )


def _check_same_weights(out: Path, summary: dict) -> None:
    """Refuse to resume ``out`` when a backbone's weights are not those its systems used.

    The config names a backbone (a folder, a hub id), not its weights: weights overwritten in
    place were mixed into one comparison with systems trained on the old ones, and the run's
    cached features and checkpoints were reused on the new ones.
    """
    from tailtune.backbones import changed_files

    before = run_data(out).get("model_files") or {}
    for slot, now in summary.get("model_files", {}).items():
        if isinstance(before.get(slot), dict) and now is not None and before[slot] != now:
            raise TailtuneError(
                f"{out} holds a run made with another {slot}: {summary['truncation'][slot]['backbone']} "
                f"has changed since ({changed_files(before[slot], now)}); choose another --out, or "
                "restore the files the run was made with"
            )


def _merged_summary(out: Path, summary: dict) -> dict:
    """``summary`` with the backbone entries of ``out``'s data.json that this process did not
    check (``tailtune train`` of one system sees only that system's backbones)."""
    before = run_data(out)
    if before.get("fingerprint") != summary["fingerprint"]:
        return summary
    return {
        **summary,
        **{key: {**before.get(key, {}), **summary.get(key, {})} for key in ("truncation", "model_files")},
    }


def _joined(saved: Config | None, cfg: Config) -> Config:
    """``cfg`` as the config of the run ``saved`` holds: the run's systems first, then the new
    ones; and what ``--tune`` chose for systems ``cfg`` has no choice for."""
    if saved is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.systems = [*saved.systems, *(s for s in cfg.systems if s not in saved.systems)]
    named = {c.system for c in cfg.tune.chosen}
    cfg.tune.chosen += [c for c in saved.tune.chosen if c.system not in named]
    return cfg


def _save_config(out: Path, cfg: Config, *, keep_others: bool) -> Config:
    """Write ``cfg`` joined with ``out``'s config.yaml as it is now, and return the result.

    Under the run's lock, and read again there: another process may have added systems or
    tune choices since this one first read it (one ``tailtune train`` job per system).
    """
    with rundir.locked(out):
        cfg = _joined(_check_run_dir(out, cfg, keep_others=keep_others), cfg)
        path, text = out / "config.yaml", dump(cfg)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            rundir.write_text(path, text)
    return cfg


def _comparison(out: Path, n_test: int) -> pd.DataFrame:
    """comparison.csv, from the system folders of every system in ``out``'s config.yaml.

    Built from the files rather than from what this process trained, so that a run several
    processes fill (one ``tailtune train`` job per system) ends with every finished system,
    whichever process writes it last. A system of the config with no finished folder (not
    trained yet, or a file of it deleted since) has a ``missing`` row: it was left out, and a
    report without the run's best system said nothing of it.
    """
    systems = (saved_config(out / "config.yaml") or Config()).systems
    rows = []
    for name in systems:
        if _finished(out / "systems" / name, n_test):
            m = rundir.read_json(out / "systems" / name / "metrics.json")
            rows.append(_row(name, "ok", m, "; ".join(m.get("warnings", []))))
        elif (failed := out / "systems" / f".{name}.failed").is_dir():
            reason = failed / "reason.txt"
            rows.append(
                _row(
                    name,
                    "failed",
                    {},
                    reason.read_text(encoding="utf-8") if reason.exists() else f"failed; see {failed / 'error.txt'}",
                )
            )
        else:
            rows.append(
                _row(
                    name,
                    "missing",
                    {},
                    f"no finished results in {out / 'systems' / name} (not "
                    "trained yet, or a file of it deleted or cut); train it with this run's command",
                )
            )
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    # counts stay whole numbers when a failed system leaves them empty (not 6.0, 10912.0)
    return frame.astype({c: "Int64" for c in ("zero_f1_classes", "trainable_params", "total_params")})


def read_comparison(run_dir: Path, needs: tuple[str, ...] = ()) -> pd.DataFrame:
    """``run_dir``'s comparison.csv with its system and status columns (and the columns in
    ``needs``), or one line saying it is damaged."""
    path = Path(run_dir) / "comparison.csv"
    try:
        comparison = pd.read_csv(path)
    except ValueError as exc:  # EmptyDataError and ParserError are ValueErrors
        raise TailtuneError(
            f"{path} is damaged ({first_line(exc)}); run the same tailtune run command again to rewrite it"
        ) from None
    lacking = [c for c in ("system", *needs) if c not in comparison.columns]
    if lacking:
        raise TailtuneError(
            f"{path} has no {', '.join(repr(c) for c in lacking)} column{'s' if len(lacking) > 1 else ''}; "
            "run the same tailtune run command "
            "again to rewrite it"
        )
    if "status" not in comparison.columns:  # as the report has always read such a file
        comparison["status"] = "ok"
    return comparison


def failed_systems(run_dir: Path, names: list[str]) -> list[str]:
    """Those of ``names`` that ``run_dir``'s comparison.csv marks failed."""
    if not (Path(run_dir) / "comparison.csv").exists():
        return []
    comparison = read_comparison(run_dir)
    return [name for name in comparison.loc[comparison["status"] == "failed", "system"] if name in names]


def check_finished_run(run_dir: Path) -> None:
    """One line when ``run_dir`` has no comparison.csv (pointing into a split-seeds folder)."""
    from tailtune.splits import seed_runs

    run_dir = Path(run_dir)
    if (run_dir / "comparison.csv").exists():
        return
    if not run_dir.exists():
        raise TailtuneError(f"run directory not found: {run_dir}")
    seeds = seed_runs(run_dir)
    if seeds:
        raise TailtuneError(f"{run_dir} holds one run per split seed; pass one of them, e.g. {seeds[0]}")
    raise TailtuneError(f"{run_dir} is not a finished tailtune run (no comparison.csv)")


def _finished(system_dir: Path, n_test: int) -> bool:
    try:
        metrics = rundir.read_json(system_dir / "metrics.json")
        preds = pd.read_csv(system_dir / "predictions.csv")
    except (OSError, ValueError):
        return False
    if not ("macro_f1" in metrics and len(preds) == n_test and (system_dir / "model" / "tailtune.json").exists()):
        return False
    return files_intact(system_dir)


def files_intact(system_dir: Path) -> bool:
    """Every file the system was written with is there at its size (``files.json``); a folder
    written before files.json existed is not checked."""
    try:
        files = rundir.read_json(system_dir / FILES)
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return all(
        (system_dir / name).is_file() and (system_dir / name).stat().st_size == size for name, size in files.items()
    )


FILES = "files.json"  # a system folder's files and their sizes, written last: a deleted or cut file is seen


def _list_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def run(cfg: Config, console=None, report: bool = True, *, named_only: bool = False) -> Path:
    """Run every system of ``cfg`` and return the run directory.

    ``named_only`` (``tailtune train``): train only ``cfg.systems`` and add them to the run
    directory's systems, leaving the others as they are, so that several jobs can each train
    their own systems into one run directory, at the same time or one after another.

    The systems share each backbone's load and tokenised splits in memory
    (:func:`tailtune.backbones.shared_loads`): a sweep's points read the base once.
    """
    from tailtune.backbones import shared_loads
    from tailtune.config import resolved

    cfg = resolved(cfg)  # a Config built in Python gets load_config's checks
    with shared_loads(), contextlib.ExitStack() as held:
        return _run(cfg, console, report, named_only, held)


LOG_WIDTH = 160


def make_console(*, stderr: bool = False):
    """A rich console for the CLI's output.

    Written to a file or pipe (a log, CI, ``nohup``) rich would assume 80 columns and cut the
    tables' system names to ``encoder-lo…``; there it is ``LOG_WIDTH`` wide instead. A terminal
    keeps its own width, and ``COLUMNS``, when set, wins everywhere.
    """
    import os

    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


def _run(cfg: Config, console, report: bool, named_only: bool, held: contextlib.ExitStack) -> Path:
    """:func:`run`; ``held`` keeps the locks on the systems this process trains until it returns."""
    from rich.console import Console

    from tailtune.distributed import state
    from tailtune.preflight import check_backbones
    from tailtune.systems import Context, GuardFailure, run_system

    dist = state()
    main = dist.is_main_process
    console = (console or make_console()) if main else Console(quiet=True)
    out = Path(cfg.out)
    names = list(cfg.systems)
    saved = _check_run_dir(out, cfg, keep_others=named_only)
    cfg = _joined(saved, cfg)  # what --tune chose holds for the rest of the run
    if not named_only:
        names = cfg.systems
    started = time.perf_counter()
    specs, data = _preflight(cfg, names, console)
    if saved is not None:
        _check_same_data(out, data.summary)
    ctx = Context(cfg, data, console, out / "cache")
    with dist.main_process_first():  # the main process fills the backbone cache, the others read it
        check_backbones(ctx, specs)  # resolves (and converts GGUF) before the directory exists
    if saved is not None:
        _check_same_weights(out, data.summary)
    _print_data(console, data)

    created = not out.exists()
    try:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            if (out / "config.yaml").exists():  # hold first: a refused command leaves the run as it was
                made = _hold(out, specs, held)
                try:
                    cfg = ctx.cfg = _save_config(out, cfg, keep_others=named_only)
                except TailtuneError:
                    _remove_empty(made)  # e.g. a system the run has under another spelling
                    raise
            else:  # a new run directory holds a config before anything else
                cfg = ctx.cfg = _save_config(out, cfg, keep_others=named_only)
                _hold(out, specs, held)
            with rundir.locked(out):
                rundir.write_json(out / "data.json", _merged_summary(out, data.summary))
    except OSError:
        if created:  # e.g. disk full: leave no run directory that holds no run
            shutil.rmtree(out, ignore_errors=True)
        raise
    if saved is not None:
        console.print(f"resuming {out}: finished systems are kept", style="dim", markup=False)
    if cfg.tune.enabled:
        cfg = ctx.cfg = _tuned(cfg, specs, ctx, out)
        if main:
            cfg = ctx.cfg = _save_config(out, cfg, keep_others=True)

    test = data.split("test")
    failures = (GuardFailure, TailtuneError, RuntimeError, ValueError)
    finished = {s.name: _finished(out / "systems" / s.name, len(test)) for s in specs}
    dist.wait_for_everyone()  # every process has decided what to skip before the main one writes
    if not main:
        _follow(specs, finished, ctx, out, failures)
        dist.wait_for_everyone()  # returns when the main process's files are complete
        return out
    for i, spec in enumerate(specs, 1):
        system_dir = out / "systems" / spec.name
        console.rule(f"[bold]{escape(spec.name)}[/] ({i}/{len(specs)})")
        partial = out / "systems" / f".{spec.name}.partial"
        if finished[spec.name]:
            shutil.rmtree(partial, ignore_errors=True)  # killed between finishing and cleaning up
            m = rundir.read_json(system_dir / "metrics.json")
            console.print(f"  done already: macro-F1 {m['macro_f1']:.3f} (skipped)")
            continue
        if system_dir.is_dir():
            console.print(f"  {system_dir} is incomplete (a file is missing or cut); training it again", markup=False)
        tmp = partial / "staging"
        shutil.rmtree(tmp, ignore_errors=True)  # files of a killed attempt; its checkpoints are kept
        tmp.mkdir(parents=True)
        system_started = time.perf_counter()
        try:
            outcome = run_system(spec, ctx, tmp / "model", partial / "checkpoints")
            metrics = _finish_system(out, spec, cfg, data, outcome)
            for w in outcome.warnings:
                console.print(f"  [yellow]warning:[/] {escape(w)}")
            console.print(
                f"  accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
                f"zero-F1 classes {metrics['zero_f1_classes']}/{metrics['n_classes']}  "
                f"({outcome.train_seconds:.0f} s training, {time.perf_counter() - system_started:.0f} s in all)"
            )
        except failures as exc:
            reason = first_line(exc)
            _record_failure(out, spec.name, exc, reason)
            console.print(f"  [red]failed:[/] {escape(reason)}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    with rundir.locked(out):
        comparison = _comparison(out, len(test))
        rundir.write_csv(out / "comparison.csv", comparison)
    _print_comparison(console, comparison)
    if report:
        from tailtune.report import build_report

        path = build_report(out)
        console.print(f"report: {path}", markup=False)
    elif (out / "report.html").exists():  # `tailtune train`, --no-report: the memo would not show these systems
        console.print(
            f"{out / 'report.html'} predates this comparison; rebuild it with: tailtune report {out}", markup=False
        )
    console.print(f"run directory: {out}  ({time.perf_counter() - started:.0f} s)", markup=False)
    dist.wait_for_everyone()
    return out


def _finish_system(out: Path, spec, cfg: Config, data, outcome) -> dict:
    """Evaluate a trained system on the test split, write its files next to its model in
    ``.<name>.partial/staging``, and rename that into ``systems/<name>``; its metrics."""
    from tailtune import metrics as metrics_lib

    partial = out / "systems" / f".{spec.name}.partial"
    tmp = partial / "staging"
    test = data.split("test")
    pred = outcome.proba.argmax(axis=1)
    metrics, per_class = metrics_lib.evaluate(
        test["y"].to_numpy(),
        pred,
        labels=data.classes,
        train_counts=data.train_counts,
        tiers=data.tiers,
        tier_names=data.tier_names,
        n_boot=cfg.eval.n_boot,
        seed=cfg.eval.seed,
    )
    metrics.update(
        trainable_params=int(outcome.trainable_params),
        total_params=int(outcome.total_params),
        train_seconds=round(outcome.train_seconds, 2),
        system=_describe(spec, cfg, outcome),
        warnings=outcome.warnings,
        versions=library_versions(),
    )
    rundir.write_json(tmp / "metrics.json", metrics)
    rundir.write_csv(tmp / "per_class.csv", per_class)
    rundir.write_csv(
        tmp / "predictions.csv",
        pd.DataFrame(
            {
                "id": test["id"].to_numpy(),
                "label": test["label"].to_numpy(),
                "prediction": np.asarray(data.classes)[pred],
                "confidence": outcome.proba.max(axis=1).round(6),
            }
        ),
    )
    rundir.write_json(tmp / FILES, _list_files(tmp))
    system_dir = out / "systems" / spec.name
    system_dir.parent.mkdir(parents=True, exist_ok=True)
    rundir.replace_dir(tmp, system_dir)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out / "systems" / f".{spec.name}.failed", ignore_errors=True)
    return metrics


def _hold(out: Path, specs, held: contextlib.ExitStack) -> list[Path]:
    """Lock each system's work folder for this process, or refuse when another process has it;
    the folders it made.

    Taken before the run decides what is finished: a system whose lock this process gets is
    either finished or in nobody else's hands, never half-trained by another job.
    """
    made = []
    for spec in specs:
        partial = out / "systems" / f".{spec.name}.partial"
        if not partial.is_dir():
            partial.mkdir(parents=True)
            made.append(partial)
        if not held.enter_context(rundir.locked(partial, wait=False)):
            _remove_empty(made)  # nothing of this command stays behind
            raise TailtuneError(
                f"another tailtune process is training {spec.name} in {out}; let it finish, "
                f"or leave {spec.name} out of this command"
            )
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _tuned(cfg: Config, specs, ctx, out: Path) -> Config:
    """``cfg`` with ``tune.chosen`` filled by :func:`tailtune.tune.search` for the systems it lacks."""
    from tailtune import tune

    have = {c.system for c in cfg.tune.chosen}
    chosen = tune.search(cfg, [s for s in specs if s.name not in have], ctx, out)
    cfg = copy.deepcopy(cfg)
    cfg.tune.chosen = [*cfg.tune.chosen, *chosen]
    return cfg


def _follow(specs, finished: dict, ctx, out: Path, failures: tuple) -> None:
    """A non-main process's part of :func:`run`: the same systems, their files in a scratch folder.

    It trains alongside the main process (whose checkpoints it resumes from) and writes
    nothing under ``out``; a failure is the main process's to record.
    """
    from tailtune.systems import run_system

    with tempfile.TemporaryDirectory(prefix="tailtune-scratch-") as scratch:
        for spec in specs:
            if finished[spec.name]:
                continue
            checkpoints = out / "systems" / f".{spec.name}.partial" / "checkpoints"
            with contextlib.suppress(*failures):
                run_system(spec, ctx, Path(scratch) / spec.name, checkpoints)


def _record_failure(out: Path, name: str, exc: BaseException, reason: str) -> None:
    """Keep the traceback for the developer; the terminal and comparison.csv get ``reason``.

    The record is whole or absent: a disk that filled while it was written left an empty
    folder, which comparison.csv read as "failed; see error.txt" with no error.txt there."""
    where = out / "systems" / f".{name}.failed"
    where.parent.mkdir(parents=True, exist_ok=True)
    staging = rundir.temp_dir(where)
    try:
        rundir.write_text(staging / "reason.txt", reason)
        rundir.write_text(staging / "error.txt", "".join(traceback.format_exception(exc)))
        rundir.replace_dir(staging, where)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def library_versions() -> dict:
    """The versions a system was trained with (metrics.json): a run resumed after an upgrade
    holds systems of two versions, and the report says so."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from tailtune import __version__

    found = {"tailtune": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _describe(spec, cfg: Config, outcome) -> dict:
    info = dict(outcome.info)
    info.pop("history", None)
    weighting = spec.recipe(cfg)[1] if spec.kind == "finetune" else spec.weighting
    backbone_cfg = getattr(cfg, spec.slot) if spec.slot else None
    return {
        "name": spec.name,
        "kind": spec.kind,
        "backbone": spec.slot,
        "backbone_name": backbone_cfg.name if backbone_cfg else None,
        "method": spec.method,
        "weighting": weighting
        if spec.kind in ("finetune", "generate")
        else ("balanced" if spec.kind == "probe" else (cfg.tfidf.class_weight or "none")),
        "pooling": info.pop("pooling", None),
        "architecture": info.pop("architecture", None),
        "adapter_bytes": info.pop("adapter_bytes", None),
        **info,
        "training": outcome.info.get("history"),
    }


def _row(name: str, status: str, m: dict, note: str) -> dict:
    """A comparison.csv row: the system's name, status and note, its numbers from metrics ``m``."""
    return {**{k: m.get(k) for k in COMPARISON_COLUMNS}, "system": name, "status": status, "note": note}


def _print_data(console, data) -> None:
    s = data.summary
    dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items() if v) or "none"
    console.print(
        f"data: {s['source']}\n  {s['rows_read']} rows read, {s['rows_kept']} kept (dropped: {dropped}); "
        f"{s['n_classes']} classes; split {s['splits']['train']}/{s['splits']['val']}/{s['splits']['test']}",
        markup=False,
    )
    tiers = s["tiers"]
    parts = [f"{t} {tiers['ranges'][t]}: {len(tiers['classes'][t])}" for t in tiers["names"]]
    console.print("  tiers (training rows per class): " + "; ".join(parts))
    if s["dropped_classes"]:
        names = ", ".join(s["dropped_classes"][:5]) + (", ..." if len(s["dropped_classes"]) > 5 else "")
        console.print(
            f"  [yellow]dropped {len(s['dropped_classes'])} classes below min_class_count "
            f"({s['dropped']['rare_class_rows']} rows):[/] {escape(names)}"
        )
    for variants in s["possible_duplicate_labels"][:5]:
        console.print(
            f"  [yellow]possible duplicate labels (differ only by case/spaces; not merged):[/] {escape(str(variants))}"
        )
    for slot, t in s.get("truncation", {}).items():
        over = (
            f"about {t['texts_over']:,} of {t['texts']:,} texts ({100 * t['share']:.1f}%) are longer and will be truncated"
            if t["texts_over"]
            else "no text is longer"
        )
        console.print(f"  {slot} max_length {t['max_length']} tokens: {over}")


def _print_comparison(console, comparison: pd.DataFrame) -> None:
    from rich.table import Table

    table = Table(title="systems compared on the test split")
    for col in ("system", "accuracy", "macro-F1", "weighted-F1", "zero-F1", "trainable", "train s"):
        table.add_column(col, justify="left" if col == "system" else "right", no_wrap=True)
    notes = []
    for r in comparison.itertuples():
        if isinstance(r.note, str) and r.note:
            notes.append(f"[{'red' if r.status != 'ok' else 'yellow'}]{escape(r.system)}:[/] {escape(r.note)}")
        if r.status != "ok":
            table.add_row(escape(r.system), *[f"[red]{escape(r.status)}[/]"] + ["-"] * 5)
            continue
        table.add_row(
            escape(r.system),
            f"{r.accuracy:.3f}",
            f"{r.macro_f1:.3f}",
            f"{r.weighted_f1:.3f}",
            str(int(r.zero_f1_classes)),
            f"{int(r.trainable_params):,}",
            f"{r.train_seconds:.0f}",
        )
    console.print(table)
    for note in notes:
        console.print("  " + note)
