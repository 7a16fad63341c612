"""The HTML report, built from a fake but internally consistent run directory.

``write_fake_run`` writes every file of the run-directory contract from seeded random
predictions; metrics.json and per_class.csv come from :func:`tailtune.metrics.evaluate`, so the
numbers agree with each other exactly as they do in a real run.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tailtune.errors import TailtuneError
from tailtune.report import build_report, fmt_boot, fmt_ci, fmt_cost, fmt_metric, pareto_frontier
from tailtune.report import noise_word as report_noise_word

ISSUES = [
    "Incorrect information on your report",
    "Problem with a credit reporting company's investigation into an existing problem",
    "Improper use of your report",
    "Attempts to collect debt not owed",
    "Managing an account",
    "Trouble during payment process",
    "Written notification about debt",
    "Struggling to pay mortgage",
    "Dealing with your lender or servicer",
    "Fees or interest",
    "Problem with a purchase shown on your statement",
    "Closing an account",
    "Opening an account",
    "Getting a credit card",
    "Took or threatened to take negative or legal action",
    "False statements or representation",
    "Applying for a mortgage or refinancing an existing mortgage",
    "Unable to get your credit report or credit score",
    "Credit monitoring or identity theft protection services",
    "Problem with fraud alerts or security freezes",
    "Closing on a mortgage",
    "Advertising and marketing, including promotional offers",
    "Money was not available when promised",
    "Unexpected or other fees",
    "Lost or stolen check",
    "Overdraft, savings, or rewards features",
    "Convenience checks",
    "Problem adding money",
    "Vehicle was repossessed or sold the vehicle",
    "Can't stop withdrawals from your bank account",
]
TIER_EDGES = [27, 99]
TIER_NAMES = ["rare", "medium", "common"]

# name -> system block of metrics.json, plus the fake system's skill: P(correct) for the rarest
# and for the most common class (interpolated in log training count), and its bench speed.
SYSTEMS = {
    "tfidf-logreg": {
        "system": {"kind": "baseline", "backbone": None, "method": None, "weighting": "none"},
        "skill": (0.02, 0.80),
        "params": (2_000_000, 2_000_000),
        "ms": 0.04,
    },
    "encoder-probe": {
        "system": {"kind": "probe", "backbone": "encoder", "method": "probe", "weighting": "none"},
        "skill": (0.05, 0.70),
        "params": (149_000_000, 15_000),
        "ms": 2.0,
    },
    "encoder-lora": {
        "system": {
            "kind": "finetune",
            "backbone": "encoder",
            "method": "lora",
            "weighting": "none",
        },
        "skill": (0.08, 0.88),
        "params": (149_000_000, 3_500_000),
        "ms": 2.1,
    },
    "encoder-lora-weighted": {
        "system": {
            "kind": "finetune",
            "backbone": "encoder",
            "method": "lora",
            "weighting": "sqrt_inverse",
        },
        "skill": (0.35, 0.82),
        "params": (149_000_000, 3_500_000),
        "ms": 2.1,
    },
    "decoder-lora": {
        "system": {
            "kind": "finetune",
            "backbone": "decoder",
            "method": "lora",
            "weighting": "none",
        },
        "skill": (0.45, 0.90),
        "params": (494_000_000, 2_300_000),
        "ms": 6.3,
    },
    "decoder-lora-weighted": {
        "system": {
            "kind": "finetune",
            "backbone": "decoder",
            "method": "lora",
            "weighting": "sqrt_inverse",
        },
        "skill": (0.47, 0.89),
        "params": (494_000_000, 2_300_000),
        "ms": 6.3,
    },
}
DEFAULT_SYSTEMS = ("tfidf-logreg", "encoder-lora", "encoder-lora-weighted", "decoder-lora")
BACKBONES = {
    "encoder": ("answerdotai/ModernBERT-base", "ModernBertForSequenceClassification", "mean"),
    "decoder": ("Qwen/Qwen2.5-0.5B", "Qwen2ForSequenceClassification", "last"),
}
FAILURE = "CUDA out of memory while allocating 2.0 GiB (batch_size=16)"
N_BOOT = 200


def _fake_classes(n_classes: int) -> tuple[list[str], np.ndarray, list[str]]:
    """Names, training counts (4 .. 2000, geometric, descending) and tier of each class."""
    names = [ISSUES[i] if i < len(ISSUES) else f"Other issue {i}" for i in range(n_classes)]
    counts = np.round(2000 * (4 / 2000) ** (np.arange(n_classes) / (n_classes - 1))).astype(int)
    tiers = [next((t for t, e in zip(TIER_NAMES, TIER_EDGES, strict=False) if c <= e), TIER_NAMES[-1]) for c in counts]
    return names, counts, tiers


def write_fake_run(
    path: Path,
    systems: tuple[str, ...] = DEFAULT_SYSTEMS,
    with_bench: bool = True,
    *,
    failed: tuple[str, ...] = (),
    n_classes: int = 20,
    seed: int = 0,
) -> Path:
    """Write a complete run directory at ``path``; ``failed`` systems get a comparison row only."""
    from tailtune.metrics import evaluate

    path = Path(path)
    (path / "systems").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, counts, tiers = _fake_classes(n_classes)
    # Test support ~15% of training rows: the rarest classes get 0 test rows (NaN F1).
    support = np.floor(counts * 0.15).astype(int)
    y_true = rng.permutation(np.repeat(np.arange(n_classes), support))
    n_test = y_true.size
    partner = (np.arange(n_classes) + 1) % n_classes  # the class each one is confused with
    prior = counts / counts.sum()

    config = {
        "out": str(path),
        "systems": [*systems, *failed],
        "data": {"path": "complaints.csv", "tier_edges": TIER_EDGES, "tier_names": TIER_NAMES},
        "method": {"rank": 16, "alpha": 32, "targets": ["attention", "ffn"]},
        "train": {"epochs": 3, "lr": 2.0e-4, "weighting": "sqrt_inverse"},
        "eval": {"n_boot": N_BOOT, "seed": 0},
    }
    text = "# resolved config; <b>not html</b> & not a tag\n" + yaml.safe_dump(config)
    (path / "config.yaml").write_text(text)
    data = {
        "source": "complaints.csv",
        "text_column": "Consumer complaint narrative",
        "label_column": "Issue",
        "rows_read": int(counts.sum() / 0.7) + 1234,
        "rows_kept": int(counts.sum() / 0.7),
        "dropped": {"empty text": 1100, "duplicate": 120, "class below min_class_count": 14},
        "dropped_classes": ["Problem with an overdraft", "Incorrect exchange rate"],
        "n_classes": n_classes,
        "tiers": {
            "edges": TIER_EDGES,
            "names": TIER_NAMES,
            "classes": {t: [n for n, tt in zip(names, tiers, strict=True) if tt == t] for t in TIER_NAMES},
        },
        "train_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "splits": {"train": int(counts.sum()), "val": n_test, "test": n_test},
        "seed": seed,
    }
    (path / "data.json").write_text(json.dumps(data, indent=2))

    rows, bench = [], {}
    for name in systems:
        spec = SYSTEMS[name]
        lo, hi = spec["skill"]
        logc = np.log10(counts)
        p_correct = lo + (hi - lo) * (logc - logc.min()) / (logc.max() - logc.min())
        correct = rng.random(n_test) < p_correct[y_true]
        other = np.where(rng.random(n_test) < 0.6, partner[y_true], rng.choice(n_classes, n_test, p=prior))
        y_pred = np.where(correct, y_true, other)
        confidence = np.where(correct, rng.beta(6, 2, n_test), rng.beta(2, 3, n_test))
        metrics, per_class = evaluate(
            y_true,
            y_pred,
            labels=names,
            train_counts=counts,
            tiers=tiers,
            tier_names=TIER_NAMES,
            n_boot=N_BOOT,
            seed=0,
        )
        total, trainable = spec["params"]
        backbone = spec["system"]["backbone"]
        backbone_name, architecture, pooling = BACKBONES.get(backbone, (None, None, None))
        metrics.update(
            trainable_params=trainable,
            total_params=total,
            train_seconds=float(30 + rng.random() * 600),
            system={
                "name": name,
                **spec["system"],
                "backbone_name": backbone_name,
                "pooling": pooling,
                "architecture": architecture,
                "adapter_bytes": trainable * 4 if spec["system"]["kind"] == "finetune" else None,
            },
            warnings=["early stopping after 2 epochs"] if name == "decoder-lora" else [],
        )
        folder = path / "systems" / name
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        per_class.to_csv(folder / "per_class.csv", index=False)
        pd.DataFrame(
            {
                "id": np.arange(n_test) + 1000,
                "label": np.asarray(names, dtype=object)[y_true],
                "prediction": np.asarray(names, dtype=object)[y_pred],
                "confidence": confidence.round(4),
            }
        ).to_csv(folder / "predictions.csv", index=False)
        rows.append(
            {
                "system": name,
                "status": "ok",
                **{k: metrics[k] for k in ("accuracy", "macro_f1", "weighted_f1", "zero_f1_classes")},
                "trainable_params": trainable,
                "total_params": total,
                "train_seconds": metrics["train_seconds"],
                "note": "; ".join(metrics["warnings"]),
            }
        )
        ms = spec["ms"]
        variants = [
            {
                "variant": v,
                "batch_size": b,
                "ms_per_example": ms * f,
                "p50_ms": ms * f * b,
                "p95_ms": ms * f * b * 1.3,
                "examples_per_s": 1000 / (ms * f),
            }
            for v, b, f in (("merged", 32, 1.0), ("unmerged", 32, 1.15))
        ]
        bench[name] = {
            "ms_per_example": ms,
            "examples_per_s": 1000 / ms,
            "peak_mem_mb": 300 + total / 1e6 * 4,
            "time_64k_s": ms * 64,
            "cost_64k": ms * 64 / 3600 * 2.5,
            "variant": "merged",
            "variants": variants,
        }
    for name in failed:
        rows.append({"system": name, "status": "failed", "note": FAILURE})
    columns = ["system", "status", "accuracy", "macro_f1", "weighted_f1", "zero_f1_classes",
               "trainable_params", "total_params", "train_seconds", "note"]  # fmt: skip
    pd.DataFrame(rows, columns=columns).to_csv(path / "comparison.csv", index=False)
    if with_bench:
        machine = {
            "cpu": "AMD EPYC 7R13",
            "threads": 16,
            "gpu": "NVIDIA H100 80GB",
            "torch": "2.9.0",
        }
        (path / "bench.json").write_text(
            json.dumps({"machine": machine, "price_per_hour": 2.5, "batch_size": 32, "systems": bench})
        )
    return path


# ----------------------------------------------------------------------------- helpers


def _html(path: Path) -> str:
    return build_report(path).read_text(encoding="utf-8")


def _rows(html: str, system: str) -> list[str]:
    """Table rows that start with the system's bold name, in document order."""
    rows = re.findall(rf"<tr><td><strong>{re.escape(system)}</strong>.*?</tr>", html, re.S)
    assert rows, f"no table row for {system}"
    return rows


def _row(html: str, system: str) -> str:
    """The system's row of table 1 (systems comparison)."""
    return _rows(html, system)[0]


def _metrics(path: Path, system: str) -> dict:
    return json.loads((path / "systems" / system / "metrics.json").read_text())


def _indices(path: Path, system: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.read_csv(path / "systems" / system / "predictions.csv")
    index = {n: i for i, n in enumerate(labels)}
    return frame["label"].map(index).to_numpy(), frame["prediction"].map(index).to_numpy()


class _TagBalance(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "input", "link", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, str]:
    path = write_fake_run(tmp_path_factory.mktemp("run") / "run")
    return path, _html(path)


# ----------------------------------------------------------------------------- tests


def test_report_is_written_atomically_where_asked(tmp_path, full_run):
    path, _ = full_run
    assert (path / "report.html").is_file()
    assert not list(path.glob(".report-*"))
    elsewhere = build_report(path, out=tmp_path / "copy" / "memo.html")
    assert elsewhere == tmp_path / "copy" / "memo.html"
    (tmp_path / "plain.txt").touch()
    assert elsewhere.stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
    assert elsewhere.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_every_section_and_figure_is_present(full_run):
    _, html = full_run
    for heading in (
        "At a glance",
        "How to read this",
        "<h2>Data</h2>",
        "1. Systems comparison",
        "2. Class weighting",
        "3. Per-class analysis",
        "4. Latency and deployment",
        "5. Next steps",
        "Machine and versions",
        "Appendix: resolved config",
    ):
        assert heading in html, heading
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    # long tail, tier bars, weighting deltas, encoder/decoder scatter, F1 vs count, Pareto,
    # quality vs trained parameters (the fake run has three fine-tuned systems)
    assert len(images) == 7
    assert "Quality against trained parameters" in html
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count("<img") == len(images)


def test_html_is_well_formed(full_run):
    _, html = full_run
    parser = _TagBalance()
    parser.feed(html)
    assert parser.errors == []
    assert parser.stack == []


def test_comparison_numbers_are_the_run_files_numbers(full_run):
    path, html = full_run
    for system in DEFAULT_SYSTEMS:
        m = _metrics(path, system)
        row = _row(html, system)
        for key in ("accuracy", "macro_f1", "weighted_f1"):
            assert f">{fmt_metric(m[key])}<" in row, (system, key)
        assert fmt_ci(m["ci"]["macro_f1"]) in row
        assert fmt_ci(m["ci"]["accuracy"]) in row
        assert f">{m['zero_f1_classes']}<" in row


def test_tier_numbers_are_the_run_files_numbers(full_run):
    path, html = full_run
    for system in ("encoder-lora", "decoder-lora"):
        for tier, stats in _metrics(path, system)["tiers"].items():
            if stats["macro_f1"] is not None:
                assert f">{fmt_metric(stats['macro_f1'])}<" in html, (system, tier)


def test_bench_numbers_are_shown(full_run):
    path, html = full_run
    bench = json.loads((path / "bench.json").read_text())
    for system, b in bench["systems"].items():
        row = _rows(html, system)[1]  # the latency table comes after table 1
        assert f">{b['ms_per_example']:.2f}<" in row
        assert f">{fmt_cost(b['cost_64k'])}<" in row
    assert bench["machine"]["gpu"] in html


def test_paired_bootstraps_match_metrics_module(full_run):
    from tailtune.metrics import paired_bootstrap

    path, html = full_run
    labels = list(json.loads((path / "data.json").read_text())["train_counts"])
    tiers = json.loads((path / "data.json").read_text())["tiers"]["classes"]
    y, enc = _indices(path, "encoder-lora", labels)
    _, dec = _indices(path, "decoder-lora", labels)
    _, enc_w = _indices(path, "encoder-lora-weighted", labels)
    best_enc = max(("encoder-lora", "encoder-lora-weighted"), key=lambda s: _metrics(path, s)["macro_f1"])
    rare = [labels.index(c) for c in tiers["rare"] if labels.index(c) in set(y)]
    enc_best = enc if best_enc == "encoder-lora" else enc_w
    res = paired_bootstrap(y, dec, enc_best, classes=rare, n_boot=N_BOOT, seed=0)
    assert fmt_boot(res) in html
    weighting = paired_bootstrap(y, enc_w, enc, n_boot=N_BOOT, seed=0)
    assert fmt_boot(weighting) in html
    word = "helped" if weighting["lo"] > 0 else "hurt" if weighting["hi"] < 0 else "within noise"
    assert re.search(rf"encoder backbone[^.]*{word}|{word}[^.]*encoder backbone", html)


def test_report_is_self_contained(full_run):
    _, html = full_run
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"https?://", html)
    for tag in ("<script", "<link", "@import", "url("):
        assert tag not in html


def test_config_is_shown_verbatim_and_escaped(full_run):
    path, html = full_run
    assert "&lt;b&gt;not html&lt;/b&gt; &amp; not a tag" in html
    assert "<b>not html</b>" not in html
    assert "sqrt_inverse" in html


def test_without_bench_the_report_says_so(tmp_path):
    path = write_fake_run(tmp_path / "run", with_bench=False)
    html = _html(path)
    assert "bench.json is missing" in html
    assert f"tailtune bench {path}" in html
    assert "Provisional" in html
    assert html.count("<img") == 6  # no Pareto plot


def test_one_system_run_says_what_is_missing(tmp_path):
    path = write_fake_run(tmp_path / "run", systems=("encoder-lora",), with_bench=False)
    html = _html(path)
    assert "Only one system" in html
    assert "<code>encoder-lora-weighted</code>" in html
    assert "no finished fine-tuned decoder" in html
    assert f">{fmt_metric(_metrics(path, 'encoder-lora')['macro_f1'])}<" in _row(html, "encoder-lora")


def test_a_weighted_system_tuned_to_no_weighting_gets_no_impossible_advice(tmp_path):
    """--tune chose 'none' for encoder-lora-weighted: the memo said to add it (it was there) and
    'encoder-lora-weighted-weighted' (not a system name)."""
    import json

    path = write_fake_run(tmp_path / "run", systems=("encoder-lora-weighted",), with_bench=False)
    metrics_file = path / "systems" / "encoder-lora-weighted" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["system"]["weighting"] = "none"
    metrics_file.write_text(json.dumps(metrics))
    html = _html(path)
    assert "chose no weighting for <code>encoder-lora-weighted</code>" in html
    assert "weighted-weighted" not in html


def test_failed_system_is_listed_with_its_reason(tmp_path):
    path = write_fake_run(tmp_path / "run", failed=("decoder-lora-weighted",))
    assert not (path / "systems" / "decoder-lora-weighted").exists()
    html = _html(path)
    row = _row(html, "decoder-lora-weighted")
    assert "failed" in row
    assert FAILURE in row
    assert "Failed: decoder-lora-weighted" in html


def test_run_where_every_system_failed(tmp_path):
    path = write_fake_run(tmp_path / "run", systems=(), failed=("encoder-lora", "decoder-lora"))
    html = _html(path)
    assert html.count(FAILURE) >= 2
    assert "No system finished" in html
    assert "<img" in html  # the data summary still has its long-tail figure


def test_probe_and_second_weighting_pair(tmp_path):
    systems = (*DEFAULT_SYSTEMS, "encoder-probe", "decoder-lora-weighted")
    html = _html(write_fake_run(tmp_path / "run", systems=systems))
    assert "frozen encoder probe" in html
    assert "Does the effect transfer from encoder to decoder?" in html


def test_recommendation_names_the_probe_when_fine_tuning_does_not_beat_it(tmp_path):
    """On the products sample encoder LoRA kept its LP-FT start (the probe's head), and the memo
    still said 'Deploy encoder-lora', with section 5 saying fine-tuning added nothing."""
    systems = (*DEFAULT_SYSTEMS, "encoder-probe")
    ahead = _html(write_fake_run(tmp_path / "ahead", systems=systems))
    assert re.search(r"Deploy encoder-lora(-weighted)? \(encoder \+ LoRA\)", ahead)
    assert "It is the frozen probe" not in ahead

    # encoder-lora makes the probe's predictions, as when it keeps its LP-FT start; so does the
    # decoder, so the rule lands on the encoder row.
    path = write_fake_run(tmp_path / "same", systems=(*systems[:3], "decoder-lora", "encoder-probe"))
    probe = path / "systems" / "encoder-probe"
    metrics = json.loads((probe / "metrics.json").read_text())
    comparison = pd.read_csv(path / "comparison.csv")
    for copy in ("encoder-lora", "decoder-lora"):
        for name in ("predictions.csv", "per_class.csv"):
            (path / "systems" / copy / name).write_bytes((probe / name).read_bytes())
        own = json.loads((path / "systems" / copy / "metrics.json").read_text())
        (path / "systems" / copy / "metrics.json").write_text(json.dumps({**metrics, "system": own["system"]}))
        comparison.loc[comparison["system"] == copy, "macro_f1"] = metrics["macro_f1"]
    (path / "systems" / "encoder-lora-weighted" / "metrics.json").unlink()  # one fine-tuned encoder
    comparison[comparison["system"] != "encoder-lora-weighted"].to_csv(path / "comparison.csv", index=False)
    baseline = path / "systems" / "tfidf-logreg" / "predictions.csv"  # one class for every row: the probe beats it
    preds = pd.read_csv(baseline)
    preds.assign(prediction=preds["label"].mode()[0]).to_csv(baseline, index=False)
    html = _html(path)
    assert "Deploy encoder-probe (frozen encoder + linear head).</strong> The decoder does not earn" in html
    # identical predictions are said in words, not as "+0.000 [+0.000, +0.000]" (seen on products)
    assert (
        "It is the frozen probe, not encoder-lora: fine-tuning made the same prediction as the probe on "
        "every test row, and at serving time"
    ) in html
    assert "beyond noise (+0.000 [+0.000, +0.000] macro-F1)" not in html


def _predict_as(path: Path, source: str, copies: list[str]) -> None:
    """Give ``copies`` the predictions and metrics of ``source`` (each keeps its own system info)."""
    src = path / "systems" / source
    metrics = json.loads((src / "metrics.json").read_text())
    comparison = pd.read_csv(path / "comparison.csv")
    for copy in copies:
        for name in ("predictions.csv", "per_class.csv"):
            (path / "systems" / copy / name).write_bytes((src / name).read_bytes())
        own = json.loads((path / "systems" / copy / "metrics.json").read_text())
        (path / "systems" / copy / "metrics.json").write_text(json.dumps({**metrics, "system": own["system"]}))
        comparison.loc[comparison["system"] == copy, "macro_f1"] = metrics["macro_f1"]
    comparison.to_csv(path / "comparison.csv", index=False)


def test_recommendation_names_the_baseline_when_nothing_beats_it(tmp_path):
    """The memo recommended encoder-probe on a run where tfidf-logreg was as good and faster, and
    section 5 said fine-tuning beat the probe on point estimates the memo called noise."""
    path = write_fake_run(tmp_path / "run", systems=(*DEFAULT_SYSTEMS, "encoder-probe"))
    _predict_as(path, "tfidf-logreg", ["encoder-lora", "encoder-lora-weighted", "decoder-lora", "encoder-probe"])
    html = _html(path)
    assert "Deploy tfidf-logreg (TF-IDF + logistic regression).</strong>" in html
    # the probe's step told as a step to the baseline; tfidf-logreg is not called "the frozen probe" (a review)
    assert (
        "Fine-tuning encoder-lora made the same prediction as its frozen probe encoder-probe on every test "
        "row; and encoder-probe made the same prediction as the baseline tfidf-logreg on every test row"
    ) in html
    assert "It is the frozen probe" not in html
    assert "Fine-tuning does not beat the frozen encoder probe beyond noise" in html


def _text(html: str, section: str) -> str:
    """The words of a report section (tags removed, spaces collapsed)."""
    part = html[html.index(f'id="{section}"') :]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", part))


def _predict_mode(path: Path, system: str, share: float = 1.0) -> None:
    """Make ``system`` predict the most common test label on the first ``share`` of its rows."""
    file = path / "systems" / system / "predictions.csv"
    preds = pd.read_csv(file)
    rows = preds.index < int(share * len(preds))
    preds.loc[rows, "prediction"] = preds["label"].mode()[0]
    preds.to_csv(file, index=False)


def test_memo_says_worse_when_fine_tuning_is_worse_than_the_probe(tmp_path):
    """A review: "does not beat the probe beyond noise (-0.023 [-0.035, -0.012] outside noise)"."""
    path = write_fake_run(tmp_path / "run", systems=("tfidf-logreg", "encoder-lora", "decoder-lora", "encoder-probe"))
    _predict_mode(path, "encoder-lora", 0.6)
    html = _html(path)
    assert "Fine-tuning is worse than the frozen encoder probe, beyond noise (encoder-lora" in _text(html, "next")
    assert "does not beat the frozen encoder probe" not in html
    # the probe beats this baseline too: on the probe's row
    assert (
        "Fine-tuning encoder-lora scored below its frozen probe encoder-probe beyond noise (-0.135 [-0.195, "
        "-0.076] macro-F1); and encoder-probe scored below the baseline tfidf-logreg"
    ) in _text(html, "summary")
    _predict_mode(path, "tfidf-logreg")  # a baseline the probe beats: the probe is deployed
    html = _html(path)
    assert "It is the frozen probe, not encoder-lora: fine-tuning scored below the probe beyond noise" in html
    assert "the probe is the simpler system, and better." in html


def test_never_learned_classes_are_named_by_their_counts_and_tiers(tmp_path):
    """A review: "(those with <= 56 examples)" for one class of 56, and the rare tier asked about
    when the never-learned class was in another tier."""
    systems = ("tfidf-logreg", "encoder-lora", "decoder-lora")
    path = write_fake_run(tmp_path / "run", systems=systems)
    tiers = json.loads((path / "data.json").read_text())["tiers"]["classes"]
    never = [*tiers["medium"][:2], tiers["common"][-1]]
    for system in systems:
        file = path / "systems" / system / "per_class.csv"
        pc = pd.read_csv(file)
        pc.loc[pc["label"].isin(never), "f1"] = 0.0
        pc.loc[~pc["label"].isin(never) & pc["support"].gt(0), "f1"] = 0.5
        pc.to_csv(file, index=False)
    text = _text(_html(path), "next")
    counts = json.loads((path / "data.json").read_text())["train_counts"]
    low, high = min(counts[c] for c in never), max(counts[c] for c in never)
    assert (f"Double the training examples of the 3 never-learned classes (training counts {low}\u2013{high})") in text
    assert "does macro-F1 on the medium tier, the common tier move?" in text


def test_one_never_learned_class_is_one_class(tmp_path):
    """ "1 classes have zero F1 ...; their training counts run 30–30"."""
    systems = ("tfidf-logreg", "encoder-lora")
    path = write_fake_run(tmp_path / "run", systems=systems)
    never = json.loads((path / "data.json").read_text())["tiers"]["classes"]["medium"][0]
    for system in systems:
        file = path / "systems" / system / "per_class.csv"
        pc = pd.read_csv(file)
        pc.loc[pc["label"] == never, "f1"] = 0.0
        pc.loc[(pc["label"] != never) & pc["support"].gt(0), "f1"] = 0.5
        pc.to_csv(file, index=False)
    text = _text(_html(path), "next")
    count = json.loads((path / "data.json").read_text())["train_counts"][never]
    assert (
        f"1 class has zero F1 in every system (1 medium); its training count is {count:,}. No method here "
        "learns it: it needs more labelled examples"
    ) in text
    assert f"never-learned class (training counts {count:,})" in text


def test_collapse_needs_few_classes_relative_to_the_label_set():
    """A review: a two-class tfidf-logreg at 0.94 accuracy, predicting both classes, "looks collapsed"."""
    from types import SimpleNamespace

    from tailtune.report import _collapse_checks

    y = np.array([0, 1] * 20)
    two = SimpleNamespace(preds={"s": y.copy()}, labels=["a", "b"], y_true=y)
    assert _collapse_checks(two) == []
    assert (
        "looks collapsed"
        in _collapse_checks(SimpleNamespace(preds={"s": np.zeros(40, int)}, labels=["a", "b"], y_true=y))[0]
    )
    y6 = np.arange(40) % 6
    assert (
        "looks collapsed" in _collapse_checks(SimpleNamespace(preds={"s": y6 % 2}, labels=list("abcdef"), y_true=y6))[0]
    )


@pytest.mark.parametrize(
    ("kind", "method", "have", "expected"),
    [
        ("finetune", "lora", (), "Raise the rank or add target modules on best"),
        ("finetune", "full", (), "Try LoRA on the same backbone against best (encoder-lora)"),
        ("baseline", None, ("tfidf-logreg",), "Add encoder-probe and encoder-lora and check whether they beat best"),
        (
            "baseline",
            None,
            ("encoder-probe", "encoder-lora@rank=4"),
            "No backbone here beats best: try a larger encoder",
        ),
    ],
)
def test_next_experiment_fits_what_the_best_system_is(kind, method, have, expected):
    """A review: "Raise the LoRA rank or add target modules on tfidf-logreg"."""
    from types import SimpleNamespace

    from tailtune.report import _rank_experiment

    best = SimpleNamespace(name="best", info={"kind": kind, "method": method, "backbone": "encoder"})
    run = SimpleNamespace(tier_names=["rare", "common"], systems=[SimpleNamespace(name=n) for n in have])
    assert expected in _rank_experiment(run, best)


def test_latency_words_follow_which_backbone_is_faster(tmp_path):
    """A review: "the decoder costs 0.3x the encoder" and "does not earn its cost ... at 0.3x"."""
    path = write_fake_run(tmp_path / "run")
    html = _html(path)
    assert "the decoder costs" in html and "faster than the encoder" not in html
    bench = json.loads((path / "bench.json").read_text())
    for name, b in bench["systems"].items():
        b["ms_per_example"] = 0.5 if name.startswith("decoder") else 5.0
    (path / "bench.json").write_text(json.dumps(bench))
    html = _html(path)
    assert "the decoder is 10.0\u00d7 faster than the encoder here" in html
    assert "the decoder costs" not in html and "the encoder's latency" not in html


def test_an_interval_without_spread_is_not_shown_as_certainty():
    from tailtune.report import fmt_ci

    assert fmt_ci([0.8, 0.8]) == "[no spread]"
    assert fmt_ci([0.75, 0.81]) == "[0.750, 0.810]"


def test_a_difference_that_one_test_row_carries_is_noise():
    """Classes with one test row always draw that row in the stratified bootstrap: a rare tier of
    such classes gave '+0.095 [+0.095, +0.095]' and the memo called it beyond noise."""
    from tailtune.metrics import beyond_noise, paired_bootstrap

    y_true = np.array([0, 1, 2, 3, 3, 3, 3, 3, 3, 3])
    a = y_true.copy()
    b = y_true.copy()
    b[0] = 3  # class 0's one row: only b gets it wrong
    res = paired_bootstrap(y_true, a, b, classes=[0, 1, 2], n_boot=200)
    assert res["lo"] == res["hi"] == res["diff"] > 0 and res["decisive"] == 1
    assert not beyond_noise(res)
    assert "it rests on 1 test row; 6 needed" in report_noise_word(res)


def test_sweep_points_pair_weighting_within_their_own_settings(tmp_path, monkeypatch):
    """A sweep's encoder-lora-weighted@rank=4 was compared with encoder-lora@rank=2 (the key
    ignored the settings), and the advice named 'decoder-lora@rank=2-weighted', no system."""
    for rank in (2, 4):
        for name in ("encoder-lora", "encoder-lora-weighted", "decoder-lora"):
            monkeypatch.setitem(SYSTEMS, f"{name}@rank={rank}", SYSTEMS[name])
    systems = (
        "tfidf-logreg",
        *(f"{n}@rank={r}" for r in (2, 4) for n in ("encoder-lora", "encoder-lora-weighted")),
        "decoder-lora@rank=2",
    )
    text = re.sub(r"<[^>]+>", "", _html(write_fake_run(tmp_path / "run", systems=systems)))
    for rank in (2, 4):
        assert f"encoder-lora-weighted@rank={rank} vs encoder-lora@rank={rank}" in text
    assert "encoder-lora-weighted@rank=4 vs encoder-lora@rank=2" not in text
    assert "decoder-lora-weighted@rank=2" in text and "rank=2-weighted" not in text


def test_long_system_names_keep_the_figures_laid_out(tmp_path, monkeypatch):
    """A sweep over rank and targets: four legend columns of its names were wider than the
    figure, and matplotlib warned "constrained_layout not applied" on the terminal."""
    import warnings

    names = [f"encoder-lora@rank={r}+targets={t}" for r in (4, 16) for t in ("attention", "all")]
    for name in names:
        monkeypatch.setitem(SYSTEMS, name, SYSTEMS["encoder-lora"])
    run = write_fake_run(tmp_path / "run", systems=("tfidf-logreg", *names))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_report(run)


def test_missing_run_files_are_a_clear_error(tmp_path):
    with pytest.raises(TailtuneError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TailtuneError, match="data.json is missing"):
        build_report(tmp_path / "empty")


def test_pareto_frontier_keeps_only_undominated_points():
    points = [
        {"name": "fast", "ms": 1.0, "f1": 0.3},
        {"name": "slow-worse", "ms": 5.0, "f1": 0.25},
        {"name": "slow-better", "ms": 6.0, "f1": 0.4},
        {"name": "tie-slower", "ms": 2.0, "f1": 0.3},
    ]
    assert pareto_frontier(points) == ["fast", "slow-better"]


def test_importing_report_is_cheap():
    code = "import sys, tailtune.report; print(sorted({'matplotlib', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_last_token_decoder_behind_the_encoder_is_pointed_at_mean_pooling(tmp_path):
    """On products the decoder's last token cost +0.15 macro-F1 against the mean of its hidden
    states (docs/recipes.md section 15); a decoder that pools the mean gets no such advice."""
    path = write_fake_run(tmp_path / "run", systems=("tfidf-logreg", "encoder-lora", "decoder-lora"))
    _predict_mode(path, "decoder-lora", 0.6)  # the decoder well behind the encoder
    advice = "decoder-lora reads the decoder's last token."
    assert advice in _text(_html(path), "next")
    metrics = path / "systems" / "decoder-lora" / "metrics.json"
    saved = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**saved, "system": {**saved["system"], "pooling": "mean"}}))
    assert advice not in _text(_html(path), "next")
    _predict_as(path, "encoder-lora", ["decoder-lora"])  # last-token pooling, level with the encoder
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "system": saved["system"]}))
    assert advice not in _text(_html(path), "next")


def test_tier_ticks_count_classes_in_words():
    from types import SimpleNamespace

    from tailtune.report import _tier_tick

    run = SimpleNamespace(
        train_counts={"a": 41, "b": 5, "c": 9},
        data={"tiers": {"classes": {"head": ["a"], "rare": ["b", "c"], "none": []}}},
    )
    assert _tier_tick(run, "head") == "head\n1 class, 41 train"  # was "1 classes, 41\u201341 train"
    assert _tier_tick(run, "rare") == "rare\n2 classes, 5\u20139 train"
    assert _tier_tick(run, "none") == "none\nno classes"


def _analysed(tmp_path, **kw):
    from tailtune.report import analyse, load_run

    run = load_run(write_fake_run(tmp_path / "run", **kw))
    return run, analyse(run, n_boot=N_BOOT, seed=0)


def test_cascade_rows_send_low_confidence_encoder_rows_to_the_decoder(tmp_path):
    from tailtune.metrics import macro_f1
    from tailtune.report import CASCADE_THRESHOLDS, _cascade, fmt_pct

    run, an = _analysed(tmp_path)
    table, best_row = _cascade(run, an)
    y, conf = run.y_true, run.confidence[an.enc.name]
    enc, dec = run.preds[an.enc.name], run.preds[an.dec.name]
    ms = {s: b["ms_per_example"] for s, b in run.bench["systems"].items()}
    f1s = []
    for t, row in zip(CASCADE_THRESHOLDS, table.rows, strict=False):
        routed = conf < t  # the encoder is unsure: the decoder answers
        f1s.append(macro_f1(y, np.where(routed, dec, enc), len(run.labels)))
        assert row[0].text == f"below {t:.1f}"
        assert row[1].text == fmt_pct(routed.mean())
        assert row[2].text == fmt_metric(f1s[-1])
        assert row[3].text == f"{ms[an.enc.name] + routed.mean() * ms[an.dec.name]:.2f}"
    assert len(set(f1s)) > 1  # the thresholds differ, so the choice below means something
    top = int(np.argmax(f1s))
    expected = CASCADE_THRESHOLDS[top] if f1s[top] > an.enc.macro_f1 else None
    assert (best_row and best_row["t"]) == expected


def test_fewest_zero_f1_classes_is_the_highlighted_cell(tmp_path):
    from tailtune.report import _zero_f1_table, section_systems

    run, an = _analysed(tmp_path)
    zero = [s.value("zero_f1_classes") for s in run.systems]
    assert len(set(zero)) > 1
    table = section_systems(run, an).blocks[0]
    col = table.header.index("zero-F1 classes")
    assert [row[col].best for row in table.rows] == [z == min(zero) for z in zero]
    overall = _zero_f1_table(run, run.ok_systems).rows[-1]  # the "all" row
    assert [c.best for c in overall[2:]] == [z == min(zero) for z in zero]


def test_the_tier_gap_is_common_minus_rare(tmp_path):
    from tailtune.report import _tier_prose

    run, _ = _analysed(tmp_path)
    s = next(x for x in run.ok_systems if x.name == "encoder-lora")
    first, last = run.tier_names[0], run.tier_names[-1]
    gap = s.tier_f1(last) - s.tier_f1(first)
    assert gap > 0  # the fake systems are better on common classes
    text = str(_tier_prose(run, [s]))
    assert f"The {last} tier scores {fmt_metric(gap)} macro-F1 more than the {first} tier." in text


def test_gained_most_lists_classes_the_weighted_system_scores_higher(tmp_path):
    from tailtune.report import _gain_loss_tables

    run, _ = _analysed(tmp_path)
    systems = {s.name: s for s in run.ok_systems}
    gains, losses = _gain_loss_tables(systems["encoder-lora"], systems["encoder-lora-weighted"])
    for table, sign in ((gains, 1), (losses, -1)):
        assert table.rows
        for row in table.rows:
            base, weighted, delta = (float(c.text) for c in row[4:7])
            assert sign * (weighted - base) > 0 and delta == pytest.approx(weighted - base, abs=1.5e-3)


def test_predictions_are_paired_by_id_not_by_row_order(tmp_path):
    from tailtune.report import load_run

    path = write_fake_run(tmp_path / "run")
    before = load_run(path).preds["decoder-lora"]
    file = path / "systems" / "decoder-lora" / "predictions.csv"
    frame = pd.read_csv(file)
    frame.iloc[::-1].to_csv(file, index=False)  # the same rows, another order
    np.testing.assert_array_equal(load_run(path).preds["decoder-lora"], before)


def test_weighting_pairs_are_weighted_minus_unweighted_in_accuracy_and_macro_f1(tmp_path):
    run, an = _analysed(tmp_path)
    assert an.weighting
    for pair in an.weighting:
        base, w = pair["base"], pair["weighted"]
        assert pair["macro"]["diff"] == pytest.approx(w.macro_f1 - base.macro_f1)
        assert pair["accuracy"]["diff"] == pytest.approx(w.value("accuracy") - base.value("accuracy"))
        assert pair["accuracy"]["diff"] != 0


def test_encoder_decoder_tables_put_each_system_in_its_own_column(tmp_path):
    from tailtune.report import _disagreement_table, _enc_dec_tier_table, _joined_per_class

    run, an = _analysed(tmp_path)
    for row in _enc_dec_tier_table(run, an).rows:
        tier = None if "all classes" in str(row[0].text) else row[0].text
        enc, dec = (an.enc.tier_f1(tier), an.dec.tier_f1(tier)) if tier else (an.enc.macro_f1, an.dec.macro_f1)
        assert (row[2].text, row[3].text) == (fmt_metric(enc), fmt_metric(dec))
        assert enc != dec
    joined = _joined_per_class(an.enc, an.dec, ("enc", "dec"))
    rows = _disagreement_table(an, joined).rows
    assert rows
    for row in rows:
        enc, dec, delta = (float(c.text) for c in row[4:7])
        assert delta == pytest.approx(dec - enc, abs=1.5e-3)
        assert row[7].text == ("decoder" if dec > enc else "encoder")


def test_the_disagreement_table_says_how_many_classes_tie_with_its_last_row():
    """A review: 14 classes differed by 1.000 and the table showed 10 of them without a word."""
    from types import SimpleNamespace

    from tailtune.report import N_DISAGREE, _disagreement_table

    n = N_DISAGREE + 4
    joined = pd.DataFrame(
        {
            "label": [f"c{i}" for i in range(n + 1)],
            "tier": "rare",
            "train_count": 3,
            "support": [*range(n, 0, -1), 5],
            "f1_enc": [1.0] * n + [0.5],
            "f1_dec": 0.0,
        }
    )
    an = SimpleNamespace(enc=SimpleNamespace(name="enc"), dec=SimpleNamespace(name="dec"))
    table = _disagreement_table(an, joined)
    assert [r[0].text for r in table.rows] == [f"c{i}" for i in range(N_DISAGREE)]  # more test rows first
    assert "(4 more differ by as much, 1.000; ties go to the class with more test rows)" in table.caption
    table = _disagreement_table(an, joined.iloc[N_DISAGREE - 1 :])  # 5 tied and c14: all fit
    assert len(table.rows) == 6 and "more differ by as much" not in table.caption


def test_weighting_tables_show_weighted_minus_unweighted(tmp_path):
    from tailtune.report import Table, fmt_delta, section_weighting

    run, an = _analysed(tmp_path)
    tables = [
        b for b in section_weighting(run, an).blocks if isinstance(b, Table) and "95% paired CI of \u0394" in b.header
    ]
    assert len(tables) == len(an.weighting) >= 1
    for table, pair in zip(tables, an.weighting, strict=True):
        base, w = pair["base"], pair["weighted"]
        rows = {str(r[0].text): r for r in table.rows}
        assert rows["macro-F1, all classes"][3].text == fmt_delta(w.macro_f1 - base.macro_f1)
        assert rows["accuracy"][3].text == fmt_delta(w.value("accuracy") - base.value("accuracy"))
        zero = w.value("zero_f1_classes") - base.value("zero_f1_classes")
        assert rows["zero-F1 classes"][3].text == f"{zero:+d}"
        assert w.macro_f1 != base.macro_f1


def test_a_decoder_worse_on_the_rare_classes_is_said_so_and_has_its_own_rule_row(tmp_path, monkeypatch):
    """A review of the demo's memo: "The decoder does not earn its cost here" without bench.json
    (no cost measured) and with the decoder far worse on the rare tier, and the highlighted rule
    row "Common classes matter most, latency budget is tight"; and the adapter's base counted
    the adapter's own parameters."""
    monkeypatch.setitem(SYSTEMS, "decoder-lora", {**SYSTEMS["decoder-lora"], "skill": (0.0, 0.6)})
    html = _html(write_fake_run(tmp_path / "run", with_bench=False, n_classes=40))  # rare test rows enough to tell
    text = _text(html, "latency")
    assert re.search(r"The decoder is worse on the rare tier, beyond noise \(-0\.\d{3} \[", text), text
    assert "earn its cost" not in text
    highlighted = re.findall(r'<td class="best ">(.*?)</td>', html)
    assert "The encoder is no worse on the rare classes" in highlighted
    assert "Common classes matter most, latency budget is tight" not in highlighted
    from tailtune.report import fmt_count

    name, base = re.search(
        r"One adapter is [\d.]+ \w+ on disk \(([\w-]+)\) against a base of (\S+) parameters", text
    ).groups()
    total, trained = SYSTEMS[name]["params"]
    assert base == fmt_count(total - trained) != fmt_count(total)


def test_a_change_carried_by_one_row_classes_is_named():
    """A review: 'Weighting helped, P(better) = 100%' where three classes with one test row each
    went from F1 0 to 1 and the other tiers lost a little."""
    from types import SimpleNamespace

    from tailtune.report import _single_row_flips

    def system(f1):
        return SimpleNamespace(
            per_class=pd.DataFrame(
                {
                    "label": list("abcdef"),
                    "tier": ["rare"] * 4 + ["common"] * 2,
                    "train_count": [3, 3, 4, 5, 90, 99],
                    "support": [1, 1, 1, 2, 20, 25],
                    "f1": f1,
                }
            )
        )

    base = system([0.0, 0.0, 1.0, 0.5, 0.80, 0.90])
    weighted = system([1.0, 1.0, 0.0, 0.5, 0.75, 0.85])  # +2 -1 on one-row classes, -0.1 elsewhere
    words = str(_single_row_flips(base, weighted))
    assert "2 went from F1 0 to 1 and 1 from 1 to 0, +1.00 in F1 summed over classes against +0.90" in words
    spread = system([0.0, 0.0, 1.0, 1.0, 0.95, 0.95])  # the change is mostly in classes with more rows
    assert str(_single_row_flips(base, spread)) == ""


def test_a_data_json_that_is_not_utf8_or_cut_is_one_line(tmp_path):
    """A review: bytes that are not UTF-8 in data.json were an internal UnicodeDecodeError."""
    from tailtune.report import load_run

    path = write_fake_run(tmp_path / "run")
    for damage in (b'{"classes": ["caf\xe9"]}', b'{"classes": ['):
        (path / "data.json").write_bytes(damage)
        with pytest.raises(
            TailtuneError, match=r"data.json is not readable JSON \(.+\); run the same tailtune run command"
        ):
            load_run(path)
