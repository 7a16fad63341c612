"""How training counters class imbalance, looked up by name.

Loss-weighting schemes (``SCHEMES``: none, sqrt_inverse, inverse, effective_number) weight
the cross-entropy per class. Two strategies act elsewhere (``OTHER``):

- ``logit_adjusted`` (Menon et al., 2021, "Long-tail learning via logit adjustment"): the
  loss sees ``logits + tau * log(prior)``, so the raw logits the model outputs (and predicts
  with) are those of a class-balanced posterior;
- ``balanced_sampling``: batches are drawn with replacement so every class is equally likely.

:func:`plan` turns a name and the training counts into an :class:`Imbalance`.

Every loss-weighting scheme maps per-class training counts ``n_c`` to raw weights, which are then scaled so
the *example-weighted* mean is 1 (``sum_c n_c * w_c / sum_c n_c == 1``). The loss therefore
keeps the magnitude of unweighted cross-entropy and the learning rate means the same thing
with or without weighting; only the balance between classes moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tailtune.errors import TailtuneError

SCHEMES: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


def register(name: str):
    def wrap(fn):
        SCHEMES[name] = fn
        return fn

    return wrap


@register("none")
def _none(counts: np.ndarray) -> np.ndarray:
    return np.ones_like(counts, dtype=float)


@register("sqrt_inverse")
def _sqrt_inverse(counts: np.ndarray) -> np.ndarray:
    """w_c ~ 1 / sqrt(n_c): the reference study's scheme, softer than plain inverse."""
    return 1.0 / np.sqrt(counts)


@register("inverse")
def _inverse(counts: np.ndarray) -> np.ndarray:
    """w_c ~ 1 / n_c: every class contributes equally to the loss."""
    return 1.0 / counts


EFFECTIVE_NUMBER_BETA = 0.999  # Cui et al.'s choice for long-tailed sets of this size


@register("effective_number")
def _effective_number(counts: np.ndarray) -> np.ndarray:
    """w_c ~ (1 - beta) / (1 - beta**n_c), Cui et al. 2019 ("class-balanced loss")."""
    beta = EFFECTIVE_NUMBER_BETA
    return (1.0 - beta) / (1.0 - np.power(beta, counts))


OTHER = ("logit_adjusted", "balanced_sampling")


def names() -> list[str]:
    """Every strategy a system name or ``train.weighting`` may use."""
    return [*SCHEMES, *OTHER]


def get(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The loss-weighting scheme ``name`` (one of ``SCHEMES``; not the strategies in ``OTHER``)."""
    if name not in SCHEMES:
        other = f"; '{name}' is not a loss weighting" if name in OTHER else ""
        raise TailtuneError(f"unknown class weighting '{name}' (loss weightings: {', '.join(SCHEMES)}){other}")
    return SCHEMES[name]


def check(name: str) -> str:
    if name not in names():
        from tailtune.config import suggest

        raise TailtuneError(
            f"unknown class weighting '{name}'{suggest(str(name), names())} (schemes: {', '.join(names())})"
        )
    return name


def class_weights(counts, scheme: str) -> np.ndarray:
    """Per-class loss weights for training counts ``counts`` (shape (C,)), normalised as above.

    Classes with no training row get weight 0 (they cannot appear as a training label).
    """
    counts = np.asarray(counts, dtype=float)
    weights = np.zeros_like(counts)
    seen = counts > 0
    weights[seen] = get(scheme)(counts[seen])
    weights *= counts.sum() / (counts * weights).sum()
    return weights


def logit_adjustment(counts, tau: float = 1.0) -> np.ndarray:
    """``tau * log(prior)`` per class (Menon et al. 2021, eq. 10); unseen classes count as 1 row."""
    counts = np.maximum(np.asarray(counts, dtype=float), 1.0)
    return tau * np.log(counts / counts.sum())


def sample_weights(counts) -> np.ndarray:
    """Per-class sampling weight ``1 / n_c`` (0 for unseen classes): each class equally likely."""
    counts = np.asarray(counts, dtype=float)
    return np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)


@dataclass(frozen=True)
class Imbalance:
    """What one strategy changes in training; at most one field is set."""

    name: str
    class_weights: np.ndarray | None = None  # (C,) cross-entropy weights
    logit_offset: np.ndarray | None = None  # (C,) added to the logits inside the loss only
    class_sampling: np.ndarray | None = None  # (C,) sampling weight of one example of each class

    def prior_shift(self, counts) -> np.ndarray:
        """(C,) log-prior the optimum of this training objective adds to class-balanced logits.

        With training prior pi_c, loss weights w_c, sampling weights s_c and logit offset o_c,
        the cross-entropy optimum is ``log p(x|c) + log(pi_c * w_c * s_c) - o_c`` up to a
        constant. A class-balanced probe estimates ``log p(x|c)``, so adding this shift to its
        bias starts LP-FT at the prior the loss aims for: ``log pi`` for no weighting, 0 for
        logit adjustment (tau=1), inverse weights or balanced sampling. Without it, unweighted
        fine-tuning spends its first steps moving a balanced head towards the majority classes.
        """
        counts = np.maximum(np.asarray(counts, dtype=float), 1.0)
        shift = np.log(counts / counts.sum())
        for factor in (self.class_weights, self.class_sampling):
            if factor is not None:
                shift = shift + np.log(np.maximum(factor, 1e-12))
        if self.logit_offset is not None:
            shift = shift - self.logit_offset
        return shift - shift.max()


def plan(name: str, counts, tau: float = 1.0) -> Imbalance:
    """The :class:`Imbalance` for strategy ``name`` and training counts ``counts``."""
    check(name)
    if name == "logit_adjusted":
        return Imbalance(name, logit_offset=logit_adjustment(counts, tau))
    if name == "balanced_sampling":
        return Imbalance(name, class_sampling=sample_weights(counts))
    if name == "none":
        return Imbalance(name)
    return Imbalance(name, class_weights=class_weights(counts, name))
