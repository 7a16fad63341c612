"""What a LoRA adapter costs at inference: merged vs the bare base model, and unmerged vs merged.

Three contenders per LoRA system, each the system's ``PooledClassifier`` with the same head:

- ``base``: the backbone with the adapter removed (peft ``unload``): the latency floor;
- ``merged``: the adapter folded into the weights, as ``tailtune predict / serve / export`` run it;
- ``unmerged``: the adapter applied at run time by peft, as during training.

Same texts (sampled from the run's data at their real lengths), batch size, precision and
length-sorted batching; every contender warms up, then passes interleave. Targets: merged
within 3% of base; unmerged slower than merged. Prints median and p95 ms per example.

Usage::

    python benchmarks/merged_vs_base.py RUN_DIR [--system encoder-lora] [--texts 512]
        [--batch-size 32] [--repeats 7]
    python benchmarks/merged_vs_base.py RUN_DIR/systems/decoder-lora

With a run directory and no ``--system``, every finished LoRA system is measured.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
from _common import at_least_one, entry, locate, report, texts_for


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="run directory or LoRA system folder")
    parser.add_argument("--system", help="one system of the run (default: every LoRA system)")
    parser.add_argument("--texts", type=at_least_one, default=512)
    parser.add_argument("--batch-size", type=at_least_one, default=32)
    parser.add_argument("--repeats", type=at_least_one, default=7)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from tailtune import deploy
    from tailtune.bench import compare

    folders, run_dir = locate(args.path, args.system, lambda m: m.get("method") == "lora", "LoRA system")
    texts = texts_for(run_dir, args.texts)
    for system_dir in folders:
        unmerged = deploy.load_predictor(system_dir, merged=False, batch_size=args.batch_size)
        merged = deploy.load_predictor(system_dir, batch_size=args.batch_size)
        base = deploy.load_predictor(system_dir, merged=False, batch_size=args.batch_size)
        base.model.backbone = base.model.backbone.unload()
        print(
            f"\n{system_dir}: {len(texts)} texts, batch {args.batch_size}, precision {merged.precision}, "
            f"{torch.get_num_threads()} threads"
        )
        contenders = {
            name: (lambda p=p: p.predict_proba(texts))
            for name, p in (("base", base), ("merged", merged), ("unmerged", unmerged))
        }
        seconds = compare(contenders, args.repeats)
        report(seconds, len(texts), "merged")
        merged_vs_base = np.median(seconds["merged"]) / np.median(seconds["base"])
        unmerged_vs_merged = np.median(seconds["unmerged"]) / np.median(seconds["merged"])
        print(f"merged / base {merged_vs_base:.3f}x (target <= 1.03); unmerged / merged {unmerged_vs_merged:.3f}x")


if __name__ == "__main__":
    entry(main)
