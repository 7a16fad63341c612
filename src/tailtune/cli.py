"""The ``tailtune`` command line. Thin: parse, call the library, turn errors into one line."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Parameter-efficient fine-tuning of text classifiers on long-tailed label sets, "
    "compared class by class.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at a data file before training on it.")
app.add_typer(data_app, name="data")


def friendly(fn):
    """Bad input -> 'error: <one line>' and exit 2; Ctrl-C -> a clean stop; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import warnings

        from tailtune.errors import TailtuneError

        # Deprecation chatter from dependencies is for their developers, not for our users.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return fn(*args, **kwargs)
        except TailtuneError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            typer.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            if os.environ.get("TAILTUNE_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            typer.echo(
                f"error: internal error {type(exc).__name__}: {first} (set TAILTUNE_DEBUG=1 for a traceback)",
                err=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _config(config: str | None, overrides: list[str], **options):
    from tailtune.config import load_config

    # The first positional may be an override if no config file/preset is given.
    if config is not None and "=" in config:
        overrides = [config, *overrides]
        config = None
    extra = [f"{key}={value}" for key, value in options.items() if value is not None]
    return load_config(config, [*overrides, *extra])


@app.command()
@friendly
def run(
    config: str = typer.Argument(None, help="Preset name (demo, smoke, cpu-real, cfpb-paper) or YAML path."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. train.epochs=3."),
    data: Path = typer.Option(None, "--data", help="CSV / JSONL / Parquet file (default: built-in demo corpus)."),
    label_column: str = typer.Option(None, help="Label column, or columns joined by '+' (e.g. Product+Issue)."),
    text_column: str = typer.Option(None, help="Text column (default: Consumer complaint narrative)."),
    out: Path = typer.Option(None, "--out", help="Run directory (default from the preset)."),
    systems: str = typer.Option(None, help="Comma-separated systems, e.g. tfidf-logreg,encoder-lora."),
    report: bool = typer.Option(True, help="Write report.html at the end."),
):
    """Train and compare every system of a config, class by class; write a run directory."""
    from tailtune.run import run as run_all

    cfg = _config(
        config,
        overrides or [],
        **{"data.path": data, "data.label_column": label_column, "data.text_column": text_column,
           "out": out, "systems": systems},
    )
    run_all(cfg, report=report)


@data_app.command("inspect")
@friendly
def data_inspect(
    path: Path = typer.Argument(..., help="CSV / JSONL / Parquet file."),
    label_column: str = typer.Option("Issue", help="Label column, or columns joined by '+'."),
    text_column: str = typer.Option("Consumer complaint narrative", help="Text column."),
    min_class_count: int = typer.Option(2, help="Classes with fewer rows are dropped."),
):
    """Class counts, frequency tiers and problems found, without training anything."""
    from rich.console import Console

    from tailtune.config import DataConfig
    from tailtune.data import inspect_data

    cfg = DataConfig(path=str(path), label_column=label_column, text_column=text_column,
                     min_class_count=min_class_count)
    inspect_data(cfg, Console())


@app.command()
@friendly
def report(run_dir: Path = typer.Argument(..., help="A run directory written by tailtune run.")):
    """Rebuild <run>/report.html from the run's files."""
    from tailtune.errors import TailtuneError
    from tailtune.report import build_report

    if not (run_dir / "comparison.csv").exists():
        raise TailtuneError(f"{run_dir} is not a finished tailtune run (no comparison.csv)")
    typer.echo(build_report(run_dir))


@app.command()
@friendly
def presets():
    """List the shipped config presets."""
    from tailtune.config import PRESET_DIR, available_presets

    for name in available_presets():
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        typer.echo(f"{name:12s} {first}")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":
    main()
