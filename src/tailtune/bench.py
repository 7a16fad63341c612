"""``tailtune bench``: latency, throughput, memory and cost of every trained system of a run.

Each system that finished (``comparison.csv`` status ok) is loaded the way ``tailtune
predict`` loads it and timed on the run's own test texts, at their real lengths, in
deployment variants side by side:

- fine-tuned: ``merged-fp32``, ``merged-bf16``, ``merged-int8`` and, for methods that add
  modules and merge (LoRA family, IA3, LoHa, LoKr), ``unmerged-fp32`` and ``unmerged-bf16``
  (adapter applied at run time, as during training and in ``serve``); methods that cannot merge (adapter, prompt, prefix) are timed
  as ``unmerged-fp32/bf16/int8``: their extra work stays in every forward pass;
- probes: ``fp32``, ``bf16``, ``int8``; ``tfidf-logreg``: ``sklearn``.

bf16 runs only where the device computes it natively (CUDA with bf16, or a CPU with
AVX512-BF16/AMX); elsewhere it is recorded as skipped with the reason. int8 is PyTorch
dynamic quantisation of every ``nn.Linear`` (CPU only). Each variant's accuracy on the timed
texts sits next to its speed, as a change from the fp32 reference of the same system.

How it is measured: texts are sorted by length and cut into batches, as ``predict`` does
inside a chunk; a few of the longest batches warm up first; then every batch is timed
``repeats`` times, tokenisation included. ``p50_ms``/``p95_ms`` are per-*batch* latencies in
milliseconds; ``ms_per_example`` is the median over repeats of (pass time / texts) and
``examples_per_s`` its inverse. ``peak_mem_mb`` is the peak RSS growth while loading the
system's headline variant and classifying the texts once (peak allocated GPU memory on CUDA),
measured in a fresh process that has already imported torch, transformers, peft and
scikit-learn. (Measured in the benching process, the first system paid for those imports,
about 250 MiB, and later ones showed about 0: memory kept from earlier systems hid theirs.)
Benching some systems keeps the others' numbers in bench.json when they were measured on the
same machine with the same settings (``SETTINGS``) and the system is still finished and
unchanged (``model_stamp``, a hash of its metrics.json, which every training rewrites);
otherwise the file holds only this call's systems.
``time_64k_s``/``cost_64k`` extrapolate the headline numbers to 64,000 complaints at
``price_per_hour``. The headline is the variant ``predict`` runs by default (merged, bf16
where native else fp32) at ``HEADLINE_BATCH`` (or the largest size timed), and ``serve`` for a
system alone on its base; LoRA systems that share a base are served unmerged (one base copy,
adapters switched per request), which the ``unmerged-*`` rows time. ``variants`` lists every
(variant, batch size), largest batch first within a variant.

bench.json also holds, beyond what the report reads: ``texts`` and ``repeats`` (top level),
``params`` and ``skipped`` ([{variant, reason}]) per system.
"""

from __future__ import annotations

import gc
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.markup import escape

from tailtune.errors import TailtuneError

DEFAULT_BATCH_SIZES = (1, 8, 32)
HEADLINE_BATCH = 32
JOB_SIZE = 64_000  # complaints in the cost estimate
# USD per hour of a small CPU machine: roughly an on-demand 2-vCPU x86 cloud VM. An assumption,
# not a quote; pass your own price.
DEFAULT_PRICE_PER_HOUR = 0.10
WARMUP_BATCHES = 3


# ----------------------------------------------------------------------------- measuring


def machine() -> dict:
    """CPU model, torch threads, GPU name (or None) and torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__}


def length_batches(texts: list[str], batch_size: int) -> list[list[str]]:
    """``texts`` sorted longest first (characters) and cut into batches, as predict batches a chunk."""
    ordered = sorted(texts, key=len, reverse=True)
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def time_batches(predict: Callable, texts: list[str], batch_size: int, repeats: int) -> dict:
    """Time ``predict(batch)`` over length-sorted batches of ``texts``, after a warm-up.

    Returns ms_per_example (median over repeats of pass time / texts), examples_per_s, and
    p50_ms / p95_ms of the per-batch latency in milliseconds.
    """
    batches = length_batches(texts, batch_size)
    for batch in batches[:WARMUP_BATCHES]:
        predict(batch)
    per_batch, per_example = [], []
    for _ in range(max(repeats, 1)):
        total = 0.0
        for batch in batches:
            started = time.perf_counter()
            predict(batch)
            elapsed = time.perf_counter() - started
            per_batch.append(elapsed * 1000)
            total += elapsed
        per_example.append(total * 1000 / len(texts))
    ms = float(np.median(per_example))
    return {
        "ms_per_example": ms,
        "p50_ms": float(np.percentile(per_batch, 50)),
        "p95_ms": float(np.percentile(per_batch, 95)),
        "examples_per_s": 1000.0 / ms if ms > 0 else float("inf"),
    }


def compare(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, np.ndarray]:
    """Seconds per call of each contender, side by side: all warm up, then the calls interleave.

    Interleaving spreads drift in machine load (other processes, clock changes) over every
    contender instead of charging it to whichever ran last.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    return {name: np.asarray(values) for name, values in seconds.items()}


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.mb``: peak growth in MiB during the block.

    CPU: resident set size sampled by a background thread (psutil). CUDA: peak allocated.
    """

    def __init__(self, device, interval_s: float = 0.002):
        self.device, self.interval_s, self.mb = device, interval_s, 0.0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
            peak = max(self.peak, self.process.memory_info().rss)
        self.mb = max(peak - self.base, 0) / 2**20


def _fresh_process_memory(system_dir: Path, device: str, texts: list[str]) -> float | None:
    """MiB a system's headline variant takes to load and classify ``texts`` once, in a fresh
    process (:func:`_memory_child`); None, with the reason on stderr, when that process dies."""
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_memory_child, str(system_dir), device, texts).result()
    except BrokenProcessPool as exc:  # killed (out of memory): the timing still runs in this process
        print(f"warning: memory of {Path(system_dir).name} not measured: {exc}", file=sys.stderr)
        return None


def _memory_child(system_dir: str, device: str, texts: list[str]) -> float:
    """In a fresh process: import the libraries every system loads, then measure one load + pass."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # as the CLI does: chatter for library developers
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import peft  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from tailtune import deploy  # noqa: F401

    device = torch.device(device)
    variants, headline, _ = _variants(Path(system_dir), device, system_method(Path(system_dir)))
    build = next(b for v, b, _ in variants if v == headline)
    with PeakMemory(device) as mem:
        build().predict_proba(texts)
    return mem.mb


# ----------------------------------------------------------------------------- variants


def bf16_support(device) -> str | None:
    """None when bf16 is native on ``device``, else why it is skipped."""

    from tailtune.train import cpu_has_fast_bf16, gpu_has_bf16

    if device.type == "cuda":
        return None if gpu_has_bf16() else "this GPU has no native bf16 (e.g. a T4)"
    if cpu_has_fast_bf16():
        return None
    return "this CPU has no native bf16 (AVX512-BF16/AMX); emulated bf16 runs slower than fp32"


def system_method(system_dir: Path):
    """The :class:`~tailtune.methods.Method` a fine-tuned system was trained with (None for others)."""
    from tailtune import deploy, methods

    kind, folder = deploy.resolve_system(system_dir)
    return methods.get(deploy.load_meta(folder)["method"]) if kind == "finetune" else None


def _variants(system_dir: Path, device, method) -> tuple[list[tuple[str, Callable | None, str | None]], str, str]:
    """([(variant, build() -> predictor, skip reason)], headline variant, reference variant).

    ``method``: the system's :class:`~tailtune.methods.Method` (:func:`system_method`), or None.
    """
    import copy

    from tailtune import deploy

    kind, folder = deploy.resolve_system(system_dir)
    if kind == "tfidf":
        return [("sklearn", lambda: deploy.load_predictor(folder), None)], "sklearn", "sklearn"
    # Adapters, prompts and prefixes cannot fold into the weights: they are timed as they run.
    prefix = "" if method is None else "merged-" if method.mergeable else "unmerged-"
    loaded: dict = {}

    def fp32():
        # One merged fp32 load serves the fp32, bf16 and int8 variants.
        if "fp32" not in loaded:
            loaded["fp32"] = deploy.load_predictor(folder, precision="fp32", device=str(device))
        return loaded["fp32"]

    def bf16():
        predictor = copy.copy(fp32())
        predictor.precision = "bf16"
        return predictor

    no_bf16 = bf16_support(device)
    no_int8 = None if device.type == "cpu" else "dynamic int8 quantisation runs on CPU only"
    variants = [
        (f"{prefix}fp32", fp32, None),
        (f"{prefix}bf16", bf16, no_bf16),
        (f"{prefix}int8", lambda: deploy.quantize_int8(fp32()), no_int8),
    ]
    if method is not None and method.mergeable and not method.in_place:

        def unmerged():
            if "unmerged" not in loaded:
                loaded["unmerged"] = deploy.load_predictor(folder, merged=False, precision="fp32", device=str(device))
            return loaded["unmerged"]

        def unmerged_bf16():  # what serve runs for LoRA systems sharing a base, where bf16 is native
            predictor = copy.copy(unmerged())
            predictor.precision = "bf16"
            return predictor

        variants[:0] = [("unmerged-fp32", unmerged, None), ("unmerged-bf16", unmerged_bf16, no_bf16)]
    headline = f"{prefix}{'fp32' if no_bf16 else 'bf16'}"
    # Headline first: its rows lead the system's variants in bench.json.
    variants.sort(key=lambda v: v[0] != headline)
    return variants, headline, f"{prefix}fp32"


# ----------------------------------------------------------------------------- the run


def sample_texts(
    run_dir: Path, max_texts: int, split: str | None = "test", seed: int = 0
) -> tuple[list[str], list[str]]:
    """(texts, labels) of a split of the run's data (None: all splits), a seeded sample of at most ``max_texts``."""
    from tailtune.config import load_config
    from tailtune.data import prepare
    from tailtune.run import run_data

    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    prepared = prepare(cfg.data)
    made_on = run_data(run_dir).get("fingerprint")
    if made_on is not None and made_on != prepared.summary["fingerprint"]:  # other texts, other accuracy
        raise TailtuneError(
            f"{prepared.summary['source']} has changed since the run {run_dir} was made on it (rows, texts, "
            "labels or split); restore the data the run was made with, so that its test texts are timed"
        )
    frame = prepared.frame if split is None else prepared.split(split)
    if len(frame) > max_texts:
        frame = frame.sample(n=max_texts, random_state=seed)
    return frame["text"].tolist(), frame["label"].tolist()


def bench(
    run_dir: str | Path,
    *,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    repeats: int = 3,
    max_texts: int = 256,
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
    systems: list[str] | None = None,
    device: str = "auto",
    console=None,
) -> dict:
    """Benchmark every finished system of ``run_dir``; write ``<run>/bench.json`` and return it."""
    import torch

    from tailtune import rundir
    from tailtune.deploy import finished_systems, pick_device

    run_dir = Path(run_dir)
    if not batch_sizes or min(batch_sizes) < 1 or repeats < 1 or max_texts < 1:
        raise TailtuneError("batch sizes, --repeats and --max-texts must be at least 1")
    if not 0 <= price_per_hour < float("inf"):
        raise TailtuneError(f"--price-per-hour must be a finite number, 0 or more, got {price_per_hour:g}")
    finished = finished_systems(run_dir)
    names = finished_systems(run_dir, systems) if systems else finished
    texts, labels = sample_texts(run_dir, max_texts)
    gold = np.asarray(labels, dtype=object)
    device = pick_device(device)
    headline_batch = HEADLINE_BATCH if HEADLINE_BATCH in batch_sizes else max(batch_sizes)
    result = {
        "machine": machine(),
        "price_per_hour": float(price_per_hour),
        "batch_size": headline_batch,
        "systems": {},
        "ratios": {"decoder_vs_encoder": None, "unmerged_vs_merged": {}},
        "texts": len(texts),
        "repeats": repeats,
    }
    for name in names:
        if console is not None:
            console.print(name, style="bold", markup=False)
        method = system_method(run_dir / "systems" / name)
        variants, headline, reference = _variants(run_dir / "systems" / name, device, method)
        rows, skipped, accuracy = [], [], {}
        memory_mb, params = None, 0
        for variant, build, reason in variants:
            if reason is not None:
                skipped.append({"variant": variant, "reason": reason})
                continue
            if variant == headline:
                memory_mb = _fresh_process_memory(run_dir / "systems" / name, str(device), texts)
            predictor = build()
            proba = predictor.predict_proba(texts)
            if variant == headline:
                params = predictor.params
            accuracy[variant] = float(np.mean(np.asarray(predictor.classes_, dtype=object)[proba.argmax(1)] == gold))
            # Largest batch first: the headline batch then comes first among a variant's rows.
            for b in sorted(set(batch_sizes), reverse=True):
                predictor.batch_size = b
                timing = time_batches(predictor.predict_proba, texts, b, repeats)
                rows.append({"variant": variant, "batch_size": b, **timing})
                if console is not None:
                    console.print(f"  {variant:14s} batch {b:3d}: {timing['ms_per_example']:8.3f} ms/example")
            del predictor
        for row in rows:
            row["accuracy"] = accuracy[row["variant"]]
            row["accuracy_change"] = accuracy[row["variant"]] - accuracy[reference] if reference in accuracy else None
        top = next(r for r in rows if r["variant"] == headline and r["batch_size"] == headline_batch)
        seconds = JOB_SIZE * top["ms_per_example"] / 1000
        result["systems"][name] = {
            "ms_per_example": top["ms_per_example"],
            "examples_per_s": top["examples_per_s"],
            "peak_mem_mb": memory_mb,
            "time_64k_s": seconds,
            "cost_64k": seconds / 3600 * price_per_hour,
            "variant": headline,
            "variants": rows,
            "params": int(params),
            "skipped": skipped,
            "method": None if method is None else method.name,
            "mergeable": None if method is None else method.mergeable,
            "model_stamp": model_stamp(run_dir / "systems" / name),
        }
        by = {(r["variant"], r["batch_size"]): r["ms_per_example"] for r in rows}
        if ("unmerged-fp32", headline_batch) in by:
            result["ratios"]["unmerged_vs_merged"][name] = (
                by[("unmerged-fp32", headline_batch)] / by[("merged-fp32", headline_batch)]
            )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    kept, dropped = _keep_earlier(run_dir / "bench.json", result, run_dir, finished)
    if console is not None:
        if kept:
            console.print(f"kept from bench.json (same machine and settings): {', '.join(kept)}", markup=False)
        if dropped:
            console.print(
                "dropped from bench.json: " + "; ".join(f"{n} ({why})" for n, why in dropped.items()), markup=False
            )
    result["ratios"]["decoder_vs_encoder"] = decoder_vs_encoder(result["systems"])
    rundir.write_json(run_dir / "bench.json", result)
    return result


SETTINGS = ("machine", "price_per_hour", "batch_size", "texts", "repeats")


def model_stamp(system_dir: Path) -> str | None:
    """A hash of the system's metrics.json, which every training of it rewrites (None without one)."""
    import hashlib

    try:
        return hashlib.sha256((Path(system_dir) / "metrics.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def unchanged(system_dir: Path, entry: dict) -> bool | None:
    """Whether a bench.json ``entry`` timed the system as it is now; None for an entry written
    before ``model_stamp`` existed."""
    stamp = entry.get("model_stamp") if isinstance(entry, dict) else None
    return None if stamp is None else stamp == model_stamp(system_dir)


def _keep_earlier(path: Path, result: dict, run_dir: Path, finished: list[str]) -> tuple[list[str], dict[str, str]]:
    """Add to ``result`` the systems an earlier bench.json measured and this call did not
    (``bench --systems X`` replaced the whole file before); only when the machine and settings
    match, so every number in the file is comparable, and only systems still finished and
    unchanged since (a system that failed or was trained again kept its old numbers before).
    Returns the names kept, and {name: why} for those left out."""
    from tailtune import rundir

    try:
        earlier = rundir.read_json(path)
    except (OSError, ValueError):
        return [], {}
    others = [n for n in earlier.get("systems", {}) if n not in result["systems"]]
    changed = [key for key in SETTINGS if earlier.get(key) != result[key]]
    if changed:
        why = "timed with other settings: " + ", ".join(
            "another machine" if key == "machine" else f"{key} {earlier.get(key)} then, {result[key]} now"
            for key in changed
        )
        return [], dict.fromkeys(others, why)
    kept, dropped = [], {}
    for name in others:
        if name not in finished:
            dropped[name] = "no longer finished"
        elif (same := unchanged(run_dir / "systems" / name, earlier["systems"][name])) is None:
            dropped[name] = "its entry does not say which training it timed"
        elif not same:
            dropped[name] = "trained again since it was timed"
        else:
            kept.append(name)
    for name in kept:
        result["systems"][name] = earlier["systems"][name]
        if name in earlier["ratios"].get("unmerged_vs_merged", {}):
            result["ratios"]["unmerged_vs_merged"][name] = earlier["ratios"]["unmerged_vs_merged"][name]
    return kept, dropped


def decoder_vs_encoder(systems: dict) -> float | None:
    """Median of decoder/encoder headline ms per example over systems that differ only in slot."""
    ratios = [
        entry["ms_per_example"] / systems["encoder-" + name.removeprefix("decoder-")]["ms_per_example"]
        for name, entry in systems.items()
        if name.startswith("decoder-") and "encoder-" + name.removeprefix("decoder-") in systems
    ]
    return float(np.median(ratios)) if ratios else None


def _table(title: str, columns: tuple[str, ...]):
    """A rich table whose text columns (system, variant) are left-aligned, numbers right."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("system", "variant") else "right", no_wrap=True)
    return table


def print_bench(result: dict, console) -> None:
    """Every variant and batch size, then the headline per system."""

    table = _table(
        f"latency on {result['texts']} test texts (p50/p95: ms per batch)",
        ("system", "variant", "batch", "ms/example", "p50 ms", "p95 ms", "examples/s", "accuracy", "change"),
    )
    for name, entry in result["systems"].items():
        for r in entry["variants"]:
            change = "" if r["accuracy_change"] is None else f"{r['accuracy_change']:+.3f}"
            table.add_row(
                escape(name),
                escape(r["variant"]),
                str(r["batch_size"]),
                f"{r['ms_per_example']:.3f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p95_ms']:.2f}",
                f"{r['examples_per_s']:,.0f}",
                f"{r['accuracy']:.3f}",
                change,
            )
    console.print(table)
    summary = _table(
        f"deployment headline (batch {result['batch_size']}, {result['price_per_hour']:.2f} USD/hour)",
        ("system", "variant", "ms/example", "examples/s", "peak MiB", "params", "64k time", "64k cost"),
    )
    for name, e in result["systems"].items():
        summary.add_row(
            escape(name),
            escape(e["variant"]),
            f"{e['ms_per_example']:.3f}",
            f"{e['examples_per_s']:,.0f}",
            "-" if e.get("peak_mem_mb") is None else f"{e['peak_mem_mb']:.0f}",
            f"{e['params']:,}",
            f"{e['time_64k_s']:.1f} s",
            f"${e['cost_64k']:.5f}",
        )
    console.print(summary)
    ratios = result["ratios"]
    if ratios["decoder_vs_encoder"] is not None:
        console.print(f"decoder / encoder latency: {ratios['decoder_vs_encoder']:.2f}x")
    for name, ratio in ratios["unmerged_vs_merged"].items():
        console.print(f"{name}: unmerged / merged latency {ratio:.2f}x", markup=False)
    for name, e in result["systems"].items():
        for s in e["skipped"]:
            console.print(f"{name} {s['variant']} skipped: {s['reason']}", style="dim", markup=False)
    m = result["machine"]
    console.print(
        f"machine: {m['cpu']}, {m['threads']} threads, GPU {m['gpu'] or 'none'}, torch {m['torch']}",
        style="dim",
        markup=False,
    )
