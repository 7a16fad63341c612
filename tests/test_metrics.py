import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from tailtune import metrics
from tailtune.errors import TailtuneError
from tailtune.metrics import evaluate, paired_bootstrap, per_class_f1

# Hand-built case: 5 classes; D (3) is predicted once but absent from the test split,
# E (4) is neither in the test split nor predicted.
LABELS = ["A", "B", "C", "D", "E"]
TRAIN = [100, 50, 5, 2, 20]
TIERS = ["head", "head", "tail", "tail", "mid"]
TIER_NAMES = ["tail", "mid", "head", "empty"]
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 3, 0])
# A: tp 2, predicted 3 (rows 0, 1, 5), support 3 -> P 2/3, R 2/3, F1 2/3
# B: tp 1, predicted 2 (rows 2, 3),    support 2 -> P 1/2, R 1/2, F1 1/2
# C: tp 0, predicted 0,                support 1 -> P 0,   R 0,   F1 0
# D: tp 0, predicted 1 (row 4),        support 0 -> P 0,   R NaN, F1 NaN (not evaluated)
# E: nothing                                     -> P 0,   R NaN, F1 NaN (not evaluated)
# accuracy    = 3 / 6                            = 0.5
# macro_f1    = (2/3 + 1/2 + 0) / 3              = 7/18
# weighted_f1 = (3 * 2/3 + 2 * 1/2 + 1 * 0) / 6  = 0.5


def _hand_eval(**kw):
    return evaluate(Y_TRUE, Y_PRED, labels=LABELS, train_counts=TRAIN, tiers=TIERS, tier_names=TIER_NAMES, **kw)


def _random_case(seed: int, n: int = 300, n_classes: int = 12, acc: float = 0.6):
    """Long-tailed labels; the two rarest classes never occur in y_true and class 1 is never
    predicted, so both edge cases are exercised."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_classes + 1)
    p[-2:] = 0
    y_true = rng.choice(n_classes, size=n, p=p / p.sum())
    noise = rng.integers(0, n_classes, size=n)
    y_pred = np.where(rng.random(n) < acc, y_true, noise)
    y_pred[y_pred == 1] = 0
    return y_true, y_pred


def _noisy(y_true, acc: float, n_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(y_true.size) < acc, y_true, rng.integers(0, n_classes, y_true.size))


def test_hand_built_case():
    m, pc = _hand_eval(n_boot=50)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(7 / 18)
    assert m["weighted_f1"] == pytest.approx(0.5)
    assert m["zero_f1_classes"] == 1
    assert m["n_classes"] == 3
    assert m["n_test"] == 6

    assert list(pc.columns) == [
        "label",
        "tier",
        "train_count",
        "support",
        "precision",
        "recall",
        "f1",
    ]
    assert list(pc["label"]) == ["A", "B", "E", "C", "D"]  # train_count 100, 50, 20, 5, 2
    rows = pc.set_index("label")
    assert list(rows.loc[["A", "B", "C", "D", "E"], "support"]) == [3, 2, 1, 0, 0]
    np.testing.assert_allclose(rows.loc[["A", "B", "C", "D", "E"], "precision"], [2 / 3, 0.5, 0, 0, 0])
    np.testing.assert_allclose(rows.loc[["A", "B", "C", "D", "E"], "recall"], [2 / 3, 0.5, 0, np.nan, np.nan])
    np.testing.assert_allclose(rows.loc[["A", "B", "C", "D", "E"], "f1"], [2 / 3, 0.5, 0, np.nan, np.nan])
    assert rows.loc["C", "tier"] == "tail"


def test_hand_built_tiers():
    m, _ = _hand_eval(n_boot=50)
    assert list(m["tiers"]) == TIER_NAMES
    # tail: C (F1 0) is evaluated, D is not; range over both C and D.
    assert m["tiers"]["tail"] == {
        "n_classes": 1,
        "macro_f1": 0.0,
        "zero_f1_classes": 1,
        "train_range": [2, 5],
    }
    # mid: E only, absent from the test split -> kept, but nothing to average.
    assert m["tiers"]["mid"] == {
        "n_classes": 0,
        "macro_f1": None,
        "zero_f1_classes": 0,
        "train_range": [20, 20],
    }
    assert m["tiers"]["head"]["n_classes"] == 2
    assert m["tiers"]["head"]["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["tiers"]["head"]["zero_f1_classes"] == 0
    assert m["tiers"]["head"]["train_range"] == [50, 100]
    assert m["tiers"]["empty"] == {
        "n_classes": 0,
        "macro_f1": None,
        "zero_f1_classes": 0,
        "train_range": None,
    }


def test_metrics_are_plain_json():
    m, _ = _hand_eval(n_boot=50)
    assert json.loads(json.dumps(m)) == m
    assert type(m["accuracy"]) is float and type(m["n_test"]) is int
    assert all(type(v) is float for v in m["ci"]["macro_f1"])


@pytest.mark.parametrize("seed", range(6))
def test_matches_sklearn_on_random_cases(seed):
    y_true, y_pred = _random_case(seed)
    n_classes = 12
    evaluated = np.unique(y_true)
    assert evaluated.size < n_classes and 1 not in y_pred  # the edge cases are present

    tiers = ["rare"] * 4 + ["mid"] * 4 + ["common"] * 4
    m, pc = evaluate(
        y_true,
        y_pred,
        labels=[f"c{i:02d}" for i in range(n_classes)],
        train_counts=np.arange(n_classes)[::-1] * 10 + 1,
        tiers=tiers[::-1],
        tier_names=["rare", "mid", "common"],
        n_boot=20,
    )
    kw = {"labels": evaluated, "zero_division": 0}
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", **kw), abs=1e-12)
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", **kw), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert m["n_classes"] == evaluated.size

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(n_classes), zero_division=0)
    rows = pc.set_index("label").loc[[f"c{i:02d}" for i in range(n_classes)]]
    np.testing.assert_array_equal(rows["support"], s)
    np.testing.assert_allclose(rows["precision"], p, atol=1e-12)
    np.testing.assert_allclose(rows["recall"].to_numpy()[evaluated], r[evaluated], atol=1e-12)
    np.testing.assert_allclose(rows["f1"].to_numpy()[evaluated], f[evaluated], atol=1e-12)
    assert rows["f1"].isna().sum() == n_classes - evaluated.size
    assert m["zero_f1_classes"] == int((f[evaluated] == 0).sum())

    f1 = per_class_f1(y_true, y_pred, n_classes)
    for name in ["rare", "mid", "common"]:
        members = [i for i in evaluated if tiers[::-1][i] == name]
        expected = f1_score(y_true, y_pred, labels=members, average="macro", zero_division=0)
        assert m["tiers"][name]["macro_f1"] == pytest.approx(expected, abs=1e-12)
        assert m["tiers"][name]["zero_f1_classes"] == int((f1[members] == 0).sum())
    assert sum(t["n_classes"] for t in m["tiers"].values()) == m["n_classes"]


def test_per_class_f1_nan_only_without_support():
    f1 = per_class_f1(Y_TRUE, Y_PRED, 5)
    np.testing.assert_allclose(f1, [2 / 3, 0.5, 0.0, np.nan, np.nan])


def test_zero_f1_count():
    y_true = np.array([0, 0, 1, 1, 2, 2, 3])
    y_pred = np.array([0, 0, 0, 0, 3, 3, 3])  # 1 never predicted, 2 always wrong -> F1 0
    m, _ = evaluate(
        y_true,
        y_pred,
        labels=list("abcd"),
        train_counts=[4, 3, 2, 1],
        tiers=["x"] * 4,
        tier_names=["x"],
        n_boot=10,
    )
    assert m["zero_f1_classes"] == 2
    assert m["tiers"]["x"]["zero_f1_classes"] == 2


def test_resample_scores_match_sklearn_per_resample():
    y_true, y_pred = _random_case(7, n=120)
    classes = np.unique(y_true)
    idx = np.random.default_rng(3).integers(0, y_true.size, size=(25, y_true.size))
    got = metrics._resample_scores(y_true, y_pred, idx, classes, 12)
    for b, rows in enumerate(idx):
        t, p = y_true[rows], y_pred[rows]
        assert got["accuracy"][b] == pytest.approx(accuracy_score(t, p), abs=1e-12)
        # classes of the fixed set that this resample contains (the point estimate's rule)
        expected = f1_score(t, p, labels=np.intersect1d(classes, t), average="macro", zero_division=0)
        assert got["macro_f1"][b] == pytest.approx(expected, abs=1e-12)


def test_ci_matches_a_plain_loop_reference():
    """The documented recipe, one resample at a time with scikit-learn: stratified resamples,
    2.5th / 97.5th percentiles."""
    y_true, y_pred = _random_case(8, n=150)
    n_boot, seed = 60, 13
    m, _ = evaluate(
        y_true,
        y_pred,
        labels=[str(i) for i in range(12)],
        train_counts=[1] * 12,
        tiers=["t"] * 12,
        tier_names=["t"],
        n_boot=n_boot,
        seed=seed,
    )
    evaluated = np.unique(y_true)
    idx = np.concatenate(list(metrics._resamples(y_true, n_boot, seed)))
    # every resample keeps each class's support (stratified)
    assert all((np.bincount(y_true[i], minlength=12) == np.bincount(y_true, minlength=12)).all() for i in idx)
    acc = [accuracy_score(y_true[i], y_pred[i]) for i in idx]
    macro = [
        f1_score(y_true[i], y_pred[i], labels=np.intersect1d(evaluated, y_true[i]), average="macro", zero_division=0)
        for i in idx
    ]
    np.testing.assert_allclose(m["ci"]["accuracy"], np.percentile(acc, [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose(m["ci"]["macro_f1"], np.percentile(macro, [2.5, 97.5]), atol=1e-12)


def _ci(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, size=n)
    y_pred = _noisy(y_true, 0.7, 5, seed + 1)
    kw = {"labels": list("abcde"), "train_counts": [5] * 5, "tiers": ["t"] * 5}
    return evaluate(y_true, y_pred, tier_names=["t"], n_boot=500, **kw)[0]


def test_ci_contains_point_and_narrows_with_more_data():
    small, large = _ci(200), _ci(5000)
    for m in (small, large):
        for key in ("accuracy", "macro_f1"):
            lo, hi = m["ci"][key]
            assert lo < m[key] < hi
    for key in ("accuracy", "macro_f1"):
        width_small = np.diff(small["ci"][key])[0]
        width_large = np.diff(large["ci"][key])[0]
        # sqrt(5000 / 200) = 5, so about a fifth; allow slack for sampling noise.
        assert width_large < width_small / 3


def test_evaluate_is_deterministic_and_seed_matters():
    y_true, y_pred = _random_case(1)
    kw = {
        "labels": [str(i) for i in range(12)],
        "train_counts": [1] * 12,
        "tiers": ["t"] * 12,
        "tier_names": ["t"],
        "n_boot": 200,
    }
    a, pa = evaluate(y_true, y_pred, seed=5, **kw)
    b, pb = evaluate(y_true, y_pred, seed=5, **kw)
    c, _ = evaluate(y_true, y_pred, seed=6, **kw)
    assert a == b
    assert pa.equals(pb)
    assert a["ci"] != c["ci"]


def test_chunking_does_not_change_the_resamples(monkeypatch):
    y_true, y_pred = _random_case(2)
    whole = paired_bootstrap(y_true, y_pred, _noisy(y_true, 0.5, 12, 9), n_boot=100)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", y_true.size * 7)  # 7 resamples a chunk
    chunked = paired_bootstrap(y_true, y_pred, _noisy(y_true, 0.5, 12, 9), n_boot=100)
    assert whole == chunked


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_paired_bootstrap_with_itself_is_exactly_zero(metric):
    y_true, y_pred = _random_case(3)
    r = paired_bootstrap(y_true, y_pred, y_pred.copy(), metric=metric, n_boot=300)
    assert r == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_better": 0.0, "n_boot": 300, "decisive": 0}


def test_two_systems_right_on_the_same_rows_can_differ_beyond_noise_in_macro_f1():
    """Both right on the same rows, wrong in different ways: macro-F1 differs (0.26 in a review), but the
    rows that decide it were counted as only those one system gets right: 0, so "within noise"."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, size=600)
    right = rng.random(600) < 0.6
    a = np.where(right, y_true, np.where(y_true == 0, 1, 0))  # mistakes piled on class 0 (1 for its own rows)
    b = np.where(right, y_true, (y_true + 1) % 6)  # mistakes spread over every class: all fall
    r = paired_bootstrap(y_true, a, b, n_boot=300)
    assert r["diff"] > 0.04 and r["lo"] > 0
    assert r["decisive"] == int((a != b).sum()) > 100
    assert metrics.beyond_noise(r)
    assert paired_bootstrap(y_true, a, b, metric="accuracy", n_boot=300)["decisive"] == 0


def test_a_row_that_only_touches_classes_no_system_gets_right_does_not_count():
    """A review's memo: "+0.008 [+0.003, +0.014] outside noise" on 6 differing rows, one of them
    wrong in both systems between classes neither ever gets right: no F1 can move on it."""
    y_true = np.array([0, 0, 0, 0, 3, 3, 3, 1, 2, 4])
    a = np.array([0, 0, 0, 0, 3, 3, 3, 2, 1, 1])
    b = np.array([0, 0, 0, 0, 3, 3, 3, 4, 1, 1])  # row 7 differs, between classes 1, 2 and 4: F1 0 in both
    dead = paired_bootstrap(y_true, a, b, n_boot=50)
    assert dead["diff"] == 0 and dead["decisive"] == 0
    b[3] = 3  # a row that moves classes 0 and 3, which both systems get right elsewhere
    assert paired_bootstrap(y_true, a, b, n_boot=50)["decisive"] == 1
    assert paired_bootstrap(y_true, a, b, classes=[1, 2, 4], n_boot=50)["decisive"] == 0  # a tier of dead classes


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_paired_bootstrap_detects_a_clearly_better_system(metric):
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 8, size=1000)
    good, bad = _noisy(y_true, 0.9, 8, 1), _noisy(y_true, 0.5, 8, 2)
    r = paired_bootstrap(y_true, good, bad, metric=metric, n_boot=500)
    assert 0 < r["lo"] <= r["diff"] <= r["hi"]
    assert r["p_better"] == 1.0
    flipped = paired_bootstrap(y_true, bad, good, metric=metric, n_boot=500)
    assert flipped["diff"] == pytest.approx(-r["diff"])
    assert flipped["lo"] == pytest.approx(-r["hi"])
    assert flipped["hi"] == pytest.approx(-r["lo"])
    assert flipped["p_better"] == 0.0


def test_paired_bootstrap_point_estimate_matches_sklearn():
    y_true, a = _random_case(4)
    b = _noisy(y_true, 0.4, 12, 11)
    classes = [0, 2, 3]  # a "tier"
    r = paired_bootstrap(y_true, a, b, classes=classes, n_boot=50)
    expected = f1_score(y_true, a, labels=classes, average="macro", zero_division=0) - f1_score(
        y_true, b, labels=classes, average="macro", zero_division=0
    )
    assert r["diff"] == pytest.approx(expected, abs=1e-12)
    default = paired_bootstrap(y_true, a, b, n_boot=50)
    evaluated = np.unique(y_true)
    expected = f1_score(y_true, a, labels=evaluated, average="macro", zero_division=0) - f1_score(
        y_true, b, labels=evaluated, average="macro", zero_division=0
    )
    assert default["diff"] == pytest.approx(expected, abs=1e-12)
    acc = paired_bootstrap(y_true, a, b, metric="accuracy", n_boot=50)
    assert acc["diff"] == pytest.approx(accuracy_score(y_true, a) - accuracy_score(y_true, b))


def test_paired_bootstrap_is_deterministic():
    y_true, a = _random_case(5)
    b = _noisy(y_true, 0.55, 12, 12)
    assert paired_bootstrap(y_true, a, b, seed=3) == paired_bootstrap(y_true, a, b, seed=3)
    assert paired_bootstrap(y_true, a, b, seed=3) != paired_bootstrap(y_true, a, b, seed=4)


def test_bootstrap_is_vectorised(monkeypatch):
    """Speed guard without a clock: 1,000 resamples of 10,000 rows x 100 classes must be
    counted in a handful of bincount calls, not one call (or one sklearn call) per resample."""
    calls = []
    real_bincount = np.bincount

    def counting_bincount(*args, **kwargs):
        calls.append(1)
        return real_bincount(*args, **kwargs)

    monkeypatch.setattr(np, "bincount", counting_bincount)
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 100, size=10_000)
    y_pred = _noisy(y_true, 0.7, 100, 1)
    m, _ = evaluate(
        y_true,
        y_pred,
        labels=[f"c{i}" for i in range(100)],
        train_counts=rng.integers(1, 1000, size=100),
        tiers=["all"] * 100,
        tier_names=["all"],
        n_boot=1000,
    )
    assert len(calls) < 100
    assert m["ci"]["accuracy"][0] < m["accuracy"] < m["ci"]["accuracy"][1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"y_pred": np.array([0, 1])}, "rows"),
        ({"y_pred": np.array([0, 0, 1, 1, 9, 0])}, "only 5 classes"),
        ({"y_pred": Y_PRED.astype(float)}, "integer"),
        ({"tiers": ["head"] * 4 + ["nope"]}, "not in tier_names"),
        ({"train_counts": [1, 2]}, "one entry per class"),
        ({"n_boot": 0}, "n_boot"),
    ],
)
def test_evaluate_rejects_bad_input(kwargs, message):
    args = {
        "y_true": Y_TRUE,
        "y_pred": Y_PRED,
        "labels": LABELS,
        "train_counts": TRAIN,
        "tiers": TIERS,
        "tier_names": TIER_NAMES,
    } | kwargs
    with pytest.raises(TailtuneError, match=message):
        evaluate(**args)


def test_paired_bootstrap_rejects_bad_input():
    with pytest.raises(TailtuneError, match="unknown metric"):
        paired_bootstrap(Y_TRUE, Y_PRED, Y_PRED, metric="f2")
    with pytest.raises(TailtuneError, match="accuracy"):
        paired_bootstrap(Y_TRUE, Y_PRED, Y_PRED, metric="accuracy", classes=[0])


def test_ci_contains_the_estimate_on_a_long_tail():
    # 60 classes with one test row each plus a big one: most resamples miss many tail classes.
    rng = np.random.default_rng(0)
    y_true = np.concatenate([np.zeros(300, int), np.arange(1, 61)])
    y_pred = np.where(rng.random(y_true.size) < 0.6, y_true, 0)
    m, _ = evaluate(
        y_true,
        y_pred,
        labels=[str(i) for i in range(61)],
        train_counts=[1] * 61,
        tiers=["t"] * 61,
        tier_names=["t"],
        n_boot=500,
        seed=0,
    )
    lo, hi = m["ci"]["macro_f1"]
    assert lo <= m["macro_f1"] <= hi


def test_beyond_noise_needs_exactly_min_decisive_rows():
    """Fails when beyond_noise's threshold of decisive rows is off by one."""
    from tailtune.metrics import MIN_DECISIVE, beyond_noise

    # MIN_DECISIVE is the fewest discordant rows a two-sided sign test can call significant
    assert 2 * 0.5**MIN_DECISIVE < 0.05 <= 2 * 0.5 ** (MIN_DECISIVE - 1)
    clear = {"diff": 0.02, "lo": 0.01, "hi": 0.03}
    assert beyond_noise({**clear, "decisive": MIN_DECISIVE})
    assert not beyond_noise({**clear, "decisive": MIN_DECISIVE - 1})
    assert not beyond_noise({**clear, "lo": 0.0, "decisive": 100})  # an interval touching 0 is noise
    assert beyond_noise({"diff": -0.02, "lo": -0.03, "hi": -0.01, "decisive": MIN_DECISIVE})  # either sign
