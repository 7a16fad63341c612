"""decoder-generate's training step: logits for the label tokens only vs logits everywhere.

The model writes the label after the prompt, and only the label's tokens are scored; a plain
causal-LM batch still computes (B, T, vocab) logits and their softmax for every prompt token.
tailtune's batch (:func:`tailtune.generate.collate_label_batch`) keeps the logits of the last
``longest label + 1`` positions. Both contenders train the same LoRA model on the same rows
(prompts of demo complaints, labels of the demo classes) at the same batch size and precision;
steps interleave after a warm-up, who goes first alternating. Prints median ms per step (forward, backward, AdamW step),
the ratio, and the size of the logits tensor each builds. The loss is the same (tested in
``tests/test_generate.py``).

Usage::

    python benchmarks/generate_step.py [--backbone bundled:smollm2] [--max-length 64]
        [--batch-size 16] [--adapt-layers 4] [--steps 6]

The defaults are the ``cpu-real`` preset's decoder settings.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from _common import at_least_one, entry, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="bundled:smollm2")
    parser.add_argument("--max-length", type=at_least_one, default=64)
    parser.add_argument("--batch-size", type=at_least_one, default=16)
    parser.add_argument("--adapt-layers", type=int, default=4, help="LoRA on the last N layers (0: all)")
    parser.add_argument("--steps", type=at_least_one, default=6, help="timed steps per contender")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from tailtune import backbones, generate, methods
    from tailtune.classifier import autocast
    from tailtune.config import MethodConfig
    from tailtune.demo import make_demo_corpus
    from tailtune.train import resolve_precision

    backbones.quiet_transformers()
    backbone = backbones.resolve(args.backbone)
    generate.require_decoder(backbone)
    tokenizer = backbones.load_tokenizer(backbone)
    torch.manual_seed(0)
    model, _ = methods.get("lora").apply(
        generate.load_causal_lm(backbone, tokenizer),
        backbone,
        MethodConfig(rank=16, alpha=32, dropout=0.0),
        args.adapt_layers or None,
    )
    model.train()
    precision = resolve_precision("auto")
    corpus = make_demo_corpus(seed=0)
    classes = sorted(corpus["Issue"].unique())
    label_ids = generate.encode_labels(tokenizer, classes)
    index = {c: i for i, c in enumerate(classes)}
    rows_all = []
    texts = corpus["Consumer complaint narrative"].tolist()
    prompts = generate.encode_prompts(tokenizer, texts, generate.TEMPLATE, args.max_length)
    for prompt, label in zip(prompts, corpus["Issue"], strict=True):
        target = label_ids[index[label]]
        rows_all.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model.config.get_text_config().vocab_size
    rng = np.random.default_rng(0)

    def step(label_logits_only: bool, batch_rows) -> tuple[float, tuple]:
        batch = generate.collate_label_batch(batch_rows, tokenizer.pad_token_id, label_logits_only)
        started = time.perf_counter()
        with autocast(precision, torch.device("cpu")):
            out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started, tuple(out.logits.shape)

    contenders = {"label logits": True, "all logits": False}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    shapes = {}
    for i in range(args.steps + 1):  # the first round warms up
        batch_rows = [rows_all[j] for j in rng.choice(len(rows_all), args.batch_size, replace=False)]
        order = list(contenders.items())
        for name, only in order if i % 2 else order[::-1]:  # who goes first alternates
            took, shapes[name] = step(only, batch_rows)
            if i:
                seconds[name].append(took)
    print(
        f"{args.backbone}: vocabulary {vocab:,}, batch {args.batch_size}, max_length {args.max_length}, "
        f"LoRA on {'all' if not args.adapt_layers else f'the last {args.adapt_layers}'} layers, "
        f"precision {precision}, {torch.get_num_threads()} threads, {args.steps} steps each"
    )
    for name, shape in shapes.items():
        print(f"  {name}: logits {shape}, {np.prod(shape) * 4 / 2**20:,.0f} MiB in fp32")
    report({n: np.array(s) for n, s in seconds.items()}, 1, "label logits", unit="ms/step")


if __name__ == "__main__":
    entry(main)
