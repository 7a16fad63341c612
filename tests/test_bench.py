"""``tailtune bench``: bench.json holds every field the report reads, with consistent numbers."""

from __future__ import annotations

import json

import pytest
from test_deploy import cli, smoke_run_quietly, tailtune, train_smoke_run

from tailtune import bench

SYSTEM_KEYS = {
    "ms_per_example",
    "examples_per_s",
    "peak_mem_mb",
    "time_64k_s",
    "cost_64k",
    "variant",
    "variants",
}
VARIANT_KEYS = {
    "variant",
    "batch_size",
    "ms_per_example",
    "p50_ms",
    "p95_ms",
    "examples_per_s",
    "accuracy",
    "accuracy_change",
}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    return train_smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def benched(smoke_run):
    result = bench.bench(smoke_run, batch_sizes=(1, 4), repeats=1, max_texts=64, price_per_hour=0.5)
    return smoke_run, result, json.loads((smoke_run / "bench.json").read_text())


def test_bench_json_has_every_field(benched):
    run_dir, result, saved = benched
    assert saved == json.loads(json.dumps(result))
    machine = saved["machine"]
    assert isinstance(machine["cpu"], str) and machine["cpu"]
    assert isinstance(machine["threads"], int) and machine["threads"] >= 1
    assert machine["gpu"] is None or isinstance(machine["gpu"], str)
    assert isinstance(machine["torch"], str)
    assert saved["price_per_hour"] == 0.5
    assert saved["batch_size"] == 4  # 32 was not benchmarked: the largest size is the headline
    from tailtune.deploy import finished_systems

    assert list(saved["systems"]) == finished_systems(run_dir)
    for name, entry in saved["systems"].items():
        assert set(entry) >= SYSTEM_KEYS, name
        for key in SYSTEM_KEYS - {"variant", "variants"}:
            assert isinstance(entry[key], float) and entry[key] >= 0, (name, key)
        assert entry["time_64k_s"] == pytest.approx(64_000 * entry["ms_per_example"] / 1000)
        assert entry["cost_64k"] == pytest.approx(entry["time_64k_s"] / 3600 * 0.5)
        assert entry["examples_per_s"] == pytest.approx(1000 / entry["ms_per_example"])
        for row in entry["variants"]:
            assert set(row) == VARIANT_KEYS, name
            assert row["batch_size"] in (1, 4) and row["p95_ms"] >= row["p50_ms"] > 0
            assert 0 <= row["accuracy"] <= 1
        names = {r["variant"] for r in entry["variants"]}
        assert entry["variant"] in names
        for skipped in entry["skipped"]:
            assert skipped["variant"] not in names and skipped["reason"]
        headline = [r for r in entry["variants"] if r["variant"] == entry["variant"] and r["batch_size"] == 4]
        assert headline[0]["ms_per_example"] == entry["ms_per_example"]
    assert {r["variant"] for r in saved["systems"]["encoder-lora"]["variants"]} >= {
        "unmerged-fp32",
        "merged-fp32",
    }
    assert set(saved["ratios"]["unmerged_vs_merged"]) == {
        "encoder-lora",
        "encoder-lora-weighted",
        "decoder-lora",
    }
    assert all(r > 0 for r in saved["ratios"]["unmerged_vs_merged"].values())
    dec, enc = saved["systems"]["decoder-lora"], saved["systems"]["encoder-lora"]
    assert saved["ratios"]["decoder_vs_encoder"] == pytest.approx(dec["ms_per_example"] / enc["ms_per_example"])


def test_memory_is_each_systems_own(benched):
    """Measured in the benching process, the first system paid for importing transformers and
    peft (~250 MiB) and one benched after a system on the same base showed 0 MiB (a review)."""
    _, _, saved = benched
    mem = {name: entry["peak_mem_mb"] for name, entry in saved["systems"].items()}
    tiny = [name for name in mem if name != "tfidf-logreg"]  # tiny random-weight torch models
    assert all(1 < mem[name] < 150 for name in tiny), mem
    assert max(mem[n] for n in tiny) < 2 * min(mem[n] for n in tiny), mem  # same tiny sizes, same cost


def test_bench_accuracy_is_the_runs_accuracy(benched):
    """All 25 test texts are timed, so each reference variant's accuracy is the run's test accuracy."""
    run_dir, result, _ = benched
    for name, entry in result["systems"].items():
        metrics = json.loads((run_dir / "systems" / name / "metrics.json").read_text())
        reference = [r for r in entry["variants"] if r["accuracy_change"] == 0.0]
        assert reference and reference[0]["accuracy"] == pytest.approx(metrics["accuracy"]), name
        unmerged = [r for r in entry["variants"] if r["variant"] == "unmerged-fp32"]
        assert all(r["accuracy"] == pytest.approx(metrics["accuracy"]) for r in unmerged)


def test_bf16_is_run_or_skipped_with_a_reason(benched):
    _, result, _ = benched
    reason = bench.bf16_support(__import__("torch").device("cpu"))
    for name, entry in result["systems"].items():
        if name == "tfidf-logreg":
            continue
        bf16 = [s for s in entry["skipped"] if s["variant"].endswith("bf16")]
        assert bool(bf16) == (reason is not None), name
        if name in result["ratios"]["unmerged_vs_merged"]:  # LoRA: also timed unmerged in bf16, as serve runs
            timed = {r["variant"] for r in entry["variants"]}
            assert ("unmerged-bf16" in timed) == (reason is None), name
            assert ("unmerged-bf16" in {s["variant"] for s in bf16}) == (reason is not None), name


def test_length_batches_cover_every_text_longest_first():
    texts = ["a" * n for n in (3, 10, 1, 7, 7, 2)]
    batches = bench.length_batches(texts, 4)
    assert [len(b) for b in batches] == [4, 2]
    flat = [t for b in batches for t in b]
    assert sorted(flat) == sorted(texts) and [len(t) for t in flat] == sorted(map(len, texts), reverse=True)


def test_bench_command_runs(smoke_run):
    result = tailtune(
        "bench",
        smoke_run,
        "--batch-sizes",
        "2",
        "--repeats",
        "1",
        "--max-texts",
        "8",
        "--systems",
        "tfidf-logreg,decoder-lora",
        "--price-per-hour",
        "1.5",
    )
    assert result.returncode == 0, result.stderr
    assert "deployment headline" in result.stdout and "decoder-lora" in result.stdout
    saved = json.loads((smoke_run / "bench.json").read_text())
    assert list(saved["systems"]) == ["tfidf-logreg", "decoder-lora"] and saved["price_per_hour"] == 1.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "a,b"], "--batch-sizes must be integers"),
        (["--systems", "nope"], "no finished system named nope"),
        (["--systems", "tfidf-logreg,"], "--systems 'tfidf-logreg,' has an empty name"),
        (["--repeats", "0"], "must be at least 1"),
        (["--price-per-hour", "-1"], "--price-per-hour must be a finite number, 0 or more"),
        (["--price-per-hour", "inf"], "--price-per-hour must be a finite number"),  # wrote "cost_64k": Infinity
    ],
)
def test_bench_bad_input_is_one_line_exit_2(smoke_run, args, message):
    result = cli("bench", smoke_run, *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_pipeline_benchmark_truncates_both_sides_at_max_length(smoke_run):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "predict_vs_pipeline.py"
    args = [sys.executable, str(script), str(smoke_run), "--texts", "8", "--repeats", "1"]
    result = subprocess.run([*args, "--max-length", "12"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "truncated at 12 tokens" in result.stdout and "x faster than the pipeline" in result.stdout
    bad = subprocess.run([*args, "--max-length", "0"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--max-length must be at least 1" in bad.stderr


def test_benchmarks_refuse_an_unsuitable_system_folder_in_one_line(smoke_run):
    """merged_vs_base.py on the TF-IDF folder ended in an AttributeError traceback."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "merged_vs_base.py"
    system = smoke_run / "systems" / "tfidf-logreg"
    result = subprocess.run(
        [sys.executable, str(script), str(system), "--texts", "4", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {system} is not a LoRA system"


def test_generate_step_benchmark_times_both_batches_and_refuses_an_encoder():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "generate_step.py"
    args = [sys.executable, str(script), "--steps", "1", "--max-length", "16", "--batch-size", "4"]
    result = subprocess.run([*args, "--backbone", "tiny:qwen2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "label logits: logits (4, " in result.stdout and "x" in result.stdout.splitlines()[-1]
    refused = subprocess.run([*args, "--backbone", "tiny:bert"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2
    assert refused.stderr.strip() == "error: decoder-generate needs a decoder backbone; 'tiny:bert' is an encoder"


def test_pipeline_benchmark_times_an_encoder_system_against_the_stock_class(smoke_run):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "predict_vs_pipeline.py"
    result = subprocess.run(
        [sys.executable, str(script), str(smoke_run), "--system", "encoder-lora", "--texts", "8", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "BertForSequenceClassification with the same weights" in result.stdout, result.stdout
    assert "x faster than the pipeline" in result.stdout


def test_pipeline_benchmark_times_a_mean_pooled_decoder_against_the_stock_class(tmp_path):
    """The demo's decoder pools the mean, which no stock class does: export refused it, so the script failed."""
    import subprocess
    import sys
    from pathlib import Path

    out = smoke_run_quietly(tmp_path / "mean", "systems=decoder-lora", "decoder.pooling=mean")
    script = Path(__file__).parents[1] / "benchmarks" / "predict_vs_pipeline.py"
    result = subprocess.run(
        [sys.executable, str(script), str(out), "--texts", "8", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "mean pooling) vs pipeline on Qwen2ForSequenceClassification with the same weights (timing only: it pools its last token)"
        in result.stdout
    ), result.stdout
    assert "x faster than the pipeline" in result.stdout


def test_bench_of_some_systems_keeps_the_others_measured_alike(smoke_run, tmp_path):
    """`bench --systems X` replaced bench.json, so the report lost every other system's numbers."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "bench.json").unlink(missing_ok=True)
    alike = {"batch_sizes": (2,), "repeats": 1, "max_texts": 8}
    bench.bench(run, systems=["tfidf-logreg"], **alike)
    bench.bench(run, systems=["encoder-probe"], **alike)
    assert list(json.loads((run / "bench.json").read_text())["systems"]) == ["encoder-probe", "tfidf-logreg"]
    bench.bench(run, systems=["encoder-probe"], **{**alike, "repeats": 2})
    assert list(json.loads((run / "bench.json").read_text())["systems"]) == ["encoder-probe"]


def test_stale_numbers_are_not_kept_or_reported(smoke_run, tmp_path):
    """A system that failed, or was trained again, after it was benched kept its old numbers in
    bench.json and a latency row in the report (a review)."""
    import shutil

    import pandas as pd

    from tailtune.report import build_report

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    alike = {"batch_sizes": (2,), "repeats": 1, "max_texts": 8}
    bench.bench(run, systems=["tfidf-logreg", "encoder-probe", "encoder-lora"], **alike)
    from conftest import restamp

    metrics = run / "systems" / "encoder-probe" / "metrics.json"  # trained again: new metrics.json
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "train_seconds": 1.0}))
    restamp(metrics.parent)
    html = build_report(run).read_text()
    assert "bench.json&#39;s numbers for encoder-probe predate its last training" in html
    comparison = pd.read_csv(run / "comparison.csv")  # encoder-lora failed since
    comparison.loc[comparison["system"] == "encoder-lora", "status"] = "failed"
    comparison.to_csv(run / "comparison.csv", index=False)
    bench.bench(run, systems=["tfidf-logreg"], **alike)
    assert list(json.loads((run / "bench.json").read_text())["systems"]) == ["tfidf-logreg"]


def test_bench_rebuilds_the_report_when_the_run_has_one(smoke_run, tmp_path):
    """The memo said 'bench.json is missing' after `tailtune bench` until `tailtune report` ran."""
    import shutil

    from tailtune.report import build_report

    run, bare = tmp_path / "run", tmp_path / "bare"
    shutil.copytree(smoke_run, run)
    (run / "bench.json").unlink(missing_ok=True)
    shutil.copytree(run, bare)
    assert "bench.json is missing" in build_report(run).read_text()
    args = ("--batch-sizes", "2", "--repeats", "1", "--max-texts", "8", "--systems", "tfidf-logreg")
    result = cli("bench", run, *args)
    assert result.exit_code == 0, result.output
    assert f"report: {run / 'report.html'}" in result.output
    html = (run / "report.html").read_text()
    assert "bench.json is missing" not in html and "ms / example" in html
    result = cli("bench", bare, *args)  # a run written without a report does not get one
    assert result.exit_code == 0, result.output
    assert (bare / "bench.json").is_file() and not (bare / "report.html").exists()


def test_run_with_bench_writes_a_memo_with_latency(tmp_path):
    out = tmp_path / "run"
    result = tailtune("run", "smoke", "--out", out, "--systems", "tfidf-logreg,encoder-probe", "--bench")
    assert result.returncode == 0, result.stderr
    assert list(json.loads((out / "bench.json").read_text())["systems"]) == ["tfidf-logreg", "encoder-probe"]
    html = (out / "report.html").read_text()
    assert "bench.json is missing" not in html and "Provisional" not in html
    assert "deployment headline" in result.stdout


def test_run_with_bench_skips_the_timing_when_every_system_failed(tmp_path):
    from test_report import write_fake_run

    from tailtune.cli import _after_run

    run = write_fake_run(tmp_path / "run", systems=(), failed=("encoder-lora", "decoder-lora"), with_bench=False)
    with pytest.raises(SystemExit) as stop:
        _after_run(run, ["encoder-lora", "decoder-lora"], None, bench=True, report=True)
    assert stop.value.code == 1 and not (run / "bench.json").exists()


def test_bench_with_split_seeds_is_one_line_exit_2(tmp_path):
    result = cli("run", "smoke", "--out", tmp_path / "run", "--split-seeds", "0,1", "--bench")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--bench times one run directory" in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_bench_of_some_systems_says_which_numbers_it_dropped(smoke_run, tmp_path):
    """A review: `bench --systems X --repeats 2` silently left only X in bench.json."""
    import shutil

    from rich.console import Console

    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "bench.json").unlink(missing_ok=True)
    bench.bench(run, systems=["tfidf-logreg", "encoder-probe"], batch_sizes=(2,), repeats=1, max_texts=8)
    console = Console(record=True, width=300)
    bench.bench(run, systems=["tfidf-logreg"], batch_sizes=(2,), repeats=2, max_texts=8, console=console)
    assert "dropped from bench.json: encoder-probe (timed with other settings: repeats 1 then, 2 now)" in (
        console.export_text()
    )
