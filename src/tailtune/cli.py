"""The ``tailtune`` command line. Thin: parse, call the library, turn errors into one line."""

from __future__ import annotations

import errno
import functools
import json
import os
from pathlib import Path

import typer

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Parameter-efficient fine-tuning of text classifiers on long-tailed label sets, compared class by class.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at a data file before training on it.")
app.add_typer(data_app, name="data")


RESUMABLE = {"run", "train", "sweep"}  # the commands whose rerun continues where Ctrl-C stopped them


def friendly(fn):
    """Bad input -> 'error: <one line>' and exit 2; Ctrl-C -> a clean stop; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        # Deprecation chatter from dependencies is for their developers, not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return fn(*args, **kwargs)
        except (KeyboardInterrupt, Exception) as exc:
            _exit_for(exc, fn.__name__)

    return wrapper


def _interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, also one that arrived inside a library and came out as another error (an
    ImportError "initialization failed" while a C extension loaded): found in the exception's chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _exit_for(exc: BaseException, command: str):
    """One line on stderr for ``exc`` and the exit code: 2 bad input, 130 Ctrl-C, 1 internal error."""
    from tailtune.errors import TailtuneError, first_line

    if isinstance(exc, TailtuneError):
        if not (os.environ.get("TAILTUNE_WORKER") and os.environ.get("RANK", "0") != "0"):
            typer.echo(f"error: {exc}", err=True)  # bad input fails every rank alike: rank 0 says it
        raise typer.Exit(2) from None
    if _interrupted(exc):
        typer.echo(
            "interrupted: finished work is kept; run the same command again to resume"
            if command in RESUMABLE
            else "interrupted: nothing was written (outputs appear only when complete)",
            err=True,
        )
        raise typer.Exit(130) from None
    if isinstance(exc, OSError):
        if exc.errno == errno.EPIPE:  # `tailtune presets | head -1`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # no second error when stdout is flushed at exit
            raise typer.Exit(0) from None
        if exc.errno == errno.ENOSPC:
            where = f" writing {exc.filename}" if exc.filename else ""
            typer.echo(
                f"error: no space left on device{where}; free some space and run the same command "
                "again (finished work is kept)",
                err=True,
            )
        else:
            typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        raise typer.Exit(2) from None
    if os.environ.get("TAILTUNE_DEBUG"):
        raise exc
    typer.echo(
        f"error: internal error {type(exc).__name__}: {first_line(exc)} (set TAILTUNE_DEBUG=1 for a traceback)",
        err=True,
    )
    raise typer.Exit(1) from None


def _positionals(config: str | None, rest: list[str] | None) -> tuple[str | None, list[str]]:
    """(preset or YAML, the other positionals): the first positional is an override, not a
    preset, when it holds '=' (``tailtune run train.epochs=1``)."""
    if config is not None and "=" in config:
        return None, [config, *(rest or [])]
    return config, list(rest or [])


def _config(config: str | None, overrides: list[str], **options):
    from tailtune.config import TEXT_KEYS, load_config

    config, overrides = _positionals(config, overrides)
    # A path or column name is text as typed, quoted whole so that even one that starts and ends
    # with a quote stays as it is (config.TEXT_KEYS).
    extra = [
        f"{key}={json.dumps(str(value), ensure_ascii=False) if key in TEXT_KEYS else value}"
        for key, value in options.items()
        if value is not None
    ]
    return load_config(config, [*overrides, *extra])


# Options several commands take, declared once so their help says the same everywhere.


@functools.cache
def _config_help() -> str:
    """Read the preset folder once for every command's help, not once per command."""
    from tailtune.config import available_presets

    return f"Preset name ({', '.join(available_presets())}) or YAML path."


def _config_argument():
    return typer.Argument(None, help=_config_help())


def _overrides_argument(example: str = "train.epochs=3"):
    return typer.Argument(None, help=f"Dotted overrides, e.g. {example}.")


def _data_option():
    return typer.Option(None, "--data", help="CSV / TSV / JSONL / JSON / Parquet file (default: built-in demo corpus).")


def _label_column_option(default: str = "e.g. Product+Issue"):
    return typer.Option(None, help=f"Label column, or columns joined by '+' ({default}).")


def _text_column_option():
    return typer.Option(None, help="Text column (default: Consumer complaint narrative).")


@app.command()
@friendly
def run(
    config: str = _config_argument(),
    overrides: list[str] = _overrides_argument(),
    data: Path = _data_option(),
    label_column: str = _label_column_option(),
    text_column: str = _text_column_option(),
    out: Path = typer.Option(None, "--out", help="Run directory (default from the preset)."),
    systems: str = typer.Option(None, help="Comma-separated systems, e.g. tfidf-logreg,encoder-lora."),
    report: bool = typer.Option(True, help="Write report.html at the end."),
    processes: int = typer.Option(
        1, "--processes", help="Train in N processes on this machine (torchrun; gloo on CPU, one per GPU)."
    ),
    tune: bool = typer.Option(
        False, "--tune", help="First choose each fine-tuned system's lr (and weighting) on validation (tune.*)."
    ),
    split_seeds: str = typer.Option(
        None, "--split-seeds", help="Run once per split seed (e.g. 0,1,2) into <out>/seed-<s>, then summarise."
    ),
    bench: bool = typer.Option(
        False, "--bench", help="Then time every finished system (tailtune bench), so the memo has latency."
    ),
):
    """Train and compare every system of a config, class by class; write a run directory."""
    _launch(
        config,
        overrides,
        data,
        label_column,
        text_column,
        out,
        systems,
        report,
        processes,
        tune,
        split_seeds,
        bench=bench,
    )


@app.command()
@friendly
def train(
    config: str = _config_argument(),
    overrides: list[str] = _overrides_argument(),
    system: str = typer.Option(..., "--system", help="System(s) to train, comma-separated, e.g. encoder-lora."),
    data: Path = _data_option(),
    label_column: str = _label_column_option(),
    text_column: str = _text_column_option(),
    out: Path = typer.Option(None, "--out", help="Run directory (default from the preset)."),
    processes: int = typer.Option(1, "--processes", help="Train in N processes on this machine (torchrun)."),
    tune: bool = typer.Option(
        False, "--tune", help="First choose each fine-tuned system's lr (and weighting) on validation (tune.*)."
    ),
):
    """Train only the named system(s) into a run directory, without the report.

    The run's other systems are left as they are, so one job per system can fill one run directory, at the same time or one after another; `tailtune run` with every system then resumes it (skipping what is finished) and writes the report. Resume and --processes work as in `run`.
    """
    _launch(config, overrides, data, label_column, text_column, out, system, False, processes, tune, named_only=True)


def _launch(
    config,
    overrides,
    data,
    label_column,
    text_column,
    out,
    systems,
    report: bool,
    processes: int,
    tune: bool = False,
    split_seeds: str | None = None,
    named_only: bool = False,
    bench: bool = False,
):
    from tailtune.distributed import relaunch
    from tailtune.errors import TailtuneError
    from tailtune.run import run as run_all
    from tailtune.splits import check_out, parse_seeds, run_splits

    cfg = _config(
        config,
        overrides or [],
        **{
            "data.path": data,
            "data.label_column": label_column,
            "data.text_column": text_column,
            "out": out,
            "systems": systems,
            "tune.enabled": True if tune else None,
        },
    )
    seeds = parse_seeds(split_seeds) if split_seeds is not None else None
    if seeds:
        if bench:
            raise TailtuneError(
                "--bench times one run directory and --split-seeds writes one per seed; "
                f"time one of them afterwards with: tailtune bench {Path(cfg.out) / 'seed-<s>'}"
            )
        check_out(Path(cfg.out), cfg)
    code = relaunch(processes)  # checked the config first: one error line, not one per process
    if code is not None:
        if code == 0:
            _after_run(Path(cfg.out), cfg.systems, seeds, bench, report)
        raise SystemExit(code)  # not typer.Exit: `friendly` would report it as an internal error
    if seeds:
        run_splits(cfg, seeds, report=report)
    else:
        run_all(cfg, report=report, named_only=named_only)
    if not os.environ.get("TAILTUNE_WORKER") and os.environ.get("RANK", "0") == "0":
        _after_run(Path(cfg.out), cfg.systems, seeds, bench, report)  # under `--processes`, the launcher does


def _after_run(out: Path, names: list[str], seeds: list[int] | None, bench: bool, report: bool) -> None:
    """``--bench``: time the finished systems and rebuild the memo with them; then exit 1 if a
    system failed. The report written by the run stays if the timing fails or is interrupted."""
    from tailtune.run import failed_systems

    if bench and len(failed_systems(out, names)) < len(names):
        _bench_and_report(out, report=report)
    _exit_if_failed(out, names, seeds)


def _exit_if_failed(out: Path, names: list[str], seeds: list[int] | None) -> None:
    """Exit 1 when a system this command trained failed, so that a job script sees it; the run
    directory is complete either way, with the reasons in comparison.csv."""
    from tailtune.run import failed_systems
    from tailtune.splits import seed_dir

    failed = {
        name for d in ([seed_dir(out, s) for s in seeds] if seeds else [out]) for name in failed_systems(d, names)
    }
    if failed:
        typer.echo(
            f"failed: {', '.join(n for n in names if n in failed)} (the reasons are in comparison.csv)", err=True
        )
        raise SystemExit(1)


@app.command()
@friendly
def sweep(
    config: str = _config_argument(),
    items: list[str] = typer.Argument(
        None, help="Axes (method=lora,dora  method.rank=4,16  train.lr=1e-4,1e-3) and plain overrides."
    ),
    data: Path = _data_option(),
    label_column: str = _label_column_option(),
    text_column: str = _text_column_option(),
    out: Path = typer.Option(None, "--out", help="Run directory (default: the preset's, plus -sweep)."),
    systems: str = typer.Option(None, help="Comma-separated systems to sweep from (default: the config's)."),
    report: bool = typer.Option(True, help="Write report.html at the end."),
):
    """Run a grid of methods / settings, each point a system of one run directory."""
    from tailtune.run import run as run_all
    from tailtune.sweep import parse_args, sweep_config

    config, items = _positionals(config, items)
    axes, overrides = parse_args(items)
    cfg = _config(
        config,
        overrides,
        **{"data.path": data, "data.label_column": label_column, "data.text_column": text_column, "systems": systems},
    )
    cfg = sweep_config(cfg, axes, str(out) if out else None)
    run_all(cfg, report=report)
    _exit_if_failed(Path(cfg.out), cfg.systems, None)


@data_app.command("inspect")
@friendly
def data_inspect(
    path: Path = typer.Argument(..., help="CSV / TSV / JSONL / JSON / Parquet file."),
    config: str = typer.Argument(
        None, help="Preset or YAML whose data settings (split, seed, tiers, max_rows) to use; default: demo's."
    ),
    overrides: list[str] = _overrides_argument("data.seed=1"),
    label_column: str = _label_column_option("default: Issue"),
    text_column: str = _text_column_option(),
    min_class_count: int = typer.Option(None, help="Classes with fewer rows are dropped (default: 2)."),
    encoding: str = typer.Option(None, help="Text encoding of a CSV / TSV / JSON file (e.g. cp1252)."),
):
    """Class counts, frequency tiers and problems found, as `tailtune run` with the same config would split the data."""
    from tailtune.data import inspect_data
    from tailtune.run import make_console

    cfg = _config(
        config,
        overrides or [],
        **{
            "data.path": path,
            "data.label_column": label_column,
            "data.text_column": text_column,
            "data.min_class_count": min_class_count,
            "data.encoding": encoding,
        },
    )
    inspect_data(cfg.data, make_console())


@app.command()
@friendly
def report(run_dir: Path = typer.Argument(..., help="A run directory written by tailtune run.")):
    """Rebuild <run>/report.html from the run's files."""
    from tailtune.report import build_report
    from tailtune.run import check_finished_run

    check_finished_run(run_dir)
    typer.echo(build_report(run_dir))


@app.command()
@friendly
def presets():
    """List the shipped config presets."""
    from tailtune.config import available_presets, preset_description

    for name in available_presets():
        typer.echo(f"{name:12s} {preset_description(name)}")


@app.command()
@friendly
def plan(
    config: str = _config_argument(),
    overrides: list[str] = _overrides_argument("encoder.batch_size=32"),
    methods: str = typer.Option(
        None, help="Comma-separated methods, or generate for decoder-generate (default: every registered method)."
    ),
    classes: int = typer.Option(None, help="Head size (default: the classes of the config's data)."),
):
    """Memory of one training step per method and backbone (weights, grads, optimizer, activations), without training."""
    from tailtune.plan import plan as make_plan
    from tailtune.plan import print_plan
    from tailtune.run import make_console

    cfg = _config(config, overrides or [])
    print_plan(make_plan(cfg, _names(methods, "--methods"), classes), make_console())


@app.command()
@friendly
def export(
    system_dir: Path = typer.Argument(..., help="A fine-tuned system: <run>/systems/<name>."),
    merged: Path = typer.Option(..., "--merged", help="Folder to write the merged model to (new or empty)."),
    format: str = typer.Option(
        "hf", "--format", help="hf (stock transformers class) or tailtune (TextClassifier.load)."
    ),
    tolerance: float = typer.Option(1e-4, help="Largest |merged - unmerged| fp32 logit difference accepted."),
):
    """Merge a system's adapter into the base weights and save it; checked against the unmerged model."""
    from tailtune.deploy import export_merged

    record = export_merged(system_dir, merged, fmt=format, tolerance=tolerance)
    check = record["check"]
    typer.echo(
        f"{merged}: {record['class']}, max |merged - unmerged| logit {check['max_abs_logit_diff']:.2e} "
        f"on {check['texts']} texts (tolerance {check['tolerance']:g})"
    )


@app.command()
@friendly
def predict(
    system_dir: Path = typer.Argument(..., help="<run>/systems/<name>, its model/ folder, or an export."),
    input: Path = typer.Option(
        ..., "--input", help="CSV / TSV / JSONL / JSON / Parquet file to classify (a .json is read whole)."
    ),
    output: Path = typer.Option(
        ..., "--output", help="Predictions file (.csv, .jsonl or .parquet); a folder with --engine ray."
    ),
    top_k: int = typer.Option(1, "--top-k", help="Also write label_2, confidence_2, ... up to k."),
    text_column: str = typer.Option(None, help="Text column (default: Consumer complaint narrative, else text)."),
    id_column: str = typer.Option(None, help="Id column copied to the output (default: Complaint ID, else id)."),
    chunk_size: int = typer.Option(
        4096, help="Rows read at a time; memory does not grow with the file (except a .json)."
    ),
    batch_size: int = typer.Option(None, help="Texts per forward pass (default: the system's eval batch size)."),
    precision: str = typer.Option(
        "auto", help="auto (bf16 where the CPU/GPU computes it natively), fp32, bf16 or fp16."
    ),
    label_column: str = typer.Option(
        None,
        help="True labels in the input (one column, or columns joined by '+' as in training): checked against the model's classes, and accuracy reported.",
    ),
    engine: str = typer.Option(
        "local", help="local (this process) or ray (Ray Data; --output is a folder of Parquet parts)."
    ),
    address: str = typer.Option(None, help="Ray cluster to join (host:port or auto; default: start a local one)."),
    workers: int = typer.Option(None, help="Ray predictor actors (default: one per GPU, else CPUs - 1)."),
    encoding: str = typer.Option("utf-8", help="Text encoding of a CSV / TSV / JSONL / JSON input (e.g. cp1252)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file (local engine)."),
):
    """Classify a file of any size, streaming, in the input's order."""
    from tailtune.run import make_console
    from tailtune.scale import ORDER_KEY
    from tailtune.scale import predict as run_predict

    done = run_predict(
        engine,
        system_dir,
        input,
        output,
        text_column=text_column,
        id_column=id_column,
        k=top_k,
        chunk_size=chunk_size,
        batch_size=batch_size,
        precision=precision,
        console=make_console(stderr=True),
        label_column=label_column,
        encoding=encoding,
        overwrite=overwrite or None,
        address=address,
        workers=workers,
    )
    rows = f"{done['rows']:,} row" + ("" if done["rows"] == 1 else "s")
    typer.echo(f"{rows} -> {done['output']} ({done['seconds']:.1f} s)")
    if unlabelled := done.get("unlabelled"):  # the local engine counts them
        has, left = ("row has", "is") if unlabelled == 1 else ("rows have", "are")
        typer.echo(f"{unlabelled:,} {has} no text to classify (empty, or no tokens) and {left} left unlabelled")
    if "parts" in done:
        typer.echo(f"{done['parts']} Parquet parts; sort by '{ORDER_KEY}' for the input's order")
    if label_column is not None:
        if done["accuracy"] is not None:
            typer.echo(f"accuracy on rows whose label the model knows: {done['accuracy']:.3f}")
        if done["unknown_labels"]:
            listed = ", ".join(f"'{k}' ({n})" for k, n in list(done["unknown_labels"].items())[:5])
            more = len(done["unknown_labels"]) - 5
            typer.echo(
                f"warning: {sum(done['unknown_labels'].values()):,} rows carry labels the model cannot "
                f"predict: {listed}{f' and {more} more' if more > 0 else ''}"
            )


@app.command()
@friendly
def bench(
    run_dir: Path = typer.Argument(..., help="A run directory written by tailtune run."),
    batch_sizes: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    repeats: int = typer.Option(3, help="Timed passes over the texts, after a warm-up."),
    max_texts: int = typer.Option(256, help="Test texts timed (a seeded sample)."),
    price_per_hour: float = typer.Option(0.10, help="USD per hour of the machine, for the 64k-complaint cost."),
    systems: str = typer.Option(None, help="Comma-separated subset of the run's systems."),
):
    """Latency, throughput, memory and cost of every finished system; writes <run>/bench.json and
    rebuilds <run>/report.html when the run has one."""
    from tailtune.errors import TailtuneError

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
    except ValueError:
        raise TailtuneError(f"--batch-sizes must be integers separated by commas, got '{batch_sizes}'") from None
    _bench_and_report(
        run_dir,
        report=(run_dir / "report.html").is_file(),
        batch_sizes=sizes,
        repeats=repeats,
        max_texts=max_texts,
        price_per_hour=price_per_hour,
        systems=_names(systems, "--systems"),
    )


def _names(text: str | None, flag: str) -> list[str] | None:
    from tailtune.config import parse_names

    return None if text is None else parse_names(text, flag)


def _bench_and_report(run_dir: Path, report: bool, **options) -> None:
    """Write <run>/bench.json; with ``report``, rebuild report.html so that the memo has its numbers."""
    from tailtune.bench import bench as run_bench
    from tailtune.bench import print_bench
    from tailtune.run import make_console

    console = make_console()
    result = run_bench(run_dir, console=console, **options)
    print_bench(result, console)
    console.print(f"written: {run_dir / 'bench.json'}", markup=False)
    if report:
        from tailtune.report import build_report

        console.print(f"report: {build_report(run_dir)}", markup=False)


@app.command()
@friendly
def serve(
    run_dir: Path = typer.Argument(..., help="A run directory written by tailtune run."),
    port: int = typer.Option(8000, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 for all)."),
    systems: str = typer.Option(None, help="Comma-separated subset of the run's systems."),
    max_batch: int = typer.Option(256, help="Most texts per request."),
    max_chars: int = typer.Option(20000, help="Longest text accepted, in characters."),
    precision: str = typer.Option(
        "auto", help="auto (bf16 where the CPU/GPU computes it natively), fp32, bf16 or fp16."
    ),
):
    """Serve the run's systems over HTTP: POST /predict {"texts": [...], "system"?, "top_k"?}
    (without "system", the run's best system by test macro-F1 answers), GET /systems, GET /health."""
    from tailtune.errors import TailtuneError

    try:
        from tailtune.serve import serve as run_server
    except ImportError as exc:  # fastapi / uvicorn (imported by tailtune.serve) are the serve extra
        raise TailtuneError(f"serve needs {exc.name}: pip install 'tailtune[serve]'") from None

    run_server(
        run_dir,
        host=host,
        port=port,
        systems=_names(systems, "--systems"),
        max_batch=max_batch,
        max_chars=max_chars,
        precision=precision,
    )


def _command_path(args: list[str]) -> str:
    """The command ``args`` name (``tailtune data inspect``), for a usage error click raised
    without its context (an option missing its value, a flag given one)."""
    command, path = typer.main.get_command(app), ["tailtune"]
    for arg in args:
        if not hasattr(command, "commands"):  # a leaf command (typer's click is its own copy)
            break
        if arg in command.commands:
            command = command.commands[arg]
            path.append(arg)
        elif not arg.startswith("-"):
            break
    return " ".join(path)


def main() -> None:  # the console entry point (pyproject.toml), and python -m tailtune.cli
    """Runs the app; a usage error (a missing or unknown option, a bad value) is one line and exit 2,
    as tailtune's own errors are, not click's usage block and a boxed message."""
    import signal
    import sys

    try:
        code = app(standalone_mode=False, prog_name="tailtune")  # an exit code (typer.Exit, --help), or None
    except typer.TyperException as exc:  # typer's click: UsageError, BadParameter, ...
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            ctx = getattr(exc, "ctx", None)
            path = ctx.command_path if ctx is not None else _command_path(sys.argv[1:])
            typer.echo(f"error: {exc.format_message().rstrip('.')}; see '{path} --help'", err=True)
        code = exc.exit_code
    except typer.Abort:  # EOF at a prompt
        typer.echo("aborted", err=True)
        code = 1
    finally:  # the command is over: a Ctrl-C now would only break atexit clean-up with a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
