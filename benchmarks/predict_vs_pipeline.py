"""tailtune's predictor vs a plain ``transformers.pipeline("text-classification")``.

Both sides run the same stock ``...ForSequenceClassification`` holding a system's merged
weights (saved to a folder and loaded back, as ``tailtune export`` does), on the same texts
(sampled from the run's data, at their real lengths), at the same batch size. What differs is
how texts reach the model: tailtune sorts them by length so batches carry little padding,
and autocasts to bf16 where the device computes it natively; the pipeline pads each batch in
arrival order. Target: tailtune >= 2x faster on CPU.

Usage::

    python benchmarks/predict_vs_pipeline.py RUN_DIR [--system decoder-lora] [--texts 512]
        [--batch-size 32] [--repeats 5] [--max-length 256]
    python benchmarks/predict_vs_pipeline.py RUN_DIR/systems/decoder-lora
    python benchmarks/predict_vs_pipeline.py EXPORTED_FOLDER      # written by tailtune export

``--max-length`` times both sides at another context than the system was trained with (both
truncate there): a system trained at a short context (the demo decoder's 32 tokens) cuts
nearly every text to the same length, which leaves length sorting nothing to remove; real
complaints served at a few hundred tokens vary in length. Predictions at another length are
not the system's own, so the agreement line still compares the two sides with each other.

A decoder system that pools its last token (``decoder.pooling=last``, the ``cfpb-paper``
preset's) has a stock class that pools like tailtune (see ``tailtune.deploy``), so both sides run
the same exported model and their predictions are compared. The stock class has no head bias,
and neither have tailtune's decoder heads; a head saved with one (runs from before that change)
runs without it on both sides (timing is unaffected, and ``tailtune export`` would refuse such a
system) and the script says so.

Encoder systems (``--system encoder-lora``) and mean-pooled decoders (the ``demo`` and
``cpu-real`` presets') have no such class: a mean-pooled MiniLM is not what
``BertForSequenceClassification`` computes (it reads the [CLS] token through its pooler), nor is
a mean-pooled SmolLM2 what ``LlamaForSequenceClassification`` computes (it reads the last token).
There tailtune's side is ``tailtune predict``'s own predictor on the system (merged), and the
pipeline's side the stock class holding the same merged backbone weights with a head of the
same shape: the same transformer work, pooled differently, so this times both and compares no
predictions. Prints median and p95 ms per example over passes and the pipeline/tailtune ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
from _common import at_least_one, entry, locate, report, texts_for


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="run directory, system folder or exported folder")
    parser.add_argument("--system", help="system of the run (default: its first fine-tuned decoder system)")
    parser.add_argument("--texts", type=at_least_one, default=512)
    parser.add_argument("--batch-size", type=at_least_one, default=32)
    parser.add_argument("--repeats", type=at_least_one, default=5)
    parser.add_argument("--max-length", type=int, help="truncate both sides here (default: the system's own)")
    args = parser.parse_args(argv)
    if args.max_length is not None and args.max_length < 1:
        parser.error("--max-length must be at least 1")
    warnings.filterwarnings("ignore")

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from tailtune import deploy
    from tailtune.backbones import quiet_transformers
    from tailtune.classifier import TextClassifier

    quiet_transformers()
    in_run = (Path(args.path) / "comparison.csv").exists()  # a run: its decoder unless --system says
    folders, run_dir = locate(
        args.path,
        args.system,
        lambda m: (
            m["kind"] == "export"
            or (m["kind"] == "finetune" and (args.system or not in_run or m["backbone"]["kind"] == "decoder"))
        ),
        "fine-tuned system or export",
    )
    system_dir = folders[0]
    kind, folder = deploy.resolve_system(system_dir)
    if kind != "export":
        meta = deploy.load_meta(folder)
        if meta["backbone"]["kind"] != "decoder" or meta["pooling"] != "last":
            return _timing_only(args, system_dir, run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if kind != "export":
            clf = TextClassifier.load(folder)
            model, bias = deploy.hf_classifier(clf)
            if np.abs(bias).max() > deploy.MERGE_TOLERANCE:
                print(
                    f"note: {system_dir.name}'s head bias (max |b| {np.abs(bias).max():.3g}) does not fit the "
                    "stock class; both sides run without it (timing only)"
                )
            deploy.save_hf(model, clf, Path(tmp))
            folder = Path(tmp)
        hf = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if args.max_length:
        tokenizer.model_max_length = args.max_length

    device = deploy.pick_device("auto")
    hf.to(device)
    classes = [hf.config.id2label[i] for i in range(hf.config.num_labels)]
    ours = deploy.TorchPredictor(
        hf,
        tokenizer,
        classes,
        kind="export",
        max_length=tokenizer.model_max_length,
        batch_size=args.batch_size,
        precision=deploy.pick_precision("auto", device),
    )
    pipe = pipeline("text-classification", model=hf, tokenizer=tokenizer, device=device)
    texts = texts_for(run_dir, args.texts)

    def run_pipeline():
        return pipe(texts, batch_size=args.batch_size, truncation=True)

    def run_tailtune():
        return ours.predict_proba(texts)

    agree = np.mean(np.asarray(ours.predict(texts)) == np.asarray([r["label"] for r in run_pipeline()]))
    print(
        f"{system_dir}: {type(hf).__name__}, {len(texts)} texts, batch {args.batch_size}, "
        f"{device.type}, tailtune precision {ours.precision}, {torch.get_num_threads()} threads, "
        f"truncated at {tokenizer.model_max_length} tokens"
    )
    lengths = np.asarray([len(x) for x in tokenizer(texts, truncation=False)["input_ids"]])
    print(
        f"same predictions on {agree:.1%} of texts; {np.mean(lengths >= tokenizer.model_max_length):.0%} "
        f"of texts are cut at {tokenizer.model_max_length} tokens (median length {np.median(lengths):.0f})"
    )
    _time(run_pipeline, run_tailtune, len(texts), args.repeats)


def _time(run_pipeline, run_tailtune, n_texts: int, repeats: int) -> None:
    from tailtune.bench import compare

    seconds = compare({"pipeline": run_pipeline, "tailtune": run_tailtune}, repeats)
    report(seconds, n_texts, "tailtune")
    ratio = np.median(seconds["pipeline"]) / np.median(seconds["tailtune"])
    print(f"tailtune is {ratio:.2f}x faster than the pipeline (median pass; target >= 2x on CPU)")


def _timing_only(args, system_dir: Path, run_dir: Path | None) -> None:
    """A system no stock class equals: ``tailtune predict``'s predictor vs the stock class on the same merged weights."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification, pipeline

    from tailtune import deploy

    ours = deploy.load_predictor(system_dir, merged=True, batch_size=args.batch_size)
    if args.max_length:
        ours.max_length = args.max_length
    backbone = ours.model.backbone
    config = copy.deepcopy(backbone.config)
    config.num_labels = len(ours.classes_)
    tokenizer = ours.tokenizer
    config.pad_token_id = tokenizer.pad_token_id  # a stock decoder classifier finds the last token by it
    stock = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    missing, unexpected = getattr(stock, stock.base_model_prefix).load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or any("pooler" not in k for k in missing):  # a pooler the checkpoint lacks stays random
        raise SystemExit(f"the stock class does not hold this backbone's weights: {missing or unexpected}")
    tokenizer.model_max_length = ours.max_length
    device = next(backbone.parameters()).device  # where load_predictor put ours (CUDA when there is one)
    pipe = pipeline("text-classification", model=stock.to(device).eval(), tokenizer=tokenizer, device=device)
    texts = texts_for(run_dir, args.texts)
    lengths = np.asarray([len(x) for x in tokenizer(texts, truncation=False)["input_ids"]])
    print(
        f"{system_dir}: tailtune predictor ({ours.precision}, {type(backbone).__name__} merged, "
        f"{ours.model.pooling} pooling) vs pipeline on {type(stock).__name__} with the same weights (timing only: it pools "
        f"{'its last token' if ours.model.is_decoder else '[CLS]'}); {len(texts)} texts, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"truncated at {ours.max_length} tokens; {np.mean(lengths >= ours.max_length):.0%} of texts are "
        f"cut there (median length {np.median(lengths):.0f})"
    )
    _time(
        lambda: pipe(texts, batch_size=args.batch_size, truncation=True),
        lambda: ours.predict_proba(texts),
        len(texts),
        args.repeats,
    )


if __name__ == "__main__":
    entry(main)
