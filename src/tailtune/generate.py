"""Classify by generation: a decoder instruction-tuned (LoRA) to write the label after a prompt.

The prompt lists nothing per class (long tails have too many labels to enumerate), e.g.::

    Complaint: <text>
    Issue: <label><eos>

(the second line names the run's label column: ``Product:`` for a product-level run).
Training is causal-LM loss on the label tokens only (prompt positions are masked with -100).
Inference is *constrained scoring*, not free generation: every label's token sequence, eos
included, is scored by log-likelihood after the prompt, so the answer is always one of the
labels and comes with a confidence. The prompt is run once per text with the KV cache, and
all labels are scored in one batched forward that continues from copies of that cache.

Scores are *summed* token log-probabilities, not length-normalised: the sum is
``log P(label <eos> | prompt)``, so the softmax over labels is the model's own distribution
renormalised to the label set. Averaging per token would favour long labels whose later
tokens are near-certain once the first is chosen ("Credit reporting company's investigation"
scores like its easy tail), and the trailing eos already separates a label from a longer one
that starts with it ("Fraud" vs "Fraud or scam").

A generator trained on a long tail inherits its label prior: ``log P(label | text)`` carries
``log P(label)``, so rare labels lose close calls to common ones. ``prior_tau`` > 0 removes
``prior_tau * log(train frequency)`` from every score (post-hoc logit adjustment, Menon et al.
2021, eq. 10); the system ``decoder-generate-logit_adjusted`` uses ``train.logit_tau``. Model
selection on validation macro-F1 sees the adjusted scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tailtune import backbones
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig
from tailtune.errors import TailtuneError

FORMAT_VERSION = 1
KIND = "generate"


def prompt_template(field: str) -> str:
    """The prompt, naming the field to write: the run's label column (``Issue``, ``Product``)."""
    field = " ".join(str(field).split()) or "Label"
    return "Complaint: {text}\n" + field.replace("{", "{{").replace("}", "}}") + ":"


TEMPLATE = prompt_template("Issue")
LABEL_TEMPLATE = " {label}"
# Upper bound on the logits one scoring forward materialises (rows x label tokens x vocab):
# 2**26 fp32 values = 256 MiB, about 170 label rows at a time for SmolLM2's 49k vocabulary.
LOGITS_BUDGET = 2**26


# ----------------------------------------------------------------------------- encoding


def encode_prompts(tokenizer, texts: list[str], template: str, max_length: int) -> list[list[int]]:
    """Prompt token ids per text: template head, the text truncated to fit ``max_length``, tail.

    The parts are tokenised separately and concatenated, so truncation cuts only the text and
    training and inference see identical ids. A space before ``{text}`` goes with the text
    (byte-level BPEs write " word" as one token, and a lone trailing space as another).
    """
    if template.count("{text}") != 1:
        raise TailtuneError(f"prompt template must contain '{{text}}' exactly once: {template!r}")
    head, _, tail = template.partition("{text}")
    space = head[len(head.rstrip()) :]
    head = head.rstrip()
    adds_bos = getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
    bos = [tokenizer.bos_token_id] if adds_bos else []
    head_ids = bos + tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    room = max_length - len(head_ids) - len(tail_ids)
    if room < 1:
        raise TailtuneError(
            f"max_length {max_length} leaves no room for the text after the prompt template "
            f"({len(head_ids) + len(tail_ids)} tokens); raise decoder.max_length"
        )
    backbones.check_readable(texts)  # the prompt alone is no text to classify
    texts = backbones.clip_long(tokenizer, [space + t for t in texts], room)
    texts_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [head_ids + ids[:room] + tail_ids for ids in texts_ids]


def require_decoder(backbone: backbones.Backbone) -> None:
    """decoder-generate continues the text with the label: an encoder has no such head."""
    if not backbone.is_decoder:
        raise TailtuneError(f"decoder-generate needs a decoder backbone; '{backbone.spec}' is an encoder")


def longest_label(backbone: backbones.Backbone, tokenizer, classes: list[str]) -> int:
    """Tokens of the longest label as decoder-generate writes it (with eos), on a decoder."""
    require_decoder(backbone)  # before the tokenizer is asked for an eos token it may not have
    return max(len(x) for x in encode_labels(tokenizer, classes))


def encode_labels(tokenizer, classes: list[str], label_template: str = LABEL_TEMPLATE) -> list[list[int]]:
    """Token ids of each class as the model must write it, ending in eos; error if two coincide."""
    if tokenizer.eos_token_id is None:
        raise TailtuneError("decoder-generate needs a tokenizer with an eos token to end the label")
    ids = [
        tokenizer(label_template.format(label=c), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for c in classes
    ]
    seen: dict[tuple, str] = {}
    for c, x in zip(classes, ids, strict=True):
        if tuple(x) in seen:
            raise TailtuneError(
                f"labels '{seen[tuple(x)]}' and '{c}' have the same tokens for this tokenizer, "
                "so generation cannot tell them apart"
            )
        seen[tuple(x)] = c
    return ids


# ----------------------------------------------------------------------------- scoring


def score_labels(
    model,
    tokenizer,
    prompts: list[list[int]],
    labels: list[list[int]],
    batch_size: int,
    precision: str,
    progress=None,
) -> np.ndarray:
    """(N, C) summed log-probability of each label's tokens after each prompt, in input order.

    Per batch of prompts (left-padded, positions counted over real tokens): one forward
    with ``use_cache=True``; its last position gives every label's first-token log-prob. Then
    each prompt's cache is repeated once per label and all labels' tokens (right-padded) run
    in one forward on top of it; position ``j`` predicts label token ``j + 1``. Right padding
    is harmless there: causal attention never lets a real label token see a later pad.
    """
    import torch
    from transformers import DynamicCache

    from tailtune.classifier import autocast, length_sorted_batches

    device = next(model.parameters()).device
    n_classes = len(labels)
    width = max(len(x) for x in labels)
    pad = tokenizer.pad_token_id
    label_ids = torch.full((n_classes, width), pad, dtype=torch.long)
    label_mask = torch.zeros((n_classes, width), dtype=torch.long)
    for c, x in enumerate(labels):
        label_ids[c, : len(x)] = torch.tensor(x)
        label_mask[c, : len(x)] = 1
    label_ids, label_mask = label_ids.to(device), label_mask.to(device)
    first = label_ids[:, 0]  # (C,)
    # Log-probs of label tokens 1.. come from label positions 0..width-2; pads score 0.
    follow = label_ids[:, 1:]  # (C, L-1)
    follow_mask = label_mask[:, 1:].bool()
    vocab = model.config.get_text_config().vocab_size
    result = np.empty((len(prompts), n_classes), dtype=np.float64)
    model.eval()
    with torch.inference_mode(), autocast(precision, device):
        for rows, batch in length_sorted_batches(tokenizer, prompts, batch_size):
            ids = batch["input_ids"].to(device)  # (B, T), left-padded
            mask = batch["attention_mask"].to(device)
            real = mask.long().sum(1)  # (B,) real prompt tokens
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
            first_lp = out.logits[:, -1].float().log_softmax(-1)[:, first]  # (B, C)
            cached = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            n = len(rows)
            scores = first_lp.double()
            chunk = max(1, min(n_classes, LOGITS_BUDGET // max(1, n * width * vocab)))
            for start in range(0, n_classes, chunk):
                cs = slice(start, min(start + chunk, n_classes))
                k = cs.stop - cs.start
                # Row b * k + j is prompt b continued by label start + j.
                repeated = [(key.repeat_interleave(k, 0), value.repeat_interleave(k, 0)) for key, value in cached]
                cache = DynamicCache(ddp_cache_data=repeated, config=model.config)
                step_ids = label_ids[cs].repeat(n, 1)  # (n*k, L)
                step_mask = torch.cat([mask.repeat_interleave(k, 0), label_mask[cs].repeat(n, 1)], dim=1)
                step_pos = real.repeat_interleave(k).unsqueeze(1) + torch.arange(width, device=device)
                logits = (
                    model(
                        input_ids=step_ids,
                        attention_mask=step_mask,
                        position_ids=step_pos,
                        past_key_values=cache,
                        use_cache=True,
                    )
                    .logits[:, :-1]
                    .float()
                )  # (n*k, L-1, V)
                target = follow[cs].repeat(n, 1)
                lp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
                lp = (lp * follow_mask[cs].repeat(n, 1)).sum(1).view(n, k)
                scores[:, cs] += lp.double()
            result[rows] = scores.cpu().numpy()
            if progress is not None:
                progress(n)
    return result


def collate_label_batch(batch: list[dict], pad: int, label_logits_only: bool = True) -> dict:
    """A training batch of prompt + label rows ({"input_ids", "labels"}, -100 on the prompt).

    Left-padded, positions counted over real tokens (as in scoring), so every row's label
    ends at the last position. With ``label_logits_only`` the model computes logits for the
    last ``longest label + 1`` positions only (``logits_to_keep``), and ``labels`` are cut to
    match: the loss is the same, but a (B, T, V) logits tensor is not built for the prompts
    (SmolLM2: 49,152 columns per position; Qwen2.5: 151,936). Without it: logits everywhere,
    as a plain causal-LM batch.
    """
    import torch

    width = max(len(r["input_ids"]) for r in batch)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in batch:
        gap = width - len(r["input_ids"])
        out["input_ids"].append([pad] * gap + r["input_ids"])
        out["attention_mask"].append([0] * gap + [1] * len(r["input_ids"]))
        out["labels"].append([-100] * gap + r["labels"])
    out = {k: torch.tensor(v) for k, v in out.items()}
    out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if label_logits_only:
        # Position t predicts token t + 1: the first label token needs the position before it.
        keep = max(sum(x != -100 for x in r["labels"]) for r in batch) + 1
        out["labels"] = out["labels"][:, -keep:]
        out["logits_to_keep"] = keep
    return out


# ----------------------------------------------------------------------------- the classifier


def load_causal_lm(backbone: backbones.Backbone, tokenizer):
    """The decoder with its LM head, float32, its config knowing the pad token (cf. ``backbones.load_model``).

    Read from disk once per run (:func:`tailtune.backbones.shared_loads`); each caller gets a copy.
    """
    key = (backbone.path, tokenizer.pad_token_id, "causal_lm")
    return backbones.shared_copy("model", key, lambda: _load_causal_lm(backbone, tokenizer))


def _load_causal_lm(backbone: backbones.Backbone, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    backbones.quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(backbone.path, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


class GenerativeClassifier:
    """A decoder + LoRA trained to write the label; predicts by scoring every label.

    Fitted attributes end in ``_``: ``classes_``, ``model_`` (peft-wrapped causal LM),
    ``tokenizer_``, ``backbone_``, ``targets_``, ``label_ids_``, ``precision_``, ``history_``,
    ``train_seconds_``, ``trainable_params_``, ``total_params_``.
    """

    def __init__(
        self,
        backbone: BackboneConfig | str = "bundled:smollm2",
        method_config: MethodConfig | None = None,
        train: TrainConfig | None = None,
        template: str = TEMPLATE,
        label_template: str = LABEL_TEMPLATE,
        prior_tau: float = 0.0,
    ):
        self.backbone = BackboneConfig(name=backbone) if isinstance(backbone, str) else backbone
        self.method_config = method_config or MethodConfig()
        self.train = train or TrainConfig()
        self.template = template
        self.label_template = label_template
        if prior_tau < 0:
            raise TailtuneError(f"prior_tau must be >= 0, got {prior_tau}")
        self.prior_tau = prior_tau

    # -- building

    def fit(
        self,
        texts: list[str],
        labels: list[str],
        *,
        val_texts: list[str] | None = None,
        val_labels: list[str] | None = None,
        classes: list[str] | None = None,
        backbone: backbones.Backbone | None = None,
        console=None,
        work_dir: str | Path | None = None,
    ) -> GenerativeClassifier:
        """Instruction-tune on ``texts``/``labels``; keep the epoch with the best val macro-F1.

        Without validation data, or with a single epoch, validation is not scored and every
        epoch is kept in turn (the last one wins). ``work_dir`` makes training resumable as
        :func:`tailtune.train.fit`'s is: the same lean checkpoints (LoRA weights, optimizer,
        scheduler, RNG states, data order, the best state and the history), the latest kept, and
        a later call with the same arguments continues from it to the same result. Validation
        runs when an epoch's last step ends, before that step's checkpoint is written.

        Under ``torchrun`` / ``accelerate launch`` every process calls ``fit`` with the same
        arguments and trains as in :func:`tailtune.train.fit`: a step takes ``batch_size *
        grad_accum * processes`` rows, only the main process writes checkpoints, and they resume
        under as many processes. Every process scores all of validation; the main process's
        macro-F1 is the one every process selects and stops on.
        """
        import torch
        from accelerate.utils import broadcast_object_list

        from tailtune import methods
        from tailtune.classifier import count_params
        from tailtune.distributed import state
        from tailtune.metrics import macro_f1
        from tailtune.train import (
            Selector,
            fit_key,
            load_trainable,
            optimizer_and_schedule,
            resolve_precision,
            resume,
            rich_progress,
            step_plan,
        )

        self.classes_ = list(classes) if classes is not None else sorted(set(labels))
        index = {c: i for i, c in enumerate(self.classes_)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise TailtuneError(f"training labels not in classes: {', '.join(unknown[:3])}")
        from tailtune.weighting import logit_adjustment

        counts = np.bincount([index[c] for c in labels], minlength=len(self.classes_))
        # What adjust() subtracts from each label's score: tau * log(train prior), or nothing.
        self.prior_offset_ = logit_adjustment(counts, self.prior_tau) if self.prior_tau > 0 else None
        self.backbone_ = backbone or backbones.resolve(self.backbone.name)
        require_decoder(self.backbone_)
        self.tokenizer_ = backbones.load_tokenizer(self.backbone_)
        base = load_causal_lm(self.backbone_, self.tokenizer_)
        self.label_ids_ = encode_labels(self.tokenizer_, self.classes_, self.label_template)
        self.precision_ = resolve_precision(self.train.precision)
        torch.manual_seed(self.train.seed)  # LoRA A matrices are drawn here
        self.model_, self.targets_ = methods.get("lora").apply(
            base, self.backbone_, self.method_config, self.backbone.adapt_layers
        )
        self.trainable_params_, self.total_params_ = count_params(self.model_)

        max_length = self.backbone.max_length
        prompts = encode_prompts(self.tokenizer_, texts, self.template, max_length)
        rows = []
        for p, label in zip(prompts, labels, strict=True):
            target = self.label_ids_[index[label]]
            rows.append({"input_ids": p + target, "labels": [-100] * len(p) + target})
        plan = step_plan(len(rows), self.train, self.backbone, state().num_processes, work_dir)
        # Scoring validation costs a pass over every label for every row; with one epoch there is
        # one state to keep and nothing to select, so it is skipped.
        has_val = bool(val_texts) and plan.epochs > 1
        val_prompts = encode_prompts(self.tokenizer_, val_texts, self.template, max_length) if has_val else []
        val_y = np.array([index[c] for c in val_labels]) if has_val else None

        lr = self.backbone.effective_lr(self.train)
        trainable = [p for p in self.model_.parameters() if p.requires_grad]
        optimizer, scheduler = optimizer_and_schedule([{"params": trainable, "lr": lr}], self.train, plan.total_steps)
        selector = Selector(self.model_, self.precision_, plan.total_steps, self.train.early_stopping_patience, has_val)
        key = fit_key(
            self.model_,
            [r["input_ids"] for r in rows],
            np.array([index[c] for c in labels]),
            val_prompts,
            val_y if has_val else np.array([], dtype=np.int64),
            self.train,
            self.backbone,
            None,
            extra=[self.template, self.label_template, self.prior_tau],
        )
        run = resume(work_dir, key, selector, plan.total_steps, console)

        def epoch_end_scores(state) -> tuple[float | None, float | None] | None:
            """(val macro-F1, val accuracy) when an epoch's last step ends (before its checkpoint),
            (None, None) there without validation; None after any other step."""
            if state.global_step % plan.steps_per_epoch and state.global_step < plan.total_steps:
                return None
            if not has_val:
                return None, None
            scores = score_labels(
                self.model_,
                self.tokenizer_,
                val_prompts,
                self.label_ids_,
                self.backbone.eval_batch_size,
                self.precision_,
            )
            self.model_.train()
            pred = self.adjust(scores).argmax(1)
            # Each process scores on its own device; all of them must select and stop alike.
            f1, accuracy = broadcast_object_list(
                [macro_f1(val_y, pred, len(self.classes_)), float((pred == val_y).mean())]
            )
            return f1, accuracy

        if run.finished:
            load_trainable(self.model_, run.folder)
        else:
            callbacks = [selector.callback(epoch_end_scores)]
            if console is not None:
                callbacks.append(rich_progress(console, plan.total_steps))
            self._train_steps(rows, optimizer, scheduler, callbacks, plan, work_dir, run)
        self.train_seconds_ = run.seconds()
        last = selector.history["evals"][-1] if selector.history["evals"] else {"epoch": plan.epochs}
        self.history_ = selector.finish(last["epoch"])
        return self

    def _train_steps(self, rows, optimizer, scheduler, callbacks, plan, work_dir, run) -> None:
        """The Trainer run of :meth:`fit`: rows shuffled each epoch (from the seed and the epoch
        alone, so a resumed epoch replays its order), lean checkpoints in ``work_dir``. Not
        length-grouped: on a task whose label shows in the prompt's length, batches sorted by
        length hold one label each, and training collapsed on one label."""
        import tempfile

        import torch
        from transformers import PrinterCallback, TrainingArguments

        from tailtune.train import trainer_class

        pad = self.tokenizer_.pad_token_id
        trainer_cls = trainer_class(
            lambda g: torch.randperm(len(rows), generator=g).tolist(), len(rows), self.train.seed, run.on_checkpoint
        )
        with tempfile.TemporaryDirectory(prefix="tailtune-generate-") as tmp:
            args = TrainingArguments(
                output_dir=str(work_dir or tmp),
                per_device_train_batch_size=self.backbone.batch_size,
                gradient_accumulation_steps=self.train.grad_accum,
                num_train_epochs=plan.epochs,
                max_steps=plan.total_steps,
                eval_strategy="no",
                save_strategy="steps" if plan.save_steps else "no",
                save_steps=max(plan.save_steps, 1),
                logging_strategy="steps",
                logging_steps=max(1, plan.total_steps // 20),
                report_to=[],
                use_cpu=not torch.cuda.is_available(),
                bf16=self.precision_ == "bf16",
                fp16=self.precision_ == "fp16",
                seed=self.train.seed,
                data_seed=self.train.seed,
                dataloader_num_workers=0,
                remove_unused_columns=False,
                label_names=["labels"],
                disable_tqdm=True,
                max_grad_norm=1.0,
            )
            trainer = trainer_cls(
                model=self.model_,
                args=args,
                train_dataset=rows,
                data_collator=lambda b: collate_label_batch(b, pad),
                optimizers=(optimizer, scheduler),
                callbacks=callbacks,
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train(resume_from_checkpoint=run.checkpoint)

    # -- inference

    def label_scores(self, texts: list[str], progress=None) -> np.ndarray:
        """(N, C) summed label log-likelihoods, columns in ``classes_`` order."""
        prompts = encode_prompts(self.tokenizer_, texts, self.template, self.backbone.max_length)
        return score_labels(
            self.model_,
            self.tokenizer_,
            prompts,
            self.label_ids_,
            self.backbone.eval_batch_size,
            self.precision_,
            progress,
        )

    def adjust(self, scores: np.ndarray) -> np.ndarray:
        """Label scores with the train prior removed (``prior_tau`` > 0), else unchanged."""
        offset = getattr(self, "prior_offset_", None)
        return scores if offset is None else scores - offset

    def predict_proba(self, texts: list[str], progress=None) -> np.ndarray:
        """(N, C) probabilities: softmax over the (prior-adjusted) label log-likelihoods."""
        from tailtune.classifier import softmax

        return softmax(self.adjust(self.label_scores(texts, progress)))

    def predict(self, texts: list[str]) -> list[str]:
        return [self.classes_[i] for i in self.predict_proba(texts).argmax(axis=1)]

    # -- persistence

    def save(self, path: str | Path) -> Path:
        """Write the LoRA adapter, tokenizer, labels, templates and backbone reference as the
        folder ``path``, all at once (:func:`tailtune.classifier.save_folder`)."""
        from tailtune.classifier import save_folder

        return save_folder(path, self._write)

    def _write(self, path: Path) -> None:
        from tailtune import methods

        methods.get("lora").save(self.model_, path)
        self.tokenizer_.save_pretrained(path / "tokenizer")
        meta = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "classes": self.classes_,
            "backbone": {**vars(self.backbone), **self.backbone_.describe()},
            "adapter": "lora",
            "method_config": vars(self.method_config),
            "template": self.template,
            "label_template": self.label_template,
            "length_normalised": False,
            "prior_tau": self.prior_tau,
            "prior_offset": None if self.prior_offset_ is None else self.prior_offset_.tolist(),
            "precision": self.precision_,
            "targets": self.targets_,
            "padding_side": self.tokenizer_.padding_side,
            "pad_token": self.tokenizer_.pad_token,
        }
        (path / "tailtune.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> GenerativeClassifier:
        """Reload a saved generative classifier (frozen, adapter not merged)."""
        from transformers import AutoTokenizer

        from tailtune import methods
        from tailtune.classifier import _usable_precision, count_params, read_saved

        path = Path(path)
        meta, config = read_saved(path, KIND)
        bb = meta["backbone"]
        self = cls(
            config,
            MethodConfig(**meta["method_config"]),
            template=meta["template"],
            label_template=meta["label_template"],
            prior_tau=meta.get("prior_tau", 0.0),
        )
        self.classes_ = meta["classes"]
        offset = meta.get("prior_offset")
        self.prior_offset_ = None if offset is None else np.asarray(offset, dtype=np.float64)
        self.backbone_ = backbones.Backbone.from_saved(bb, "last")
        self.tokenizer_ = AutoTokenizer.from_pretrained(path / "tokenizer")
        self.tokenizer_.padding_side = meta["padding_side"]
        self.label_ids_ = encode_labels(self.tokenizer_, self.classes_, self.label_template)
        self.precision_ = _usable_precision(meta["precision"])  # fp16 from a GPU is not run on a CPU
        self.targets_ = meta["targets"]
        model = methods.get("lora").load(load_causal_lm(self.backbone_, self.tokenizer_), path)
        self.model_ = model.eval().requires_grad_(False)
        self.trainable_params_, self.total_params_ = 0, count_params(model)[1]
        return self


# ----------------------------------------------------------------------------- deploy


def _predictor_base():
    from tailtune.deploy import Predictor

    class GenerativePredictor(Predictor):
        """A loaded :class:`GenerativeClassifier` with the deploy ``Predictor`` face.

        ``precision`` and ``batch_size`` live on the predictor, not the classifier, so bench's
        shallow copies (bf16 variant, batch sweeps) do not change each other.
        """

        kind = KIND

        def __init__(self, clf: GenerativeClassifier, *, precision: str, batch_size: int, info: dict):
            self.clf, self.precision, self.batch_size, self.info = clf, precision, batch_size, info
            self.classes_ = clf.classes_

        @property
        def params(self) -> int:
            from tailtune.classifier import count_params

            return count_params(self.clf.model_)[1]

        def predict_proba(self, texts, progress=None) -> np.ndarray:
            from tailtune.classifier import softmax

            c = self.clf
            prompts = encode_prompts(c.tokenizer_, texts, c.template, c.backbone.max_length)
            return softmax(
                c.adjust(
                    score_labels(
                        c.model_, c.tokenizer_, prompts, c.label_ids_, self.batch_size, self.precision, progress
                    )
                )
            )

        def quantized(self):
            """A CPU copy with the decoder's ``nn.Linear`` layers dynamically quantised to int8."""
            import copy
            import warnings

            import torch

            clf = copy.copy(self.clf)
            clf.model_ = copy.deepcopy(self.clf.model_).cpu()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
                torch.ao.quantization.quantize_dynamic(clf.model_, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
            return GenerativePredictor(clf, precision="fp32", batch_size=self.batch_size, info=self.info)

    return GenerativePredictor


def load_predictor(folder: Path, *, merged, precision, device, batch_size):
    """deploy loader for ``kind: generate``: LoRA merged into the decoder unless ``merged=False``."""
    from tailtune.deploy import merge_backbone, pick_precision

    clf = GenerativeClassifier.load(folder)
    if merged:
        clf.model_ = merge_backbone(clf.model_)
    clf.model_.to(device)
    info = {"backbone": clf.backbone.name, "method": "generate (lora)"}
    return _predictor_base()(
        clf,
        precision=pick_precision(precision, device),
        batch_size=batch_size or clf.backbone.eval_batch_size,
        info=info,
    )


# ----------------------------------------------------------------------------- system


def run_system(spec, ctx, model_dir: Path, work_dir: Path | None = None):
    """Train ``decoder-generate`` on the run's data, save it in ``model_dir``, return its Outcome.

    ``work_dir`` holds its checkpoints, so an interrupted run continues where it was."""
    import dataclasses

    from tailtune.classifier import softmax
    from tailtune.systems import GuardFailure, Outcome, _bar, check_coverage

    data = ctx.data
    method_cfg, train_cfg, bb_cfg, lr = spec.configs(ctx.cfg)  # the run's, with the name's @overrides
    if lr is not None:
        bb_cfg = dataclasses.replace(bb_cfg, lr=lr)
    template = prompt_template(ctx.cfg.data.label_column)
    used_lr = bb_cfg.effective_lr(train_cfg)  # what fit's optimizer uses
    if ctx.console is not None:
        ctx.console.print(
            f"  backbone {bb_cfg.name}, LoRA, label generation, lr {used_lr:g}; prompt {template!r}", markup=False
        )
    tau = train_cfg.logit_tau if spec.weighting == "logit_adjusted" else 0.0
    clf = GenerativeClassifier(bb_cfg, method_cfg, train_cfg, template=template, prior_tau=tau)
    clf.fit(
        data.texts("train"),
        data.split("train")["label"].tolist(),
        val_texts=data.texts("val"),
        val_labels=data.split("val")["label"].tolist(),
        classes=data.classes,
        backbone=ctx.backbone(spec.slot),
        console=ctx.console,
        work_dir=work_dir,
    )
    texts = data.texts("test")
    with _bar(ctx.console, "  scoring labels (test)", len(texts)) as advance:
        scores = clf.adjust(clf.label_scores(texts, progress=advance))
    clf.save(model_dir)
    warnings = check_coverage(scores.argmax(1), data.classes, "generates one label")
    check = data.texts("val")[:16] or texts[:16]
    diff = float(np.abs(GenerativeClassifier.load(model_dir).label_scores(check) - clf.label_scores(check)).max())
    tol = 1e-3 if clf.precision_ == "fp32" else 5e-2
    if not diff <= tol:
        raise GuardFailure(f"reloaded model disagrees with the trained one (max log-likelihood diff {diff:.2e})")
    clf.history_["reload_max_score_diff"] = diff
    adapter_bytes = sum(f.stat().st_size for f in (model_dir / "adapter").rglob("*") if f.is_file())
    return Outcome(
        softmax(scores),
        clf.train_seconds_,
        clf.trainable_params_,
        clf.total_params_,
        {
            "architecture": clf.backbone_.model_type,
            "backbone_name": bb_cfg.name,
            "precision": clf.precision_,
            "targets": clf.targets_,
            "adapter_bytes": adapter_bytes,
            "template": clf.template,
            "length_normalised": False,
            "prior_tau": tau,
            "history": clf.history_,
            "lr": used_lr,
            "settings": dict(spec.overrides),
        },
        warnings,
    )
