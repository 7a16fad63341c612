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
    raw = (1 - beta) / (1 - beta**counts)
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


def test_logit_adjustment_is_tau_log_prior():
    from tailtune.weighting import logit_adjustment

    counts = np.array([80, 15, 5, 0])
    offset = logit_adjustment(counts, tau=1.0)
    # Menon et al. (2021): tau * log(pi_c); an unseen class counts as one row
    prior = np.array([80, 15, 5, 1]) / 101
    np.testing.assert_allclose(offset, np.log(prior))
    np.testing.assert_allclose(logit_adjustment(counts, tau=0.5), 0.5 * np.log(prior))


def test_plan_sets_exactly_one_lever():
    from tailtune.weighting import names, plan

    counts = np.array([90, 9, 1])
    fields = ("class_weights", "logit_offset", "class_sampling")
    for name in names():
        chosen = [f for f in fields if getattr(plan(name, counts), f) is not None]
        assert chosen == (
            []
            if name == "none"
            else [{"logit_adjusted": "logit_offset", "balanced_sampling": "class_sampling"}.get(name, "class_weights")]
        )
    sampling = plan("balanced_sampling", counts).class_sampling
    # every class is equally likely: per-class mass n_c * w_c is constant
    np.testing.assert_allclose(counts * sampling, counts[0] * sampling[0])
    with pytest.raises(TailtuneError, match="unknown class weighting 'nope'"):
        plan("nope", counts)


def test_prior_shift_moves_a_balanced_head_to_the_losses_optimum():
    from tailtune.weighting import plan

    counts = np.array([600, 60, 6])
    log_prior = np.log(counts / counts.sum())
    # unweighted CE aims at the training prior; the balancing strategies at a flat one
    np.testing.assert_allclose(plan("none", counts).prior_shift(counts), log_prior - log_prior.max())
    for flat in ("logit_adjusted", "inverse", "balanced_sampling"):
        np.testing.assert_allclose(plan(flat, counts).prior_shift(counts), 0, atol=1e-9)
    half = plan("sqrt_inverse", counts).prior_shift(counts)
    np.testing.assert_allclose(half, (log_prior - log_prior.max()) / 2)
    np.testing.assert_allclose(plan("logit_adjusted", counts, tau=0.5).prior_shift(counts), half)
