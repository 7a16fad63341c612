import numpy as np
import pytest

from tailtune.errors import TailtuneError
from tailtune.weighting import SCHEMES, class_weights


def test_sqrt_inverse_formula():
    counts = np.array([100, 25, 4])
    w = class_weights(counts, "sqrt_inverse")
    raw = 1 / np.sqrt(counts)
    expected = raw * counts.sum() / (counts * raw).sum()
    np.testing.assert_allclose(w, expected)
    # rarer classes weigh more, in the ratio sqrt(n_i / n_j)
    assert w[2] / w[0] == pytest.approx(np.sqrt(100 / 4))


def test_inverse_and_effective_number():
    counts = np.array([1000, 10])
    inv = class_weights(counts, "inverse")
    assert inv[1] / inv[0] == pytest.approx(100)
    eff = class_weights(counts, "effective_number")
    beta = 0.999
    raw = (1 - beta) / (1 - beta ** counts)
    assert eff[1] / eff[0] == pytest.approx(raw[1] / raw[0])


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_example_weighted_mean_is_one(scheme):
    counts = np.array([500, 60, 7, 3])
    w = class_weights(counts, scheme)
    assert (counts * w).sum() / counts.sum() == pytest.approx(1.0)


def test_none_is_all_ones_and_unseen_class_gets_zero():
    np.testing.assert_allclose(class_weights([5, 5], "none"), [1, 1])
    assert class_weights([5, 0, 3], "sqrt_inverse")[1] == 0


def test_unknown_scheme():
    with pytest.raises(TailtuneError, match="unknown class weighting"):
        class_weights([1, 2], "nope")
