"""Fine-tune a :class:`~tailtune.classifier.PooledClassifier` with the transformers Trainer.

What tailtune adds on top of a plain Trainer loop: length-grouped batches with dynamic padding,
separate learning rates for the head and the backbone, precision chosen from what the device
really does fast (measured, not assumed), model selection and early stopping on validation
macro-F1 (loss is a poor guide on a long tail), a rich progress bar with ETA, and checkpoints
that an interrupted run resumes from with the same result as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tailtune import rundir
from tailtune.config import BackboneConfig, TrainConfig
from tailtune.errors import TailtuneError, first_line

# A checkpoint folder holds the Trainer's files (optimizer, scheduler, RNG, trainer state) and:
TRAINABLE_FILE = "trainable.safetensors"  # the trainable parameters only; the frozen backbone is rebuilt
BEST_FILE = "best.safetensors"  # the trainable state with the best validation macro-F1 so far
LOSS_WINDOW_FILE = "loss_window.json"  # the training loss summed since the last log, and that log's step
SELECTION_FILE = "selection.json"  # history and model-selection state; written last, so it marks a complete checkpoint


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX tiles).

    Without them bf16 is emulated and runs many times *slower* than fp32: on this project's
    AVX2 development machine a bf16-autocast MiniLM forward ran at 10 ex/s against 61 in fp32.
    """
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return bool(torch.cpu._is_avx512_bf16_supported() or amx())


def gpu_has_bf16() -> bool:
    """The GPU computes bf16 natively (compute capability 8.0+, or ROCm). torch's own
    ``is_bf16_supported()`` also says True where bf16 is only emulated, on a T4 or V100."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str) -> str:
    """'fp32' | 'bf16' | 'fp16' for ``requested`` on this machine; refuse what the device can't do."""
    import torch

    from tailtune.config import check_precision

    check_precision(requested)

    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if gpu_has_bf16() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and not cuda:
        raise TailtuneError("precision fp16 needs a CUDA GPU; use fp32 or bf16 (or auto) on CPU")
    if requested == "bf16" and cuda and not gpu_has_bf16():
        raise TailtuneError("this GPU does not support bf16 (e.g. a T4); use train.precision=fp16 or auto")
    return requested


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from tailtune.metrics import macro_f1

    return macro_f1(y_true, y_pred, int(max(y_true.max(), y_pred.max())) + 1)


def fit(
    model,
    tokenizer,
    train_ids: list[list[int]],
    y: np.ndarray,
    val_ids: list[list[int]] | None,
    val_y: np.ndarray | None,
    *,
    train: TrainConfig,
    backbone: BackboneConfig,
    work_dir: str | Path | None = None,
    console=None,
    start_val_f1: float | None = None,
    class_sampling: np.ndarray | None = None,
) -> dict:
    """Train ``model`` in place and leave the best validation state loaded. Returns the history.

    Without validation rows (``val_ids`` None) nothing is selected or stopped early: training
    runs its epochs and the last state is kept (``best_val_macro_f1`` and ``best_step`` None).

    ``start_val_f1`` is the validation macro-F1 of the starting point when it is already known
    (LP-FT: the probe's), so the start competes for "best" without another validation pass.
    ``class_sampling`` (C,) draws training rows with replacement, each with its class's weight
    (class-balanced sampling); batches are then not length-grouped.

    ``work_dir`` makes training resumable: a checkpoint is saved there every
    ``train.checkpoint_every`` evaluations (only the latest is kept), and a later call with the
    same arguments continues from the latest complete one. The checkpoint restores the trainable
    weights, optimizer, scheduler, RNG states, position in the data order, the best state so far
    and the history, so the result equals that of an uninterrupted call.

    History keys: precision, steps, epochs_run, best_val_macro_f1, best_step, evals
    [{step, epoch, val_macro_f1, val_accuracy}], losses [{step, loss}], stopped_early; after a
    resume also resumed_at_steps and seconds_before_resume (training time of earlier attempts, s).

    Under ``torchrun`` / ``accelerate launch`` every process calls ``fit`` with the same arguments
    and the Trainer runs DDP. ``backbone.batch_size`` is per process, so an optimisation step
    sees ``batch_size * grad_accum * processes`` rows: the sampler draws one row order for that
    global batch and accelerate deals its consecutive ``batch_size`` batches out to the
    processes in turn. N processes with ``grad_accum`` g thus train on the rows, and average
    the losses, that one process with ``grad_accum`` N*g does (batch ``N * batch_size`` would
    not: a weighted loss averages differently and padding changes). Validation outputs are
    gathered from every process, each row exactly once (checked), so every process selects and
    stops on the same macro-F1. Only the main process writes checkpoint files, except the
    Trainer's per-process RNG states (``rng_state_<rank>.pth``) that a resume needs; the
    history returned is the same in every process.
    """
    import torch
    from accelerate.utils import broadcast_object_list
    from transformers import DataCollatorWithPadding, PrinterCallback, TrainingArguments

    from tailtune.distributed import state

    dist = state()
    if not dist.is_main_process:
        console = None  # one progress bar, from the main process
    precision = resolve_precision(train.precision)
    cuda = torch.cuda.is_available()
    train_set = [{"input_ids": ids, "labels": int(label)} for ids, label in zip(train_ids, y, strict=True)]
    if val_ids is None:
        val_set, start_val_f1 = None, None
    else:
        val_set = [{"input_ids": ids, "labels": int(label)} for ids, label in zip(val_ids, val_y, strict=True)]
    plan = step_plan(len(train_set), train, backbone, dist.num_processes, work_dir)

    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("score.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("score.")]
    groups = [{"params": head, "lr": train.head_lr}]
    if body:
        groups.append({"params": body, "lr": backbone.effective_lr(train)})
    optimizer, scheduler = optimizer_and_schedule(groups, train, plan.total_steps)

    selector = Selector(model, precision, plan.total_steps, train.early_stopping_patience, val_set is not None)
    # A probe's score can differ in the last bit between GPUs; selection must not.
    start_val_f1 = broadcast_object_list([start_val_f1])[0]
    key = fit_key(model, train_ids, y, val_ids, val_y, train, backbone, class_sampling)
    run = resume(work_dir, key, selector, plan.total_steps, console)
    if run.saved is None and start_val_f1 is not None:
        selector.start(start_val_f1)

    def compute_metrics(pred) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        y_pred = np.asarray(logits).argmax(axis=1)
        # Labels must come with the predictions: with group_by_length the Trainer also
        # reorders the evaluation set (transformers 5.x), so the dataset's order is wrong here.
        y_true = np.asarray(pred.label_ids)
        if len(y_true) != len(val_set):  # accelerate drops the rows it repeated to even out processes
            raise RuntimeError(f"evaluated {len(y_true)} validation rows, expected {len(val_set)}")
        return {"macro_f1": _macro_f1(y_true, y_pred), "accuracy": float((y_pred == y_true).mean())}

    if run.finished:
        load_trainable(model, run.folder)
        epochs_run = run.saved["epoch"]
    else:
        callbacks = [selector.callback()]
        if console is not None:
            callbacks.append(rich_progress(console, plan.total_steps))
        if class_sampling is None:
            trainer_cls = _length_grouped_trainer(
                [len(ids) for ids in train_ids], plan.per_step, train.seed, run.on_checkpoint
            )
        else:
            trainer_cls = _sampling_trainer(y, class_sampling, train.seed, run.on_checkpoint)
        with tempfile.TemporaryDirectory(prefix="tailtune-trainer-") as tmp:
            args = TrainingArguments(
                output_dir=str(work_dir or tmp),
                per_device_train_batch_size=backbone.batch_size,
                per_device_eval_batch_size=backbone.eval_batch_size,
                gradient_accumulation_steps=train.grad_accum,
                num_train_epochs=plan.epochs,
                max_steps=plan.total_steps,
                eval_strategy="steps" if val_set is not None else "no",
                eval_steps=plan.eval_steps,
                save_strategy="steps" if plan.save_steps else "no",
                save_steps=max(plan.save_steps, 1),
                logging_strategy="steps",
                logging_steps=max(1, min(plan.eval_steps, plan.total_steps // 20 or 1)),
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
                # Training order comes from the trainer class's own sampler; this groups the
                # *evaluation* batches by length (less padding; labels come with predictions).
                train_sampling_strategy="group_by_length",
                max_grad_norm=1.0,
            )
            trainer = trainer_cls(
                model=model,
                args=args,
                train_dataset=train_set,
                eval_dataset=val_set,
                data_collator=DataCollatorWithPadding(tokenizer),
                compute_metrics=compute_metrics if val_set is not None else None,
                optimizers=(optimizer, scheduler),
                callbacks=callbacks,
            )
            trainer.remove_callback(PrinterCallback)  # rich progress replaces the raw log dicts
            trainer.train(resume_from_checkpoint=run.checkpoint)
        epochs_run = trainer.state.epoch
    return selector.finish(epochs_run)


# ----------------------------------------------------------------------------- shared by both fits
# train.fit and GenerativeClassifier.fit (tailtune.generate) train with the same step plan,
# optimiser, model selection and checkpoints; each keeps its own Trainer and validation.


@dataclass(frozen=True)
class StepPlan:
    """How long a fit trains, in optimisation steps, and how often it evaluates and checkpoints."""

    epochs: float
    per_step: int  # rows per optimisation step, over every training process
    steps_per_epoch: int
    total_steps: int
    eval_steps: int  # steps between two evaluations (``train.eval_per_epoch`` per epoch)
    save_steps: int  # steps between two checkpoints; 0 without a work_dir


def step_plan(
    n_rows: int, train: TrainConfig, backbone: BackboneConfig, processes: int, work_dir: str | Path | None
) -> StepPlan:
    """The :class:`StepPlan` for ``n_rows`` training rows shared out to ``processes`` processes."""
    per_step = backbone.batch_size * train.grad_accum * processes
    steps_per_epoch = max(1, math.ceil(n_rows / per_step))
    epochs = backbone.effective_epochs(train)
    total_steps = max(1, math.ceil(steps_per_epoch * epochs))
    # Rounded up: the Trainer always evaluates at the last step, so rounding down added one more
    # validation pass (evals at 86, 172 and 173 of 173 steps).
    eval_steps = max(1, math.ceil(steps_per_epoch / train.eval_per_epoch))
    save_steps = eval_steps * train.checkpoint_every if work_dir is not None else 0
    return StepPlan(epochs, per_step, steps_per_epoch, total_steps, eval_steps, save_steps)


def optimizer_and_schedule(groups: list[dict], train: TrainConfig, total_steps: int):
    """(AdamW over the parameter ``groups``, each with its own "lr"; its learning-rate schedule:
    linear warm-up over ``train.warmup_ratio`` of ``total_steps``, then linear decay to 0)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(groups, weight_decay=train.weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(train.warmup_ratio * total_steps), total_steps)


class Selector:
    """Model selection on validation macro-F1, and the history a fit returns.

    :meth:`record` notes an evaluation in ``history["evals"]``: a macro-F1 above every earlier
    one keeps a copy of the trainable parameters, any other counts as bad, and ``patience`` bad
    evaluations in a row stop training. An evaluation without validation (macro-F1 None) keeps
    its state, so the last one wins. ``history`` and ``best`` are what a checkpoint saves and a
    resume puts back (:func:`resume`).
    """

    def __init__(self, model, precision: str, total_steps: int, patience: int, validated: bool):
        self.model, self.patience, self.validated = model, patience, validated
        self.history: dict = {"precision": precision, "steps": total_steps, "evals": [], "losses": []}
        self.best: dict = {"f1": -1.0, "state": None, "step": 0, "bad": 0}

    def snapshot(self) -> dict:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def start(self, f1: float) -> None:
        """Let the starting state, of known validation macro-F1 ``f1`` (LP-FT: the probe's), compete."""
        self.best.update(f1=f1, state=self.snapshot())
        self.history["evals"].append({"step": 0, "epoch": 0.0, "val_macro_f1": f1, "val_accuracy": None})

    def record(self, step: int, epoch: float, f1: float | None, accuracy: float | None, control) -> None:
        """An evaluation at ``step``; sets the Trainer's ``control.should_training_stop`` after ``patience`` bad ones."""
        self.history["evals"].append({"step": step, "epoch": epoch, "val_macro_f1": f1, "val_accuracy": accuracy})
        if f1 is None or f1 > self.best["f1"]:
            self.best.update(f1=-1.0 if f1 is None else f1, state=self.snapshot(), step=step, bad=0)
        else:
            self.best["bad"] += 1
            if self.best["bad"] >= self.patience:
                control.should_training_stop = True
                self.history["stopped_early"] = True

    def callback(self, evaluate=None):
        """The TrainerCallback feeding this selector: every loss the Trainer logs, and its
        evaluations (``eval_macro_f1``, ``eval_accuracy``); with ``evaluate(state)``, the caller's
        own instead, after every step where it returns ``(macro_f1, accuracy)`` (None: not this step)."""
        from transformers import TrainerCallback

        selector = self

        class Select(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                selector.record(
                    state.global_step, state.epoch, metrics["eval_macro_f1"], metrics["eval_accuracy"], control
                )

            def on_step_end(self, args, state, control, **kwargs):
                scored = evaluate(state) if evaluate is not None else None
                if scored is not None:
                    selector.record(state.global_step, state.epoch, *scored, control)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    selector.history["losses"].append({"step": state.global_step, "loss": float(logs["loss"])})

        return Select()

    def finish(self, epochs_run: float) -> dict:
        """Load the kept state into the model (none kept: the last state stays), complete the
        history (``best_step``: the kept state's step, None without one) and return it; the
        model is left in eval mode."""
        import torch

        if self.best["state"] is not None:
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for name, value in self.best["state"].items():
                    params[name].copy_(value)
        self.history.update(
            best_val_macro_f1=self.best["f1"] if self.validated else None,
            best_step=self.best["step"] if self.best["state"] is not None else None,
            epochs_run=epochs_run,
            stopped_early=self.history.get("stopped_early", False),
        )
        self.model.eval()
        return self.history


@dataclass(frozen=True)
class Resume:
    """Where a fit continues from, and what completes each checkpoint it writes (:func:`resume`)."""

    folder: Path | None  # the latest complete checkpoint; None: training starts at step 0
    saved: dict | None  # that checkpoint's selection state (step, epoch, done, ...)
    on_checkpoint: Callable  # for :func:`trainer_class`
    started: float  # time.perf_counter() when this attempt started

    @property
    def finished(self) -> bool:
        """Killed after training ended: the checkpoint holds everything the fit returns."""
        return self.saved is not None and self.saved["done"]

    @property
    def checkpoint(self) -> str | None:
        """The Trainer's ``resume_from_checkpoint``."""
        return None if self.folder is None else str(self.folder)

    def seconds(self) -> float:
        """Training time so far, s: this attempt's and that of the attempts before the resume."""
        return (self.saved["seconds"] if self.saved is not None else 0.0) + time.perf_counter() - self.started


def resume(work_dir: str | Path | None, key: str, selector: Selector, total_steps: int, console=None) -> Resume:
    """Resume a fit of key ``key`` (:func:`fit_key`) from ``work_dir``'s latest complete
    checkpoint, if any: its history and best state go back into ``selector``, and the console
    says so. Every training process calls it; the main process first, which deletes the other
    checkpoints, prints and later writes checkpoints; a checkpoint records how many processes
    trained, and resuming it with another number is refused."""
    from tailtune.distributed import state

    dist = state()
    console = console if dist.is_main_process else None
    folder = None
    if work_dir is not None:
        with dist.main_process_first():  # the main process deletes incomplete checkpoints first
            folder = _resume_point(Path(work_dir), clean=dist.is_main_process, console=console)
    saved = _restore(folder, work_dir, key, dist.num_processes, selector.history, selector.best)
    if console is not None and saved is not None:
        if saved["done"]:
            console.print(f"  training had finished (step {saved['step']}); kept from {folder}", markup=False)
        else:
            console.print(f"  resuming from step {saved['step']}/{total_steps} ({folder})", markup=False)
    started = time.perf_counter()
    writer = _checkpoint_writer(key, dist.num_processes, selector.history, selector.best, started)
    return Resume(folder, saved, writer, started)


def fit_key(
    model, train_ids, y, val_ids, val_y, train: TrainConfig, backbone: BackboneConfig, class_sampling, extra=None
) -> str:
    """What a checkpoint must come from for :func:`fit` to resume it: the rows (token ids and
    labels, in order), the settings, and the trainable parameters' names and shapes (the method
    and its rank); ``extra``, any other setting the caller trains with (JSON). 16 hex digits of SHA-256."""
    import dataclasses
    import hashlib
    import json

    digest = hashlib.sha256()
    for ids, labels in ((train_ids, y), (val_ids or [], [] if val_y is None else val_y)):
        digest.update(np.asarray([len(row) for row in ids], dtype=np.int64).tobytes())
        digest.update(np.concatenate([np.asarray(row, dtype=np.int64) for row in ids] or [[]]).tobytes())
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    trainable = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    sampling = None if class_sampling is None else np.asarray(class_sampling).tolist()
    settings = [dataclasses.asdict(train), dataclasses.asdict(backbone), sampling, trainable]
    if extra is not None:  # appended only when given: the keys of checkpoints written before stay valid
        settings.append(extra)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _restore(resume: Path | None, work_dir, key: str, processes: int, history: dict, best: dict) -> dict | None:
    """The selection state of checkpoint ``resume`` (None without one), its history and best
    state put back into ``history`` and ``best``; refused when another fit or another number of
    training processes wrote it."""
    if resume is None:
        return None
    from safetensors.torch import load_file

    saved = rundir.read_json(resume / SELECTION_FILE)
    if saved.get("fit", key) != key:  # checkpoints written before the key resume
        raise TailtuneError(
            f"{work_dir} holds checkpoints of another fit (other data, settings or model); pass another "
            "work_dir, or delete it to train from the start"
        )
    if saved.get("processes", 1) != processes:
        # Steps per epoch, the data order and the per-process RNG states all depend on it.
        raise TailtuneError(
            f"{resume} was written by {saved.get('processes', 1)} training processes, this run has "
            f"{processes}; resume with as many, or delete {work_dir} to train from the start"
        )
    history.update(saved["history"])
    history.setdefault("resumed_at_steps", []).append(saved["step"])
    history["seconds_before_resume"] = saved["seconds"]
    best.update(saved["best"], state=load_file(resume / BEST_FILE) if (resume / BEST_FILE).exists() else None)
    return saved


def _checkpoint_writer(key: str, processes: int, history: dict, best: dict, started: float):
    """``on_checkpoint(folder, state, control)`` for :func:`trainer_class`: the best state and the
    selection state next to the Trainer's checkpoint; written last, the selection file marks it complete."""

    def on_checkpoint(folder: Path, state, control) -> None:
        from safetensors.torch import save_file

        if best["state"] is not None:
            save_file(best["state"], folder / BEST_FILE)
        rundir.sync_folder(folder)  # every other file is on disk before the one that marks it complete
        rundir.write_json(
            folder / SELECTION_FILE,
            {
                "step": state.global_step,
                "epoch": state.epoch,
                "done": bool(control.should_training_stop),
                "fit": key,
                "processes": processes,
                "seconds": history.get("seconds_before_resume", 0.0) + time.perf_counter() - started,
                "best": {k: best[k] for k in ("f1", "step", "bad")},
                "history": history,
            },
        )
        for entries in (folder, folder.parent):  # the selection file's rename, the folder itself
            rundir.sync_folder(entries, files=False)

    return on_checkpoint


def _resume_point(work_dir: Path, clean: bool = True, console=None) -> Path | None:
    """The latest complete checkpoint in ``work_dir``, or None; with ``clean`` every other checkpoint folder is deleted.

    A kill can leave a half-written newest checkpoint (no selection file yet) next to the
    complete one before it; the half-written one is discarded. So is one whose files cannot be
    read back (torn by a power loss, or edited; checked without loading the tensors): it failed every later run with
    "SafetensorError" or "PytorchStreamReader failed", and nothing said to delete it.
    """
    found = {
        int(p.name.removeprefix("checkpoint-")): p
        for p in work_dir.glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit() and (p / SELECTION_FILE).is_file()
    }
    keep = None
    for step in sorted(found, reverse=True):
        problem = _damaged(found[step])
        if problem is None:
            keep = found[step]
            break
        if console is not None:
            console.print(f"  {found[step]} is damaged ({problem}); not resumed from it", markup=False)
    for p in work_dir.glob("checkpoint-*") if clean else ():
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)
    return keep


def _damaged(folder: Path) -> str | None:
    """Why checkpoint ``folder`` cannot be read back (its first bad file), or None when every file reads."""
    import zipfile

    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":  # its header says where the last tensor ends: a torn file is shorter
                with file.open("rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    if size > file.stat().st_size:
                        raise ValueError("header longer than the file")
                    header = json.loads(f.read(size))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if file.stat().st_size != 8 + size + end:
                    raise ValueError(f"{file.stat().st_size} bytes, the header needs {8 + size + end}")
            elif file.suffix in (".pt", ".pth", ".bin"):  # torch.save writes a zip; testzip checks every CRC
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        raise ValueError("a damaged member")
        except Exception as exc:  # noqa: BLE001 - any reader's error means the file is unusable
            return f"{file.name}: {first_line(exc)[:80]}"
    return None


def load_trainable(model, folder: Path) -> None:
    """Copy the trainable parameters saved in checkpoint ``folder`` into ``model``."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(folder / TRAINABLE_FILE)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys() or any(saved[n].shape != p.shape for n, p in params.items()):
        raise TailtuneError(
            f"checkpoint {folder} does not match this model's trainable parameters; "
            f"delete {folder.parent} to train from the start"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])


def trainer_class(draw, n_rows: int, seed: int, on_checkpoint=None):
    """The Trainer tailtune trains with: a data order a resumed run replays, lean checkpoints.

    ``draw(generator)`` returns one epoch's row order (``n_rows`` indices). The generator is
    seeded from (seed, epoch) alone, so a run resumed in the middle of epoch 3 replays epoch
    3's order; the stock samplers draw from the global RNG, whose state at an epoch's start a
    resumed run does not have. A checkpoint holds the trainable parameters only (not the
    frozen backbone) and the loss summed since the last log, then
    ``on_checkpoint(folder, state, control)`` completes it, and older checkpoints are deleted.
    """
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback

    class EpochSampler(torch.utils.data.Sampler):
        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:  # the Trainer calls this before each epoch
            self.epoch = epoch

        def __len__(self) -> int:
            return n_rows

        def __iter__(self):
            entropy = np.random.SeedSequence([seed, self.epoch]).generate_state(1)[0]
            self.epoch += 1  # iterated without set_epoch (outside the Trainer), the next pass differs
            return iter(draw(torch.Generator().manual_seed(int(entropy))))

    class LossWindow(TrainerCallback):
        """Puts back the loss summed since the last log, which the Trainer does not checkpoint.

        Without it the first loss a resumed run logs averages fewer steps than in an
        uninterrupted run, when a checkpoint falls between two logs.
        """

        def __init__(self, trainer):
            self.trainer, self.saved = trainer, None

        def on_train_begin(self, args, state, control, **kwargs):
            if self.saved is not None:  # the Trainer has just reset both
                self.trainer._tr_loss += self.saved["sum"]
                self.trainer._globalstep_last_logged = self.saved["since"]

    class TailtuneTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_window = LossWindow(self)
            self.add_callback(self.loss_window)

        def _get_train_sampler(self, train_dataset=None):
            self.epoch_sampler = EpochSampler()
            return self.epoch_sampler

        def _run_epoch(self, **kwargs):
            # The Trainer's set_epoch reaches the sampler through two wrappers at most; resumed
            # mid-epoch under DDP it sits under three (SkipBatchSampler > BatchSamplerShard >
            # BatchSampler), and the resumed epoch would replay epoch 0's order.
            self.epoch_sampler.set_epoch(kwargs["epoch"])
            return super()._run_epoch(**kwargs)

        def _save(self, output_dir=None, state_dict=None):
            if not self.args.should_save:  # under DDP the Trainer calls this in every process
                return
            folder = Path(output_dir or self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            trainable = {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(trainable, folder / TRAINABLE_FILE)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            load_trainable(model or self.model, Path(resume_from_checkpoint))
            self.loss_window.saved = json.loads((Path(resume_from_checkpoint) / LOSS_WINDOW_FILE).read_text())

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            # The loss logged next is the mean over processes of each one's running sum, so the
            # mean of the sums is what every process puts back on resume.
            window = {
                "sum": self.accelerator.gather(self._tr_loss.detach()).mean().item(),
                "since": self._globalstep_last_logged,
            }
            self.accelerator.wait_for_everyone()  # every process's RNG state is in the folder
            if not self.args.should_save:
                return
            run_dir = Path(self.args.output_dir)
            folder = run_dir / f"checkpoint-{self.state.global_step}"
            (folder / LOSS_WINDOW_FILE).write_text(json.dumps(window))
            on_checkpoint(folder, self.state, self.control)
            for old in run_dir.glob("checkpoint-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)

    return TailtuneTrainer


def _length_grouped_trainer(lengths: list[int], batch_size: int, seed: int, on_checkpoint=None):
    """A Trainer class whose batches hold rows of similar length (little padding), shuffled per epoch."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return trainer_class(
        lambda g: get_length_grouped_indices(lengths, batch_size, generator=g), len(lengths), seed, on_checkpoint
    )


def _sampling_trainer(y: np.ndarray, class_sampling: np.ndarray, seed: int, on_checkpoint=None):
    """A Trainer class whose training sampler draws rows with probability ~ ``class_sampling[y]``."""
    import torch

    weights = torch.as_tensor(np.asarray(class_sampling, dtype=float)[y], dtype=torch.double)
    return trainer_class(
        lambda g: torch.multinomial(weights, len(weights), replacement=True, generator=g).tolist(),
        len(weights),
        seed,
        on_checkpoint,
    )


def rich_progress(console, total_steps: int):
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
