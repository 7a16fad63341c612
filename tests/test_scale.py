"""Batch classification on Ray: same output as the local engine, order recoverable, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from tailtune import deploy, scale  # noqa: E402
from tailtune.demo import bulk_texts  # noqa: E402

# A loaded machine starts Ray's agents slowly; the default wait (30 s) then kills the raylet.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")


def cli(*args):
    from tailtune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory) -> Path:
    """A finished run with the TF-IDF baseline and a tiny encoder LoRA."""
    from test_deploy import smoke_run_quietly

    return smoke_run_quietly(tmp_path_factory.mktemp("scale") / "run", "systems=[tfidf-logreg,encoder-lora]")


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module: ``predict_ray`` joins it instead of starting its own."""
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def complaints(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` short complaints with shuffled ids, some empty, quoted, multi-line or 'NA'."""
    rng = np.random.default_rng(seed)
    texts = pd.Series(bulk_texts(n, rng), dtype=object)
    texts[7::1000] = ""
    texts[11::1000] = 'said "pay now", then\ncharged a fee'
    texts[13::1000] = "NA"
    ids = [f"{i:07d}" for i in rng.permutation(n)]  # leading zeros must survive
    return pd.DataFrame({"Complaint ID": ids, "text": texts})


def assert_same_predictions(ray_dir: Path, local_file: Path, frame: pd.DataFrame) -> None:
    local = pd.read_parquet(local_file)
    out = pd.read_parquet(ray_dir)
    assert len(out) == len(local) == len(frame)
    assert list(out.columns) == [*local.columns, scale.ORDER_KEY]
    assert out[scale.ORDER_KEY].is_unique
    out = out.sort_values(scale.ORDER_KEY).reset_index(drop=True)
    assert out["Complaint ID"].fillna("").tolist() == frame["Complaint ID"].fillna("").tolist()
    labels = [c for c in local.columns if c.startswith("label")]
    pd.testing.assert_frame_equal(out[labels], local[labels])
    for column in [c for c in local.columns if c.startswith("confidence")]:
        np.testing.assert_allclose(out[column], local[column], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- errors (no Ray started)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "spark"], "unknown engine 'spark' (engines: local, ray)"),
        (["--workers", "2"], "--workers works with --engine ray only"),
        (
            ["--engine", "ray", "--label-column", "Issue"],
            "--label-column works with --engine local only",
        ),
        (
            ["--engine", "ray", "--output", "{existing}"],
            "already exists and is not an empty folder",
        ),
        (["--engine", "ray", "--output", "{file}"], "already exists and is not an empty folder"),
        (["--engine", "ray", "--top-k", "99"], "more than the system's 12 classes"),
        (["--engine", "ray", "--text-column", "body"], "text column 'body' not found"),
        (["--engine", "ray", "--batch-size", "-1"], "--batch-size and --workers must be at least 1"),
        (["--engine", "ray", "--precision", "fp64"], "unknown precision 'fp64'"),  # was an ActorDiedError
        (["--engine", "ray", "--encoding", "klingon"], "--encoding 'klingon' is not a known text encoding"),
        (["--engine", "ray", "--encoding", "cp1252", "--input", "{jsonl}"], "reads JSON lines as UTF-8 only"),
        (["--engine", "ray", "--input", "{json}"], "cannot split a .json file into blocks"),
    ],
)
def test_bad_ray_predict_is_one_line_exit_2(scale_run, tmp_path, args, message):
    complaints(5).to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "part.parquet").write_text("x")
    (tmp_path / "file").write_text("x")
    complaints(5).to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    complaints(5).to_json(tmp_path / "in.json", orient="records")
    paths = {
        "existing": tmp_path / "existing",
        "file": tmp_path / "file",
        "jsonl": tmp_path / "in.jsonl",
        "json": tmp_path / "in.json",
    }
    args = [a.format(**paths) for a in args]
    if "--output" not in args:
        args += ["--output", tmp_path / "out"]
    if "--input" not in args:
        args += ["--input", tmp_path / "in.csv"]
    system = scale_run / "systems" / "tfidf-logreg"
    result = cli("predict", system, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_missing_ray_says_what_to_install(scale_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    complaints(5).to_csv(tmp_path / "in.csv", index=False)
    result = cli(
        "predict",
        scale_run / "systems" / "tfidf-logreg",
        "--input",
        tmp_path / "in.csv",
        "--output",
        tmp_path / "out",
        "--engine",
        "ray",
    )
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --engine ray needs Ray, which is not installed: pip install 'tailtune[scale]'"
    )


def test_an_address_without_a_cluster_is_one_line(scale_run, tmp_path):
    if ray.is_initialized():
        pytest.skip("this process already runs Ray")
    complaints(5).to_csv(tmp_path / "in.csv", index=False)
    result = cli(
        "predict",
        scale_run / "systems" / "tfidf-logreg",
        "--input",
        tmp_path / "in.csv",
        "--output",
        tmp_path / "out",
        "--engine",
        "ray",
        "--address",
        "127.0.0.1:9",
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: could not connect to a Ray cluster at '127.0.0.1:9'")
    assert len(result.output.strip().splitlines()) == 1 and not ray.is_initialized()


# ----------------------------------------------------------------------------- equal to the local engine


def test_ray_equals_local_on_200k_rows(scale_run, ray_session, tmp_path):
    frame = complaints(200_000)
    frame.to_csv(tmp_path / "in.csv", index=False)
    system = scale_run / "systems" / "tfidf-logreg"
    done = scale.predict_ray(system, tmp_path / "in.csv", tmp_path / "ray", workers=2, k=2)
    deploy.predict_file(system, tmp_path / "in.csv", tmp_path / "local.parquet", k=2)
    assert done["rows"] == 200_000 and done["parts"] >= 2 and done["workers"] == 2
    assert_same_predictions(tmp_path / "ray", tmp_path / "local.parquet", frame)
    assert not list(tmp_path.glob(".ray.*")), "temporary folder left behind"


def test_ray_equals_local_with_a_torch_system(scale_run, ray_session, tmp_path):
    frame = complaints(3_000, seed=1)
    frame.to_json(tmp_path / "in.jsonl", orient="records", lines=True)
    system = scale_run / "systems" / "encoder-lora"
    # batch_size=1: no padding, so both engines run the same shapes whatever their chunking.
    scale.predict_ray(
        system,
        tmp_path / "in.jsonl",
        tmp_path / "ray",
        workers=2,
        k=3,
        chunk_size=500,
        batch_size=1,
    )
    deploy.predict_file(system, tmp_path / "in.jsonl", tmp_path / "local.parquet", k=3, batch_size=1)
    assert_same_predictions(tmp_path / "ray", tmp_path / "local.parquet", frame)


def test_ray_reads_what_the_local_engine_reads_and_spreads_a_small_parquet(scale_run, ray_session, tmp_path):
    """.ndjson and .pq were 'No input files found'; a small Parquet file was one block, so one
    actor did all the work whatever --workers said."""
    frame = complaints(4_000, seed=2)
    frame.to_json(tmp_path / "in.ndjson", orient="records", lines=True)
    frame.to_parquet(tmp_path / "in.pq")
    system = scale_run / "systems" / "tfidf-logreg"
    deploy.predict_file(system, tmp_path / "in.ndjson", tmp_path / "local.parquet")
    for name in ("in.ndjson", "in.pq"):
        done = scale.predict_ray(system, tmp_path / name, tmp_path / f"ray-{name}", workers=2, chunk_size=256)
        assert done["parts"] >= 4, done  # one part per block: blocks for both actors, not one
        assert_same_predictions(tmp_path / f"ray-{name}", tmp_path / "local.parquet", frame)


def test_ray_reads_tsv_dialects_and_encodings_as_the_local_engine(scale_run, ray_session, tmp_path):
    """A plain TSV whose text starts with a quote, and a cp1252 CSV with --encoding."""
    frame = complaints(600, seed=3)
    frame["text"] = frame["text"].str.replace("\n", " ")
    frame.loc[::50, "text"] = '"Pay now, caf\u00e9'  # an open quote, closed 25 rows below
    frame.loc[25::50, "text"] = 'they said "stop" twice'
    with open(tmp_path / "in.tsv", "w") as f:  # as a plain TSV writer does: no quoting
        f.write("\t".join(frame.columns) + "\n")
        f.writelines("\t".join(row) + "\n" for row in frame.astype(str).itertuples(index=False))
    frame.to_csv(tmp_path / "in.csv", index=False, encoding="cp1252")
    system = scale_run / "systems" / "tfidf-logreg"
    deploy.predict_file(system, tmp_path / "in.tsv", tmp_path / "local.parquet")
    assert len(pd.read_parquet(tmp_path / "local.parquet")) == len(frame)
    scale.predict_ray(system, tmp_path / "in.tsv", tmp_path / "ray-tsv", workers=2, chunk_size=128)
    assert_same_predictions(tmp_path / "ray-tsv", tmp_path / "local.parquet", frame)
    scale.predict_ray(system, tmp_path / "in.csv", tmp_path / "ray-csv", workers=2, chunk_size=128, encoding="cp1252")
    assert_same_predictions(tmp_path / "ray-csv", tmp_path / "local.parquet", frame)


def test_a_bad_byte_past_the_header_on_ray_names_the_line_and_the_option(scale_run, tmp_path):
    """Ray's reader said 'ValueError: Failed to read CSV file ... check the CSV file has correct format'."""
    (tmp_path / "late.csv").write_bytes(("text\n" + "fine\n" * 3000 + "caf\u00e9\n").encode("cp1252"))
    result, last = _ray_predict_fails(scale_run, tmp_path / "late.csv", tmp_path / "out")
    assert last.startswith(f"error: {tmp_path / 'late.csv'} is not valid UTF-8: byte 0xe9 at line 3002"), last
    assert "--encoding cp1252" in last


def _ray_predict_fails(run: Path, source: Path, out: Path) -> tuple:
    """(result, last stderr line) of `predict --engine ray` in a subprocess, which must exit 2
    without a traceback and without writing ``out``."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tailtune.cli",
            "predict",
            str(run / "systems" / "tfidf-logreg"),
            "--input",
            str(source),
            "--output",
            str(out),
            "--engine",
            "ray",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert not out.exists()
    return result, result.stderr.strip().splitlines()[-1]


def test_a_row_ray_cannot_read_is_one_line(scale_run, tmp_path):
    """A CSV row with an extra field was 'internal error RayTaskError(ValueError): ray::ReadCSV...'."""
    # past the rows the header check reads, so the error comes from Ray's reader
    (tmp_path / "in.csv").write_text("text,Issue\n" + "fine,a\n" * 500 + "one,too,many\n")
    _, last = _ray_predict_fails(scale_run, tmp_path / "in.csv", tmp_path / "out")
    assert last.startswith(f"error: could not classify {tmp_path / 'in.csv'} on Ray: ValueError: Failed to read CSV"), (
        last
    )


def test_predict_command_starts_and_stops_its_own_cluster(scale_run, tmp_path):
    frame = complaints(300, seed=2)
    frame.to_parquet(tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()  # an empty folder is fine
    env = {**os.environ, "COLUMNS": "120"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tailtune.cli",
            "predict",
            str(scale_run / "systems" / "tfidf-logreg"),
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--engine",
            "ray",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        result.stdout.splitlines()[0],
        f"{len(list((tmp_path / 'out').glob('*.parquet')))} Parquet parts; sort by 'order_key' for the input's order",
    ]
    assert result.stdout.startswith("300 rows -> ")
    assert "Ray local cluster: 1 predictor actors, 1 CPU each" in result.stderr
    out = pd.read_parquet(tmp_path / "out").sort_values("order_key")
    assert out["Complaint ID"].fillna("").tolist() == frame["Complaint ID"].fillna("").tolist()


def test_ray_finds_an_id_key_that_first_appears_after_the_first_rows(scale_run, ray_session, tmp_path):
    """JSON lines need not share keys: ids first seen after the rows read for the header were
    left out of the output."""
    frame = complaints(300, seed=3)
    lines = frame.to_json(orient="records", lines=True).splitlines()
    lines[:100] = [json.dumps({"text": t}) for t in frame["text"][:100]]  # no id key at all
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    system = scale_run / "systems" / "tfidf-logreg"
    done = scale.predict_ray(system, tmp_path / "in.jsonl", tmp_path / "ray", workers=2, chunk_size=64)
    local = deploy.predict_file(system, tmp_path / "in.jsonl", tmp_path / "local.parquet")
    assert done["id_column"] == local["id_column"] == "Complaint ID"
    expected = frame.assign(**{"Complaint ID": [None] * 100 + frame["Complaint ID"][100:].tolist()})
    assert_same_predictions(tmp_path / "ray", tmp_path / "local.parquet", expected)
