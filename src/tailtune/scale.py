"""Batch classification on a Ray cluster: ``tailtune predict --engine ray``.

Ray Data reads the input in blocks (``read_csv`` / ``read_json`` / ``read_parquet``, streaming,
so a file larger than memory is fine), a pool of actors that each load the predictor once
classifies them (``map_batches``), and the results are written as a folder of Parquet part
files. Every part holds the columns of the local engine's output (built by the same
:func:`tailtune.deploy.prediction_frame`) plus :data:`ORDER_KEY`, an int64 that grows with the
input row: ``pd.read_parquet(folder).sort_values(ORDER_KEY)`` gives the input's order.

Without an address a local Ray cluster is started for the call and stopped after it; a process
that already runs a Ray session (``ray.init`` by the caller) uses that one. On a multi-node
cluster the input and output paths must be on storage that every node sees, and tailtune must
be installed on every node.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from tailtune import rundir
from tailtune.deploy import (
    ENCODING_HINT,
    check_top_k,
    input_columns,
    load_predictor,
    open_table,
    predict_file,
    prediction_frame,
    resolve_system,
)
from tailtune.errors import TailtuneError, first_line

# Output column whose order is the input's (monotonically increasing, not consecutive).
ORDER_KEY = "order_key"
INSTALL_HINT = "pip install 'tailtune[scale]'"


class _Classify:
    """A Ray actor: loads the predictor once, then turns input batches into output batches."""

    def __init__(self, system_dir: str, text_col: str, id_col: str | None, k: int, batch_size, precision="auto"):
        self.predictor = load_predictor(system_dir, batch_size=batch_size, precision=precision)
        self.text_col, self.id_col, self.k = text_col, id_col, k

    def __call__(self, frame):
        out = prediction_frame(self.predictor, frame, self.text_col, self.id_col, self.k)
        out[ORDER_KEY] = frame[ORDER_KEY].to_numpy()
        import pyarrow as pa

        # converted here, as the local engine converts: Ray's own conversion made a block with
        # no id at all Parquet's null type, and the folder of parts could not be read back
        return pa.Table.from_pandas(out, preserve_index=False)


def predict_ray(
    system_dir: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    text_column: str | None = None,
    id_column: str | None = None,
    k: int = 1,
    chunk_size: int = 4096,
    batch_size: int | None = None,
    precision: str = "auto",
    workers: int | None = None,
    address: str | None = None,
    console=None,
    encoding: str = "utf-8",
) -> dict:
    """Classify every row of ``input_path`` on Ray; write Parquet part files into ``output_dir``.

    ``workers`` actors each hold one predictor (default: one per GPU of the cluster, else one
    per CPU but one, which is left to reading and writing); each is handed ``chunk_size`` rows
    at a time, which it length-sorts into batches of ``batch_size`` like the local engine.
    ``address`` joins a running cluster (``host:port``, ``ray://host:port`` or ``auto``).
    ``output_dir`` must be new or an empty folder; it appears only when complete. Returns
    {"rows", "seconds", "output", "parts", "workers", "text_column", "id_column"}. ``console``
    (rich) is told where the work runs.
    """
    try:
        import ray
        import ray.data
        import ray.exceptions
    except ImportError:
        raise TailtuneError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None

    input_path, output_dir = Path(input_path).resolve(), Path(output_dir).resolve()
    _, folder = resolve_system(system_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise TailtuneError(
            f"output {output_dir} already exists and is not an empty folder (--engine ray writes a folder of Parquet parts)"
        )
    if chunk_size < 1 or k < 1 or any(n is not None and n < 1 for n in (workers, batch_size)):
        raise TailtuneError("--chunk-size, --top-k, --batch-size and --workers must be at least 1")
    from tailtune.config import check_precision

    check_precision(precision)  # before Ray starts: in an actor it was an ActorDiedError
    import csv

    from tailtune.data import READERS, decode_problem, text_codec, tsv_quoting

    kind, codec = READERS.get(input_path.suffix.lower()), text_codec(encoding, "--encoding")
    if kind == "json":  # one JSON document cannot be split into blocks
        raise TailtuneError(
            f"--engine ray cannot split a .json file into blocks ({input_path}); write it as JSON lines "
            "(.jsonl), or use the local engine, which reads it whole"
        )
    if kind == "jsonl" and codec != "utf-8-sig":
        raise TailtuneError(f"--engine ray reads JSON lines as UTF-8 only; leave out --encoding {encoding}")
    # decided once for the header check here and Ray's reader (each decision reads the file twice)
    quoting = tsv_quoting(input_path, codec, ENCODING_HINT) if kind == "tsv" and input_path.is_file() else None
    frames, _ = open_table(input_path, 64, encoding, quoting)  # checks the file and reads its header only
    first = next(frames, None)
    frames.close()
    _, text_col, id_col = input_columns(
        input_path,
        first and first[0],
        text_column,
        id_column,
        encoding,
        scan=text_column is None or id_column is None,
    )
    n_classes = _n_classes(folder)
    if n_classes is not None:
        check_top_k(k, n_classes)

    started_here = _connect(ray, address, workers)
    try:
        started = time.perf_counter()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = workers or gpus or max(1, cpus - 1)
        if not gpus and workers >= cpus:
            raise TailtuneError(
                f"--workers {workers} would take all {cpus} CPUs of the Ray cluster and leave none "
                f"to read and write; use at most {max(1, cpus - 1)}"
            )
        if console is not None:
            where = f"cluster at {address}" if address else "local cluster"
            device = "1 GPU" if gpus else "1 CPU"
            console.print(f"Ray {where}: {workers} predictor actors, {device} each", markup=False)
        # ORDER_KEY's high bits are the index of the task that a block went to: they follow the
        # input's order only if blocks are handed to tasks in that order.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        # At least 4 blocks per actor: a Parquet file under ~128 MB was one block, so one actor
        # classified every row whatever --workers said.
        ds = _read(
            input_path, [c for c in (text_col, id_col) if c is not None], 4 * workers, codec, quoting == csv.QUOTE_NONE
        )
        from ray.data.expressions import monotonically_increasing_id

        ds = ds.with_column(ORDER_KEY, monotonically_increasing_id())
        ds = ds.map_batches(
            _Classify,
            fn_constructor_kwargs={
                "system_dir": str(Path(system_dir).resolve()),
                "text_col": text_col,
                "id_col": id_col,
                "k": k,
                "batch_size": batch_size,
                "precision": precision,
            },
            batch_size=chunk_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=workers),
            **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
        )
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = rundir.temp_dir(output_dir)
        try:
            ray_data_log = logging.getLogger("ray.data")
            level = ray_data_log.level
            ray_data_log.setLevel(logging.CRITICAL)  # a failed task's ~160 lines; the error below says it in one
            try:
                ds.write_parquet(str(tmp))
            except ray.exceptions.RayTaskError as exc:  # a row Ray's reader refuses, a bad byte, ...
                problem = decode_problem(input_path, codec, ENCODING_HINT)
                if problem:  # pyarrow's message does not say which byte, or the fix
                    raise TailtuneError(problem) from None
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                raise TailtuneError(
                    f"could not classify {input_path} on Ray: {type(cause).__name__}: {first_line(cause)}"
                ) from None
            finally:
                ray_data_log.setLevel(level)
            parts = sorted(tmp.glob("*.parquet"))
            rows = _count_rows(parts)
            if output_dir.exists():
                output_dir.rmdir()
            os.rename(tmp, output_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {
            "rows": rows,
            "seconds": time.perf_counter() - started,
            "output": str(output_dir),
            "parts": len(parts),
            "workers": workers,
            "text_column": text_col,
            "id_column": id_col,
        }
    finally:
        if started_here:
            ray.shutdown()


def _connect(ray, address: str | None, workers: int | None) -> bool:
    """Join ``address`` or start a quiet local cluster; True when this call started Ray."""
    import logging

    if ray.is_initialized():
        if address is not None:
            raise TailtuneError("this process is already connected to Ray; leave out --address")
        _quiet_data()
        return False
    options = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        # The actors take one CPU each; one more is left for the read and write tasks, which
        # would otherwise wait forever behind actors that never finish.
        options |= {
            "num_cpus": (workers or max(1, (os.cpu_count() or 2) - 1)) + 1,
            "include_dashboard": False,
        }
    else:
        _check_reachable(address)
        options["address"] = address
    try:
        ray.init(**options)
    except Exception as exc:  # ray raises ConnectionError, ValueError or its own types
        if address is None:
            raise
        raise TailtuneError(f"could not connect to a Ray cluster at '{address}': {first_line(exc)}") from None
    _quiet_data()
    return True


def _check_reachable(address: str) -> None:
    """Fail fast on an address nothing listens on (``ray.init`` would retry for minutes)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise TailtuneError(f"--address must be host:port, ray://host:port or auto, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise TailtuneError(f"could not connect to a Ray cluster at '{address}': {exc.strerror or exc}") from None


def _quiet_data() -> None:
    """No progress bars and no execution chatter from Ray Data: the CLI prints one line."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _read(path: Path, columns: list[str], blocks: int, codec: str = "utf-8-sig", literal: bool = False):
    """A Ray Dataset of ``columns`` of a CSV / TSV / JSONL / Parquet file, every CSV column as text,
    in at least ``blocks`` blocks. Any file extension the local engine reads (.ndjson, .pq):
    Ray's readers otherwise look for their own and find "no input files". ``codec`` is the
    text files' (:func:`tailtune.data.text_codec`); ``literal`` reads a TSV without quoting, as
    the local engine does when :func:`tailtune.data.tsv_quoting` says so."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    from tailtune.data import READERS

    kind = READERS[path.suffix.lower()]
    extensions = [path.suffix.lstrip(".")]
    common = {"file_extensions": extensions, "override_num_blocks": blocks}
    if kind == "parquet":
        import math

        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
        ds = ray.data.read_parquet(str(path), columns=columns, file_extensions=extensions)
        # Ray reads a Parquet file under ~128 MB as one block whatever override_num_blocks says;
        # split it (in order), at most 65,536 rows a block
        return ds.repartition(max(blocks, math.ceil(rows / 65_536)))
    if kind == "jsonl":
        # Ray's pyarrow reader (lines=False) reads JSON lines and keeps "007" a string, as the
        # local engine does; lines=True goes through pandas, which makes it the number 7.
        return ray.data.read_json(str(path), **common).select_columns(columns)
    # As the local engine reads them (dtype=str, keep_default_na=False): "007" stays "007",
    # "NA" stays "NA". Narratives hold line breaks inside quotes.
    return ray.data.read_csv(
        str(path),
        **common,
        read_options=pacsv.ReadOptions(encoding="utf8" if codec == "utf-8-sig" else codec),
        parse_options=pacsv.ParseOptions(
            delimiter="\t" if kind == "tsv" else ",",
            newlines_in_values=True,
            quote_char=False if literal else '"',
        ),
        convert_options=pacsv.ConvertOptions(
            include_columns=columns,
            column_types={c: pa.string() for c in columns},
            strings_can_be_null=False,
        ),
    )


def _n_classes(folder: Path) -> int | None:
    """The system's class count from its saved metadata, without loading the model."""
    from tailtune import rundir
    from tailtune.deploy import EXPORT_INFO, load_meta

    if (folder / EXPORT_INFO).is_file():
        return rundir.read_json_or_fail(folder / EXPORT_INFO, "the export is damaged; export it again").get("classes")
    classes = load_meta(folder).get("classes")
    return len(classes) if classes is not None else None


def _count_rows(parts: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


# ----------------------------------------------------------------------------- engines

ENGINES = {"local": predict_file, "ray": predict_ray}
# Options that only one engine takes, and that engine.
ENGINE_OPTIONS = {"address": "ray", "workers": "ray", "label_column": "local", "overwrite": "local"}


def predict(engine: str, system_dir, input_path, output_path, **options) -> dict:
    """``tailtune predict`` on ``engine`` (local | ray); an option the engine does not take is an error."""
    if engine not in ENGINES:
        raise TailtuneError(f"unknown engine '{engine}' (engines: {', '.join(ENGINES)})")
    for name, value in options.items():
        if value is not None and ENGINE_OPTIONS.get(name, engine) != engine:
            flag = "--" + name.replace("_", "-")
            raise TailtuneError(f"{flag} works with --engine {ENGINE_OPTIONS[name]} only")
    options = {n: v for n, v in options.items() if ENGINE_OPTIONS.get(n, engine) == engine}
    return ENGINES[engine](system_dir, input_path, output_path, **options)
