"""Class-weighting schemes for the loss, looked up by name.

Every scheme maps per-class training counts ``n_c`` to raw weights, which are then scaled so
the *example-weighted* mean is 1 (``sum_c n_c * w_c / sum_c n_c == 1``). The loss therefore
keeps the magnitude of unweighted cross-entropy and the learning rate means the same thing
with or without weighting; only the balance between classes moves.
"""

from __future__ import annotations

from collections.abc import Callable

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


@register("effective_number")
def _effective_number(counts: np.ndarray, beta: float = 0.999) -> np.ndarray:
    """w_c ~ (1 - beta) / (1 - beta**n_c), Cui et al. 2019 ("class-balanced loss")."""
    return (1.0 - beta) / (1.0 - np.power(beta, counts))


def get(name: str) -> Callable[[np.ndarray], np.ndarray]:
    if name not in SCHEMES:
        raise TailtuneError(f"unknown class weighting '{name}' (schemes: {', '.join(SCHEMES)})")
    return SCHEMES[name]


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
