"""Scaling of batch classification: local ``predict`` vs Ray Data with 1 and 2 workers, and streaming.

Part 1 classifies the same generated CSV of short complaints with one system three ways, in
one run: the local engine (:func:`tailtune.deploy.predict_file`, one process) and
:func:`tailtune.scale.predict_ray` with 1 and 2 predictor actors on one local Ray cluster
(started once, before the clock; each Ray pass includes its actors' start and the model load,
as a real job does). Every contender gets a warm-up pass on a small file, then ``--repeats``
timed passes; the table gives median and 5th-percentile (slow-pass) rows/s and each one's ratio to local.

Part 2 streams a ``--loading-rows`` (default 1M) row CSV the way the local engine reads it
(``open_table``, ``--chunk-size`` rows at a time) and tokenises every chunk with the tiny BERT
tokenizer (or the system's own, for a torch system); it prints rows/s and the process's peak
RSS after 250k, 500k and 1M rows, which must stay flat: nothing holds more than one chunk. It
runs first, so Part 1's buffers do not count in its peak.

Usage::

    python benchmarks/predict_scaling.py RUN_DIR [--system tfidf-logreg] [--rows 200000]
        [--loading-rows 1000000] [--repeats 2]

On a shared or small machine the Ray rows measure Ray's fixed costs (a dozen processes,
actor start-up, object store hand-offs) as much as the classification: read the ratios with
the core count in mind.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import at_least_one, entry, locate

from tailtune.demo import bulk_texts


def write_csv(path: Path, rows: int, seed: int = 0, piece: int = 100_000) -> Path:
    """``rows`` short complaints (6 words, unique ids), written ``piece`` rows at a time."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    for start in range(0, rows, piece):
        n = min(piece, rows - start)
        texts = bulk_texts(n, rng)
        frame = pd.DataFrame({"Complaint ID": np.arange(start, start + n), "text": texts})
        frame.to_csv(path, mode="a" if start else "w", header=start == 0, index=False)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def loading(system_dir: Path, path: Path, chunk_size: int, marks: list[int]) -> None:
    from tailtune import backbones, deploy
    from tailtune.classifier import tokenize

    predictor = deploy.load_predictor(system_dir)
    tokenizer = getattr(predictor, "tokenizer", None)
    max_length = getattr(predictor, "max_length", 128)
    if tokenizer is None:  # TF-IDF: time a transformer tokenizer all the same
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(backbones.make_tiny("bert"))
    frames, _ = deploy.open_table(path, chunk_size)
    print(f"\nloading + tokenisation: {path.stat().st_size / 1e6:.0f} MB CSV, chunks of {chunk_size:,} rows")
    print(f"{'rows':>10} {'rows/s':>10} {'tokens/row':>11} {'peak RSS MB':>12}")
    rows, tokens, started, marks = 0, 0, time.perf_counter(), list(marks)
    for frame, _ in frames:
        ids = tokenize(tokenizer, frame["text"].tolist(), max_length)
        rows += len(frame)
        tokens += sum(map(len, ids))
        if marks and rows >= marks[0]:
            marks.pop(0)
            rate = rows / (time.perf_counter() - started)
            print(f"{rows:>10,} {rate:>10,.0f} {tokens / rows:>11.1f} {peak_rss_mb():>12.0f}")


def throughput(system_dir: Path, path: Path, warm: Path, rows: int, repeats: int, chunk_size: int) -> None:
    import ray

    from tailtune import deploy, scale

    started = time.perf_counter()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    print(f"\nRay local cluster started in {time.perf_counter() - started:.1f} s (not timed below)")
    out = Path(tempfile.mkdtemp(prefix="tt-scaling-"))

    def local(src):
        deploy.predict_file(system_dir, src, out / "local.parquet", chunk_size=chunk_size)

    def on_ray(workers):
        def run(src):
            shutil.rmtree(out / "ray", ignore_errors=True)
            scale.predict_ray(system_dir, src, out / "ray", workers=workers, chunk_size=chunk_size)

        return run

    contenders = {"local": local, "ray, 1 worker": on_ray(1), "ray, 2 workers": on_ray(2)}
    seconds = {name: [] for name in contenders}
    try:
        for fn in contenders.values():
            fn(warm)
        for _ in range(repeats):  # interleaved, so drifting load hits every contender alike
            for name, fn in contenders.items():
                t = time.perf_counter()
                fn(path)
                seconds[name].append(time.perf_counter() - t)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    print(f"\npredict throughput: {rows:,} rows, {system_dir.name}, chunks of {chunk_size:,}, {repeats} passes")
    ref = np.median(rows / np.asarray(seconds["local"]))
    print(f"{'engine':<16} {'median rows/s':>14} {'p5 rows/s':>11} {'vs local':>9}")
    for name, s in seconds.items():
        rate = rows / np.asarray(s)
        print(f"{name:<16} {np.median(rate):>14,.0f} {np.percentile(rate, 5):>11,.0f} {np.median(rate) / ref:>8.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="run directory or system folder")
    parser.add_argument("--system", default="tfidf-logreg", help="system of the run")
    parser.add_argument("--rows", type=at_least_one, default=200_000)
    parser.add_argument("--loading-rows", type=at_least_one, default=1_000_000)
    parser.add_argument("--chunk-size", type=at_least_one, default=4096)
    parser.add_argument("--repeats", type=at_least_one, default=2)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    folders, _ = locate(args.path, args.system, lambda m: True)
    system_dir = folders[0]
    print(f"{os.cpu_count()} CPUs, system {system_dir}")
    with tempfile.TemporaryDirectory(prefix="tt-scaling-data-") as tmp:
        tmp = Path(tmp)
        big = write_csv(tmp / "big.csv", args.loading_rows, seed=1)
        marks = [m for m in (250_000, 500_000, 1_000_000) if m <= args.loading_rows]
        loading(system_dir, big, args.chunk_size, marks or [args.loading_rows])
        big.unlink()
        path = write_csv(tmp / "in.csv", args.rows)
        warm = write_csv(tmp / "warm.csv", min(args.rows, 5_000), seed=2)
        throughput(system_dir, path, warm, args.rows, args.repeats, args.chunk_size)


if __name__ == "__main__":
    entry(main)
