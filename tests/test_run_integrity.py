"""One run directory holds one experiment: what a review found mixed into one comparison without
a word (weights changed in place, a system's folder gone, the data changed under bench, split
seeds of another config, systems trained with other library versions)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import restamp
from typer.testing import CliRunner

from tailtune import deploy
from tailtune.backbones import make_tiny, model_digests
from tailtune.cli import app
from tailtune.errors import TailtuneError


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _run(out: Path, data: Path, systems: str, *extra):
    return cli("run", "smoke", *extra, "--data", data, "--out", out, "--systems", systems, "--no-report")


def test_weights_changed_in_place_are_refused_on_resume_and_by_the_saved_model(tmp_path, small_csv):
    """The config names a folder, not its weights: after the weights in it changed, a resumed run
    kept the probe of the old ones next to a LoRA trained on the new, and the kept probe predicted
    other labels than its predictions.csv."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bert"
    shutil.copytree(make_tiny("bert"), folder)
    out = tmp_path / "run"
    result = _run(out, small_csv, "tfidf-logreg,encoder-probe", f"encoder.name={folder}")
    assert result.exit_code == 0, result.output
    digest = model_digests(str(folder))
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(digest)
    assert json.loads((out / "data.json").read_text())["model_files"] == {"encoder": digest}
    os.utime(folder / "model.safetensors", ns=(1, 1))  # a new file time alone is the same weights
    assert model_digests(str(folder)) == digest
    (folder / "notes.txt").write_text("my notes")  # files from_pretrained does not read: the same model
    (folder / "optimizer.pt").write_bytes(b"\0" * 64)
    (folder / "README.md").write_text("# bert")
    assert model_digests(str(folder)) == digest
    deploy.load_predictor(out / "systems" / "encoder-probe")

    tensors = load_file(folder / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    now = model_digests(str(folder))
    assert {n for n in now if now[n] != digest[n]} == {"model.safetensors"}
    again = _run(out, small_csv, "tfidf-logreg,encoder-probe,encoder-lora", f"encoder.name={folder}")
    assert again.exit_code == 2, again.output
    assert again.stderr.strip() == (
        f"error: {out} holds a run made with another encoder: {folder} has changed since (model.safetensors "
        "differs); choose another --out, or restore the files the run was made with"
    )
    assert not list((out / "systems").glob("*encoder-lora*"))
    with pytest.raises(
        TailtuneError,
        match=f"the backbone in {folder} has changed since this model was trained on it "
        r"\(model.safetensors differs\); restore those files, or train again",
    ):
        deploy.load_predictor(out / "systems" / "encoder-probe")


def test_a_system_whose_folder_is_gone_keeps_a_missing_row_and_data_json_its_backbones(tmp_path, small_csv):
    """`tailtune train` of one system rebuilt comparison.csv without a system whose folder had been
    deleted (the run's best, in the review), and rewrote data.json without the other backbone."""
    from tailtune.report import build_report

    out = tmp_path / "run"
    assert _run(out, small_csv, "tfidf-logreg,encoder-probe,decoder-probe").exit_code == 0
    before = json.loads((out / "data.json").read_text())
    assert set(before["truncation"]) == set(before["model_files"]) == {"encoder", "decoder"}
    shutil.rmtree(out / "systems" / "tfidf-logreg")
    result = cli("train", "smoke", "--data", small_csv, "--out", out, "--system", "encoder-probe")
    assert result.exit_code == 0, result.output
    comparison = pd.read_csv(out / "comparison.csv")
    assert comparison["system"].tolist() == ["tfidf-logreg", "encoder-probe", "decoder-probe"]
    missing = comparison.iloc[0]
    assert missing["status"] == "missing" and pd.isna(missing["macro_f1"])
    assert missing["note"].startswith(f"no finished results in {out / 'systems' / 'tfidf-logreg'}")
    assert "tfidf-logreg" in result.output and "missing" in result.output
    assert "predates this comparison; rebuild it with: tailtune report" not in result.output  # no report yet
    build_report(out)
    result = cli("train", "smoke", "--data", small_csv, "--out", out, "--system", "encoder-probe")
    said = " ".join(result.output.split())  # the console wraps long lines
    assert f"{out / 'report.html'} predates this comparison; rebuild it with: tailtune report {out}" in said
    after = json.loads((out / "data.json").read_text())
    assert after["truncation"] == before["truncation"] and after["model_files"] == before["model_files"]
    html = build_report(out).read_text()
    assert "Missing: tfidf-logreg (reasons in table 1)." in html
    assert "<strong>missing</strong>: no finished results" in html and "<strong>failed</strong>" not in html


def test_bench_refuses_data_that_changed_since_the_run(tmp_path, small_csv):
    """bench re-read the data file as it is now and timed (and scored) other texts."""
    out = tmp_path / "run"
    assert _run(out, small_csv, "tfidf-logreg").exit_code == 0
    frame = pd.read_csv(small_csv)
    frame.loc[0, "Consumer complaint narrative"] = "a text the run never saw"
    frame.to_csv(small_csv, index=False)
    result = cli("bench", out, "--batch-sizes", "1", "--repeats", "1")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: {small_csv} has changed since the run {out} was made on it (rows, texts, labels or split); "
        "restore the data the run was made with, so that its test texts are timed"
    )
    assert not (out / "bench.json").exists()


def test_a_refused_train_leaves_no_work_folder(tmp_path, small_csv):
    """Refused once the run's config is read under its lock, after the work folders were made."""
    out = tmp_path / "run"
    assert _run(out, small_csv, "tfidf-logreg,encoder-lora@lr=1e-3").exit_code == 0
    refused = cli("train", "smoke", "--data", small_csv, "--out", out, "--system", "encoder-lora@lr=0.001")
    assert refused.exit_code == 2 and "are the same system spelt two ways" in refused.stderr
    assert sorted(p.name for p in (out / "systems").iterdir()) == ["encoder-lora@lr=1e-3", "tfidf-logreg"]


def test_split_seeds_of_another_config_are_refused_and_later_seeds_join_the_summary(tmp_path, small_csv):
    """Seeds 2 and 3 ran with another C next to seeds 0 and 1, and splits.csv was rewritten with
    seeds 2 and 3 only."""
    out = tmp_path / "seeds"
    command = ["run", "smoke", "--data", small_csv, "--out", out, "--systems", "tfidf-logreg", "--no-report"]
    assert cli(*command, "--split-seeds", "0,1").exit_code == 0
    other = cli(*command[:2], "tfidf.C=0.01", *command[2:], "--split-seeds", "2,3")
    assert other.exit_code == 2, other.output
    assert other.stderr.startswith(f"error: {out} holds split seeds run with a different config (seed-0: tfidf.C")
    assert not (out / "seed-2").exists()
    more = cli(*command[:-2], "tfidf-logreg,encoder-probe", "--no-report", "--split-seeds", "2,3")
    assert more.exit_code == 0, more.output
    assert pd.read_csv(out / "splits.csv")["seed"].tolist() == [0, 1, 2, 2, 3, 3]
    summary = pd.read_csv(out / "splits-summary.csv").set_index("system")
    # encoder-probe ran on seeds 2 and 3 only, and says so
    assert summary.loc["tfidf-logreg", ["seeds", "finished"]].tolist() == [4, 4]
    assert summary.loc["encoder-probe", ["seeds", "finished"]].tolist() == [4, 2]
    assert "(2 of 4 finished)" in more.output


def test_systems_record_their_library_versions_and_the_report_says_when_they_differ(tmp_path, small_csv):
    import torch

    from tailtune import __version__
    from tailtune.report import build_report

    out = tmp_path / "run"
    result = cli("run", "smoke", "--data", small_csv, "--out", out, "--systems", "tfidf-logreg,encoder-probe")
    assert result.exit_code == 0, result.output
    path = out / "systems" / "encoder-probe" / "metrics.json"
    metrics = json.loads(path.read_text())
    assert metrics["versions"]["tailtune"] == __version__ and metrics["versions"]["torch"] == torch.__version__
    html = (out / "report.html").read_text()
    assert "trained with" in html and "different library versions" not in html
    metrics["versions"]["torch"] = "1.0.0"  # as if trained before an upgrade
    path.write_text(json.dumps(metrics))
    restamp(path.parent)
    html = build_report(out).read_text()
    assert "the systems were trained with different library versions" in html
    assert "torch 1.0.0" in html
    del metrics["versions"]  # trained by a tailtune that kept none
    path.write_text(json.dumps(metrics))
    restamp(path.parent)
    html = build_report(out).read_text()
    assert "not recorded (trained before versions were kept)" in html and "all systems" not in html
    assert "the systems were trained with different library versions" in html
    # a folder deleted after comparison.csv was written: its row's numbers were shown as if it were there
    shutil.rmtree(out / "systems" / "tfidf-logreg")
    html = build_report(out).read_text()
    assert "<strong>missing</strong>: systems/tfidf-logreg/metrics.json is missing" in html
    assert "Missing: tfidf-logreg (reasons in table 1)." in html


def test_a_hub_models_digest_is_its_cached_files_not_its_commit(tmp_path, monkeypatch):
    """A commit that only changed the README is the same model; new weights are another."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--m"
    tiny = make_tiny("bert")

    def snapshot(commit: str, weights: bytes | None = None) -> None:
        folder = repo / "snapshots" / commit
        shutil.copytree(tiny, folder)
        (folder / "README.md").write_text(f"commit {commit}")
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    snapshot("a" * 40)
    first = model_digests("org/m")
    assert first == model_digests(str(tiny))  # the same files as the local folder
    snapshot("b" * 40)  # only the README changed
    assert model_digests("org/m") == first
    snapshot("c" * 40, weights=(tiny / "model.safetensors").read_bytes()[:-1] + b" ")
    changed = model_digests("org/m")
    assert changed is not None and changed["model.safetensors"] != first["model.safetensors"]
    assert {n: d for n, d in changed.items() if n != "model.safetensors"} == {
        n: d for n, d in first.items() if n != "model.safetensors"
    }
    assert model_digests("org/not-cached") is None and model_digests("not a repo id!") is None


def test_report_marks_a_system_with_a_cut_or_deleted_file_missing(tmp_path, small_csv):
    """A review: `tailtune report` kept a system whose predictions.csv was cut as "ok", with its
    old numbers, where `tailtune train` marked it missing; and a damaged comparison.csv was an
    internal ParserError."""
    from tailtune.report import build_report

    out = tmp_path / "run"
    assert _run(out, small_csv, "tfidf-logreg,encoder-probe").exit_code == 0
    assert "a file of systems/" not in build_report(out).read_text()
    predictions = out / "systems" / "encoder-probe" / "predictions.csv"
    predictions.write_bytes(predictions.read_bytes()[:100])
    html = build_report(out).read_text()
    assert "Missing: encoder-probe" in html and "a file of systems/encoder-probe is missing or cut" in html
    (out / "comparison.csv").write_text('garbage,"\n')
    result = cli("report", out)
    assert result.exit_code == 2 and result.output.startswith(f"error: {out / 'comparison.csv'} is damaged")
