"""Sweeps: axes become systems of one run, with per-system settings that really reach training."""

import json
import re

import pandas as pd
import pytest
from test_cli import tailtune

from tailtune.config import load_config
from tailtune.errors import TailtuneError
from tailtune.sweep import grid_systems, parse_args, split_values, sweep_config
from tailtune.systems import parse_system


def test_a_system_name_carries_its_own_settings():
    spec = parse_system("encoder-lora-logit_adjusted@rank=4+targets=attention|ffn+lr=1e-3")
    assert (spec.method, spec.weighting) == ("lora", "logit_adjusted")
    assert spec.overrides == (("rank", 4), ("targets", ["attention", "ffn"]), ("lr", 1e-3))
    cfg = load_config("smoke")
    method, train, backbone, lr = spec.configs(cfg)
    assert (method.rank, method.targets, lr) == (4, ["attention", "ffn"], 1e-3)
    assert method.alpha == cfg.method.alpha and train == cfg.train and backbone == cfg.encoder


@pytest.mark.parametrize(
    "name, message",
    [
        ("encoder-lora@size=4", "key one of"),
        ("encoder-lora@rank=four", "rank must be a number"),
        ("encoder-lora@lr=nan", "lr must be a number, got 'nan'"),
        ("encoder-lora@targets=attn", "targets must be roles"),
        ("encoder-probe@rank=4", "unknown system"),
        ("encoder-lora@rank=2.5", "rank must be a whole number, got '2.5'"),
        ("encoder-ia3@rank=64", "ia3 does not use rank"),
        ("encoder-head@lr=5", "head does not use lr"),
        ("decoder-generate@head_lr=0.5", "generate does not use head_lr"),
    ],
)
def test_bad_settings_in_a_name_are_refused(name, message):
    with pytest.raises(TailtuneError, match=message):
        parse_system(name)


def test_axes_cross_and_baselines_stay_once():
    axes, overrides = parse_args(["method=lora,ia3", "method.rank=4,16", "eval.n_boot=50"])
    assert overrides == ["eval.n_boot=50"]
    names = grid_systems(["tfidf-logreg", "encoder-probe", "encoder-lora-weighted"], axes)
    assert names == [
        "tfidf-logreg",
        "encoder-probe",
        "encoder-lora-weighted@rank=4",
        "encoder-lora-weighted@rank=16",
        "encoder-ia3-weighted",  # ia3 has no rank: one point, not two of the same model
    ]
    assert split_values("attention,[attention,ffn]") == ["attention", "attention|ffn"]
    # the README's own example: the duplicate check failed on the targets' list ("unhashable type")
    axes, _ = parse_args(["method.rank=4,16", "method.targets=attention,all"])
    assert grid_systems(["encoder-lora"], axes) == [
        "encoder-lora@rank=4+targets=attention",
        "encoder-lora@rank=4+targets=all",
        "encoder-lora@rank=16+targets=attention",
        "encoder-lora@rank=16+targets=all",
    ]


@pytest.mark.parametrize(
    "items, message",
    [
        ([], "nothing to sweep"),
        (["method.rnak=4,8"], "'method.rnak' is not a sweep axis (did you mean 'method.rank'?); the axes are method,"),
        (["train.weight_decay=0.1,0.2"], "'train.weight_decay' is not a sweep axis; the axes are method,"),
        (["eval.n_boot=50"], "nothing to sweep"),
        (["method=lora,nosuch"], "unknown method"),
        (["method.rank=4,,16"], "empty value"),
        (["method.rank=4,x"], "rank must be a number"),
        # the same value written twice trained the same model twice
        (
            ["method.rank=4,04"],
            "the sweep produces the same system twice (encoder-lora@rank=4 and encoder-lora@rank=04)",
        ),
        (["train.lr=1e-3,0.001"], "the sweep produces the same system twice"),
        # an axis no swept method uses was dropped without a word (ia3 has no rank)
        (["method=ia3", "method.rank=4,16"], "sweep axis 'method.rank' applies to none of the swept methods (ia3)"),
    ],
)
def test_bad_axes_are_refused_before_anything_trains(items, message):
    with pytest.raises(TailtuneError, match=re.escape(message)):
        axes, _ = parse_args(items)
        sweep_config(load_config("smoke", ["systems=[tfidf-logreg,encoder-lora]"]), axes)


def test_sweep_command_runs_every_point_with_its_settings(tmp_path):
    out = tmp_path / "sweep"
    result = tailtune(
        "sweep",
        "smoke",
        "method=lora,bitfit",
        "method.rank=2,8",
        "--systems",
        "tfidf-logreg,encoder-lora",
        "--out",
        out,
        check=True,
    )
    comparison = pd.read_csv(out / "comparison.csv")
    expected = ["tfidf-logreg", "encoder-lora@rank=2", "encoder-lora@rank=8", "encoder-bitfit"]
    assert sorted(comparison["system"]) == sorted(expected), result.stdout
    assert (comparison["status"] == "ok").all()
    params = dict(zip(comparison["system"], comparison["trainable_params"], strict=True))
    # the rank reached LoRA (4x the adapter weights); BitFit, which has no rank, is one point
    assert params["encoder-lora@rank=8"] > params["encoder-lora@rank=2"]
    metrics = json.loads((out / "systems" / "encoder-bitfit" / "metrics.json").read_text())
    assert metrics["system"]["lr"] == 1e-3 and metrics["system"]["mergeable"] is True
    assert "Quality against trained parameters" in (out / "report.html").read_text()


def _sweep(tmp_path, name, ranks):
    from tailtune.backbones import shared_loads
    from tailtune.run import run

    cfg = load_config("smoke", ["systems=[encoder-probe,encoder-lora]"])
    axes, _ = parse_args([f"method.rank={ranks}"])
    with shared_loads() as shared:
        out = run(sweep_config(cfg, axes, str(tmp_path / name)), report=False)
    (path,) = shared["tokenizer"]
    base = {key for key in shared["ids"] if key[0] == path}
    return out, {**shared["reads"], "base_ids": base}


def test_sweep_points_share_one_load_of_the_base_and_of_the_tokenised_splits(tmp_path):
    one, reads_one = _sweep(tmp_path, "one", "2")
    two, reads_two = _sweep(tmp_path, "two", "4,2")
    # the probe, then one point or two: the tiny BERT and its tokenizer are read once, and a
    # second point tokenises nothing new with the base tokenizer (each point's reload check
    # tokenises with its own saved tokenizer)
    assert reads_one["model"] == reads_two["model"] == 1
    assert reads_one["tokenizer"] == reads_two["tokenizer"] == 1
    assert len(reads_one["base_ids"]) >= 3  # train, val, test at least
    assert reads_two["base_ids"] == reads_one["base_ids"]
    # each point starts from the pristine base: rank 2 trained after rank 4 equals rank 2 alone
    solo = pd.read_csv(one / "systems" / "encoder-lora@rank=2" / "predictions.csv")
    after = pd.read_csv(two / "systems" / "encoder-lora@rank=2" / "predictions.csv")
    pd.testing.assert_frame_equal(solo, after)
    assert (pd.read_csv(two / "comparison.csv")["status"] == "ok").all()


def test_an_axis_given_twice_is_refused():
    # the second list silently replaced the first: method.rank=4 method.rank=16 swept rank 16 only
    with pytest.raises(TailtuneError, match=re.escape("sweep axis 'method.rank' given twice")):
        parse_args(["method.rank=4,8", "method.rank=16"])


def test_the_swept_config_goes_beside_the_presets_run_unless_told_where():
    cfg = load_config("smoke", ["systems=[tfidf-logreg,encoder-lora]"])
    axes, _ = parse_args(["method.rank=4,16"])
    assert sweep_config(cfg, axes).out == f"{cfg.out}-sweep"  # never into the plain run's directory
    assert sweep_config(cfg, axes, "elsewhere").out == "elsewhere"


def test_the_swept_config_is_validated_as_a_whole():
    # a tune.chosen entry for the plain system no longer names a system of the sweep
    cfg = load_config(
        "smoke",
        [
            "systems=[tfidf-logreg,encoder-lora]",
            "tune.chosen=[{system: encoder-lora, lr: 0.001, weighting: none, val_macro_f1: 0.5}]",
        ],
    )
    axes, _ = parse_args(["method.rank=4,16"])
    with pytest.raises(TailtuneError, match="tune.chosen names 'encoder-lora', which is not in systems"):
        sweep_config(cfg, axes)


@pytest.mark.parametrize(
    "positionals",
    [("smoke", "method=lora,ia3"), ("method=lora,ia3",)],  # the second: an axis first, on the default preset
    ids=["preset-then-axis", "axis-first"],
)
def test_sweep_takes_the_text_column_as_run_does(tmp_path, positionals):
    """A review: `sweep --text-column` was "No such option"; only data.text_column=... worked.
    A first positional holding '=' is an axis, not a preset of that name."""
    from test_deploy import cli

    source = tmp_path / "d.csv"
    source.write_text("body,Issue\nhello,A\n")
    result = cli(
        "sweep",
        *positionals,
        "--data",
        source,
        "--label-column",
        "Issue",
        "--text-column",
        "narrative",
        "--out",
        tmp_path / "s",
    )
    assert result.exit_code == 2, result.output
    assert "text column 'narrative' not found" in result.output  # it got as far as the data
    assert "preset" not in result.output.lower()
    assert not (tmp_path / "s").exists()
