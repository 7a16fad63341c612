"""Fine-tune a :class:`~tailtune.classifier.PooledClassifier` with the transformers Trainer.

What tailtune adds on top of a plain Trainer loop: length-grouped batches with dynamic padding,
separate learning rates for the head and the backbone, precision chosen from what the device
really does fast (measured, not assumed), model selection and early stopping on validation
macro-F1 (loss is a poor guide on a long tail), and a rich progress bar with ETA.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from tailtune.config import BackboneConfig, TrainConfig
from tailtune.errors import TailtuneError


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX tiles).

    Without them bf16 is emulated and runs many times *slower* than fp32: on this project's
    AVX2 development machine a bf16-autocast MiniLM forward ran at 10 ex/s against 61 in fp32.
    """
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return bool(torch.cpu._is_avx512_bf16_supported() or amx())


def resolve_precision(requested: str) -> str:
    """'fp32' | 'bf16' | 'fp16' for ``requested`` on this machine; refuse what the device can't do."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and not cuda:
        raise TailtuneError("precision fp16 needs a CUDA GPU; use fp32 or bf16 (or auto) on CPU")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TailtuneError(
            "this GPU does not support bf16 (e.g. a T4); use train.precision=fp16 or auto"
        )
    return requested


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from tailtune.metrics import per_class_f1

    n = int(max(y_true.max(), y_pred.max())) + 1
    return float(np.nanmean(per_class_f1(y_true, y_pred, n)))


def fit(
    model,
    tokenizer,
    train_ids: list[list[int]],
    y: np.ndarray,
    val_ids: list[list[int]],
    val_y: np.ndarray,
    *,
    train: TrainConfig,
    backbone: BackboneConfig,
    work_dir: str | Path | None = None,
    console=None,
    start_val_f1: float | None = None,
    class_sampling: np.ndarray | None = None,
) -> dict:
    """Train ``model`` in place and leave the best validation state loaded. Returns the history.

    ``start_val_f1`` is the validation macro-F1 of the starting point when it is already known
    (LP-FT: the probe's), so the start competes for "best" without another validation pass.
    ``class_sampling`` (C,) draws training rows with replacement, each with its class's weight
    (class-balanced sampling); batches are then not length-grouped.

    History keys: precision, steps, epochs_run, best_val_macro_f1, best_step, evals
    [{step, epoch, val_macro_f1, val_accuracy}], losses [{step, loss}], stopped_early.
    """
    import torch
    from transformers import (
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    precision = resolve_precision(train.precision)
    cuda = torch.cuda.is_available()
    train_set = [{"input_ids": ids, "labels": int(label)} for ids, label in zip(train_ids, y, strict=True)]
    val_set = [{"input_ids": ids, "labels": int(label)} for ids, label in zip(val_ids, val_y, strict=True)]

    per_step = backbone.batch_size * train.grad_accum
    steps_per_epoch = max(1, math.ceil(len(train_set) / per_step))
    epochs = backbone.epochs if backbone.epochs is not None else train.epochs
    total_steps = max(1, math.ceil(steps_per_epoch * epochs))
    eval_steps = max(1, steps_per_epoch // train.eval_per_epoch)

    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("score.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("score.")]
    lr = backbone.lr if backbone.lr is not None else train.lr
    groups = [{"params": head, "lr": train.head_lr}]
    if body:
        groups.append({"params": body, "lr": lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=train.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(train.warmup_ratio * total_steps), total_steps
    )

    history: dict = {"precision": precision, "steps": total_steps, "evals": [], "losses": []}
    best = {"f1": -1.0, "state": None, "step": 0, "bad": 0}

    def snapshot() -> dict:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    if start_val_f1 is not None:
        best.update(f1=start_val_f1, state=snapshot())
        history["evals"].append({"step": 0, "epoch": 0.0, "val_macro_f1": start_val_f1, "val_accuracy": None})

    def compute_metrics(pred) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        y_pred = np.asarray(logits).argmax(axis=1)
        # Labels must come with the predictions: with group_by_length the Trainer also
        # reorders the evaluation set (transformers 5.x), so the dataset's order is wrong here.
        y_true = np.asarray(pred.label_ids)
        return {"macro_f1": _macro_f1(y_true, y_pred), "accuracy": float((y_pred == y_true).mean())}

    class Select(TrainerCallback):
        """Keep the best trainable state on val macro-F1; stop after ``patience`` bad evals."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            f1 = metrics["eval_macro_f1"]
            history["evals"].append(
                {"step": state.global_step, "epoch": state.epoch, "val_macro_f1": f1,
                 "val_accuracy": metrics["eval_accuracy"]}
            )
            if f1 > best["f1"]:
                best.update(f1=f1, state=snapshot(), step=state.global_step, bad=0)
            else:
                best["bad"] += 1
                if best["bad"] >= train.early_stopping_patience:
                    control.should_training_stop = True
                    history["stopped_early"] = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history["losses"].append({"step": state.global_step, "loss": float(logs["loss"])})

    callbacks = [Select()]
    if console is not None:
        callbacks.append(_rich_progress(console, total_steps))

    with tempfile.TemporaryDirectory(prefix="tailtune-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=str(work_dir or tmp),
            per_device_train_batch_size=backbone.batch_size,
            per_device_eval_batch_size=backbone.eval_batch_size,
            gradient_accumulation_steps=train.grad_accum,
            num_train_epochs=epochs,
            max_steps=total_steps,
            eval_strategy="steps",
            eval_steps=eval_steps,
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=max(1, min(eval_steps, total_steps // 20 or 1)),
            report_to=[],
            use_cpu=not cuda,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            seed=train.seed,
            data_seed=train.seed,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            label_names=["labels"],
            disable_tqdm=True,
            train_sampling_strategy="group_by_length",
            max_grad_norm=1.0,
        )
        trainer = (Trainer if class_sampling is None else _sampling_trainer(y, class_sampling, train.seed))(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=val_set,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics,
            optimizers=(optimizer, scheduler),
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # rich progress replaces the raw log dicts
        trainer.train()
    if best["state"] is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in best["state"].items():
                params[name].copy_(value)
    history.update(
        best_val_macro_f1=best["f1"],
        best_step=best["step"],
        epochs_run=trainer.state.epoch,
        stopped_early=history.get("stopped_early", False),
    )
    model.eval()
    return history


def _sampling_trainer(y: np.ndarray, class_sampling: np.ndarray, seed: int):
    """A Trainer class whose training sampler draws rows with probability ~ ``class_sampling[y]``."""
    import torch
    from transformers import Trainer

    weights = torch.as_tensor(np.asarray(class_sampling, dtype=float)[y], dtype=torch.double)

    class SamplingTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            generator = torch.Generator().manual_seed(seed)
            return torch.utils.data.WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator)

    return SamplingTrainer


def _rich_progress(console, total_steps: int):
    """A TrainerCallback drawing a rich progress bar over optimisation steps, with loss and val macro-F1."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def __init__(self):
            self.progress = Progress(
                TextColumn("  training"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = None
            self.info = ""

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, info="")

        def on_step_end(self, args, state, control, **kwargs):
            self.progress.update(self.task, completed=state.global_step, info=self.info)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.info = f"loss {logs['loss']:.3f}"
            if logs and "eval_macro_f1" in logs:
                self.info += f" val-F1 {logs['eval_macro_f1']:.3f}"

        def on_train_end(self, args, state, control, **kwargs):
            self.progress.update(self.task, completed=state.global_step, info=self.info)
            self.progress.stop()

    return Callback()
