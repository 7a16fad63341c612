"""Deployment: any system folder as a predictor, merged export, streaming predict."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tailtune import deploy
from tailtune.classifier import TextClassifier
from tailtune.config import BackboneConfig, MethodConfig, TrainConfig
from tailtune.errors import TailtuneError


def tailtune(*args):
    env = {**os.environ, "COLUMNS": "120", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "tailtune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def cli(*args):
    """The CLI in-process (fast), for the many error cases."""
    from tailtune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def smoke_run_quietly(out: Path, *overrides: str) -> Path:
    """The smoke preset run into ``out`` with ``overrides``, in-process, no terminal output, no report."""
    from rich.console import Console

    from tailtune.config import load_config
    from tailtune.run import run

    run(load_config("smoke", [f"out={out}", *overrides]), console=Console(file=io.StringIO()), report=False)
    return out


def train_smoke_run(tmp_path_factory) -> Path:
    """The smoke preset's run, trained once per session: later calls resume it (finished systems are kept).

    Its encoder-lora and decoder-lora adapters are trained (some lora_B is not 0), so the reload,
    merge and export checks built on them can fail: with B = 0 (a system that kept its LP-FT
    start) an adapter lost or merged wrongly gives the same predictions."""
    from safetensors.torch import load_file

    out = smoke_run_quietly(tmp_path_factory.getbasetemp() / "smoke-deploy")
    for name in ("encoder-lora", "decoder-lora"):
        (weights,) = (out / "systems" / name / "model" / "adapter").glob("*.safetensors")
        assert max(float(v.abs().max()) for k, v in load_file(weights).items() if "lora_B" in k) > 0, name
    return out


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    return train_smoke_run(tmp_path_factory)


def make_lora_system(folder: Path, arch: str, seed: int) -> TextClassifier:
    """A tiny LoRA system saved in ``folder``, with a random adapter that really changes the model.

    Training a random tiny model for a step leaves B ~ 0, which would make merged == base
    trivially true; random B and head weights make every comparison meaningful.
    """
    from tailtune.demo import make_demo_corpus

    frame = make_demo_corpus(n_classes=5, max_count=8, min_count=4, seed=3)
    clf = TextClassifier(
        BackboneConfig(name=f"tiny:{arch}", max_length=32, eval_batch_size=8),
        "lora",
        MethodConfig(rank=4, alpha=8),
        TrainConfig(epochs=1, precision="fp32", seed=seed),
    )
    clf.fit(frame["Consumer complaint narrative"].tolist(), frame["Issue"].tolist())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clf.model_.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        clf.model_.score.weight.copy_(torch.randn(clf.model_.score.weight.shape, generator=gen))
        if clf.model_.score.bias is not None:  # decoder heads have none
            clf.model_.score.bias.copy_(torch.randn(len(clf.classes_), generator=gen))
    clf.save(folder)
    return clf


def run_test_texts(run_dir: Path) -> pd.DataFrame:
    from tailtune.config import load_config
    from tailtune.data import prepare

    return prepare(load_config(str(run_dir / "config.yaml")).data).split("test")


# ----------------------------------------------------------------------------- predictors


def test_every_system_kind_loads_and_reproduces_the_runs_predictions(smoke_run):
    test = run_test_texts(smoke_run)
    kinds = set()
    for name in deploy.finished_systems(smoke_run):
        # The precision the run predicted in: "auto" picks bf16 on a CPU that computes it natively,
        # the smoke run fine-tunes in fp32, and a probe's features are in the machine's "auto".
        recorded = deploy.load_meta(deploy.resolve_system(smoke_run / "systems" / name)[1]).get("precision", "fp32")
        predictor = deploy.load_predictor(smoke_run / "systems" / name, precision=recorded)
        kinds.add(predictor.kind)
        expected = pd.read_csv(smoke_run / "systems" / name / "predictions.csv")
        proba = predictor.predict_proba(test["text"].tolist())
        assert proba.shape == (len(test), len(predictor.classes_))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
        assert predictor.predict(test["text"].tolist()) == expected["prediction"].tolist(), name
        np.testing.assert_allclose(proba.max(axis=1), expected["confidence"], atol=1e-4)
    assert kinds == {"tfidf", "probe", "finetune"}


def test_a_folder_that_is_not_a_system_is_refused(tmp_path):
    with pytest.raises(TailtuneError, match="not a tailtune system folder"):
        deploy.load_predictor(tmp_path)
    with pytest.raises(TailtuneError, match="not found"):
        deploy.load_predictor(tmp_path / "missing")


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_decoder_export_equals_tailtune_with_plain_transformers(tmp_path, arch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = make_lora_system(tmp_path / "system", arch, seed=1)
    record = deploy.export_merged(tmp_path / "system", tmp_path / "hf")
    texts = deploy.export_check_texts()
    ours = TextClassifier.load(tmp_path / "system").predict_logits(texts)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == model.config.pad_token_id
    assert [model.config.id2label[i] for i in range(len(clf.classes_))] == clf.classes_
    assert model.config.label2id == {c: i for i, c in enumerate(clf.classes_)}
    with torch.inference_mode():  # one padded batch: padding is exercised
        theirs = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    saved = json.loads((tmp_path / "hf" / deploy.EXPORT_INFO).read_text())
    assert saved == json.loads(json.dumps(record))
    assert 0 <= saved["check"]["max_abs_logit_diff"] <= 1e-4 and saved["pad_is_eos"]
    # the adapter matters: the base model alone gives different logits
    base = TextClassifier.load(tmp_path / "system")
    base.model_.backbone = base.model_.backbone.unload()
    assert np.abs(base.predict_logits(texts) - ours).max() > 1e-2


def test_exported_folder_needs_nothing_from_tailtune_or_peft(tmp_path):
    make_lora_system(tmp_path / "system", "qwen2", seed=2)
    result = tailtune("export", tmp_path / "system", "--merged", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert "max |merged - unmerged| logit" in result.stdout
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline\n"
        f"path = {str(tmp_path / 'hf')!r}\n"
        "pipe = pipeline('text-classification', model=AutoModelForSequenceClassification.from_pretrained(path),"
        " tokenizer=AutoTokenizer.from_pretrained(path))\n"
        "out = pipe(['debt collector keeps calling me', 'wrong balance on my card'], batch_size=2)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('tailtune', 'peft')]\n"
        "print(json.dumps([o['label'] for o in out]))\n"
    )
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    expected = deploy.load_predictor(tmp_path / "system").predict(
        ["debt collector keeps calling me", "wrong balance on my card"]
    )
    assert json.loads(plain.stdout.strip().splitlines()[-1]) == expected


def test_tailtune_format_export_is_merged_and_equals_unmerged(tmp_path):
    make_lora_system(tmp_path / "system", "bert", seed=3)
    record = deploy.export_merged(tmp_path / "system", tmp_path / "merged", fmt="tailtune")
    assert record["check"]["max_abs_logit_diff"] <= 1e-4 and record["method"] == "lora"
    texts = deploy.export_check_texts()
    merged = TextClassifier.load(tmp_path / "merged")
    assert merged.method == "full"
    assert not any("lora" in name for name, _ in merged.model_.named_modules())
    np.testing.assert_allclose(
        merged.predict_logits(texts),
        TextClassifier.load(tmp_path / "system").predict_logits(texts),
        atol=1e-4,
    )
    assert deploy.load_predictor(tmp_path / "merged").info["method"] == "lora"


def test_a_merge_that_loses_the_adapter_is_caught_and_nothing_is_written(tmp_path, monkeypatch):
    make_lora_system(tmp_path / "system", "bert", seed=4)
    monkeypatch.setattr(deploy, "merge_backbone", lambda backbone: backbone.unload())
    with pytest.raises(TailtuneError, match="disagrees with the unmerged system"):
        deploy.export_merged(tmp_path / "system", tmp_path / "merged", fmt="tailtune")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["system"]


def test_export_refuses_what_a_stock_class_cannot_hold(smoke_run, tmp_path):
    systems = smoke_run / "systems"
    with pytest.raises(TailtuneError, match=r"BertForSequenceClassification .*tanh.*--format tailtune"):
        deploy.export_merged(systems / "encoder-lora", tmp_path / "a")
    with pytest.raises(TailtuneError, match="no adapter to merge"):
        deploy.export_merged(systems / "tfidf-logreg", tmp_path / "c")
    with pytest.raises(TailtuneError, match="is a tfidf system"):
        deploy.export_merged(systems / "tfidf-logreg", tmp_path / "c")
    for tolerance in (-1.0, float("nan"), float("inf")):  # nan passed the check and then reported "0.00e+00 > nan"
        with pytest.raises(TailtuneError, match="--tolerance must be a finite number, 0 or more"):
            deploy.export_merged(systems / "encoder-lora", tmp_path / "e", fmt="tailtune", tolerance=tolerance)
    assert not any(tmp_path.iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(TailtuneError, match="--merged .*file is a file; name a new or empty folder"):
        deploy.export_merged(systems / "encoder-lora", tmp_path / "file", fmt="tailtune")
    # under a file: named before the model is loaded and run (it came after the check texts ran)
    with (
        mock.patch.object(TextClassifier, "load", side_effect=AssertionError("loaded the model")),
        pytest.raises(TailtuneError, match="--merged .*file/sub/x: .*file is a file, not a folder"),
    ):
        deploy.export_merged(systems / "encoder-lora", tmp_path / "file" / "sub" / "x", fmt="tailtune")
    (tmp_path / "file").unlink()
    result = cli("export", systems / "encoder-lora", "--merged", tmp_path / "d")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--format tailtune" in lines[0]


def test_a_text_typed_to_end_in_the_eos_string_exports_exactly(tmp_path):
    """With pad = eos, a text ending in "<|endoftext|>" was tokenised to end in the pad id, and the
    exported Qwen2ForSequenceClassification pooled the token before it: logits 5.65 apart (a review)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    make_lora_system(tmp_path / "system", "qwen2", seed=1)
    record = deploy.export_merged(tmp_path / "system", tmp_path / "hf")
    ours = TextClassifier.load(tmp_path / "system")
    eos = ours.tokenizer_.eos_token
    assert ours.tokenizer_.pad_token == eos and eos in ours.tokenizer_.all_special_tokens
    assert record["check"]["texts"] == len(deploy.export_check_texts()) + len(ours.tokenizer_.all_special_tokens)
    texts = [f"my bank charged a fee {eos}", "refund", f"{eos}{eos}"]
    assert ours.tokenizer_(texts[0])["input_ids"][-1] != ours.tokenizer_.pad_token_id  # read as characters
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.inference_mode():
        theirs = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(theirs, ours.predict_logits(texts), atol=1e-4)


def test_a_system_whose_tokenizer_reads_control_tokens_in_text_is_not_exported_wrong(tmp_path):
    """Systems saved before split_special_tokens: the export check's texts end in eos, so the
    stock class's different pooling is caught and the export refused, not written."""
    make_lora_system(tmp_path / "system", "qwen2", seed=1)
    config = tmp_path / "system" / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "split_special_tokens": False}))
    with pytest.raises(TailtuneError, match="merged export disagrees with the unmerged system"):
        deploy.export_merged(tmp_path / "system", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_runs_decoder_exports_to_the_stock_class(smoke_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    system = smoke_run / "systems" / "decoder-lora"
    clf = TextClassifier.load(system / "model")
    assert clf.model_.score.bias is None  # trained bias-free, the stock score layout
    deploy.export_merged(system, tmp_path / "hf")
    texts = run_test_texts(smoke_run)["text"].tolist()[:8]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    with torch.inference_mode():
        theirs = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(theirs, clf.predict_logits(texts), atol=1e-4)


def test_a_head_with_a_bias_is_refused_for_the_bias_free_stock_class(tmp_path):
    from safetensors.torch import load_file, save_file

    clf = make_lora_system(tmp_path / "dec", "qwen2", seed=3)
    head = load_file(str(tmp_path / "dec" / "head.safetensors"))  # a head saved with a bias (older runs)
    head["bias"] = torch.linspace(-1, 1, len(clf.classes_))
    save_file(head, str(tmp_path / "dec" / "head.safetensors"))
    with pytest.raises(TailtuneError, match=r"Qwen2ForSequenceClassification has no bias.*--format tailtune"):
        deploy.export_merged(tmp_path / "dec", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_modernbert_and_other_pooling_are_refused(tmp_path):
    make_lora_system(tmp_path / "mb", "modernbert", seed=5)
    with pytest.raises(TailtuneError, match="LayerNorm"):
        deploy.export_merged(tmp_path / "mb", tmp_path / "out")
    clf = make_lora_system(tmp_path / "dec", "qwen2", seed=5)
    meta = json.loads((tmp_path / "dec" / "tailtune.json").read_text())
    meta["pooling"] = "mean"
    (tmp_path / "dec" / "tailtune.json").write_text(json.dumps(meta))
    with pytest.raises(TailtuneError, match="pools with 'mean'"):
        deploy.export_merged(tmp_path / "dec", tmp_path / "out")
    assert clf.pooling_ == "last"


def test_non_mergeable_method_is_refused(tmp_path, monkeypatch):
    from tailtune import methods

    make_lora_system(tmp_path / "system", "bert", seed=6)
    lora = methods.get("lora")
    monkeypatch.setitem(methods.METHODS, "side", methods.Method("side", False, lora.apply, lora.save, lora.load))
    meta = json.loads((tmp_path / "system" / "tailtune.json").read_text())
    (tmp_path / "system" / "tailtune.json").write_text(json.dumps({**meta, "method": "side"}))
    with pytest.raises(TailtuneError, match="cannot be merged"):
        deploy.export_merged(tmp_path / "system", tmp_path / "out")


# ----------------------------------------------------------------------------- predict


def _input_frame(n: int = 53) -> pd.DataFrame:
    """Rows of very different lengths, an empty text, one of only invisible characters, and ids
    that are not in sorted order."""
    from tailtune.demo import make_demo_corpus

    texts = make_demo_corpus(n_classes=8, max_count=60, seed=9)["Consumer complaint narrative"].tolist()[:n]
    texts[::5] = ["refund"] * len(texts[::5])
    texts[3::7] = [" ".join(texts[:6])] * len(texts[3::7])
    texts[4] = ""
    texts[8] = "\u200b \ufeff"  # no tokens for a byte-level BPE tokenizer (Qwen2): predicted as an empty text
    rng = np.random.default_rng(0)
    return pd.DataFrame({"Complaint ID": rng.permutation(10_000)[:n] + 100, "text": texts})


@pytest.mark.parametrize(
    ("system", "suffix"),
    [
        ("decoder-lora", ".csv"),
        ("decoder-lora", ".jsonl"),
        ("decoder-lora", ".parquet"),
        ("encoder-probe", ".csv"),
        ("tfidf-logreg", ".csv"),
    ],
)
def test_predict_keeps_input_order_across_chunk_boundaries(smoke_run, tmp_path, system, suffix):
    frame = _input_frame()
    source = tmp_path / f"in{suffix}"
    {
        ".csv": lambda: frame.to_csv(source, index=False),
        ".jsonl": lambda: frame.to_json(source, orient="records", lines=True),
        ".parquet": lambda: frame.to_parquet(source),
    }[suffix]()
    system_dir = smoke_run / "systems" / system
    # fp32: in bf16 (auto, where native) other paddings move confidences by ~1e-3, not ~1e-5.
    small = deploy.predict_file(
        system_dir, source, tmp_path / "small.csv", k=3, chunk_size=7, batch_size=4, precision="fp32"
    )
    deploy.predict_file(system_dir, source, tmp_path / "whole.csv", k=3, chunk_size=10_000, precision="fp32")
    out = pd.read_csv(tmp_path / "small.csv", keep_default_na=False, na_values=[""])
    assert small["rows"] == len(frame) == len(out) and small["text_column"] == "text"
    assert list(out.columns) == [
        "Complaint ID",
        "label",
        "confidence",
        "label_2",
        "confidence_2",
        "label_3",
        "confidence_3",
    ]
    assert out["Complaint ID"].tolist() == frame["Complaint ID"].tolist()
    # Other chunk and batch sizes pad texts differently, which moves fp32 sums by ~1e-5.
    pd.testing.assert_frame_equal(
        out, pd.read_csv(tmp_path / "whole.csv", keep_default_na=False, na_values=[""]), atol=2e-4
    )
    real = ~frame["text"].isin(["", "\u200b \ufeff"])
    expected = deploy.load_predictor(system_dir, precision="fp32").predict(frame.loc[real, "text"].tolist())
    assert out.loc[real, "label"].tolist() == expected
    assert (out.loc[real, "confidence"] >= out.loc[real, "confidence_2"]).all()
    assert out.loc[~real, "label"].isna().all() and out.loc[~real, "confidence"].isna().all()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_predict_copies_ids_exactly(smoke_run, tmp_path, suffix):
    """A 64-bit id became 9007199254740992.0 and an id column went float in a chunk where one row
    lacked it: predictions could not be joined back."""
    ids = [9007199254740993, 3004095, None, 12]
    frame = pd.DataFrame({"text": ["refund", "debt", "fee", "card"]})
    source = tmp_path / f"in{suffix}"
    records = [{"text": t} if i is None else {"id": i, "text": t} for i, t in zip(ids, frame["text"], strict=True)]
    if suffix == ".jsonl":
        source.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":  # one array of records, read whole, then predicted in chunks
        source.write_text(json.dumps(records))
    else:  # written by pyarrow, without pandas' metadata (that would restore Int64)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": frame["text"].tolist()}), source)
    deploy.predict_file(
        smoke_run / "systems" / "tfidf-logreg", source, tmp_path / "out.csv", id_column="id", chunk_size=2
    )
    out = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert out["id"].tolist() == ["9007199254740993", "3004095", "", "12"]
    if suffix == ".jsonl":  # a chunk of lines with no id key, or no text key: "internal error KeyError: 'id'"
        source.write_text('{"id": 1, "text": "refund"}\n{"text": "debt"}\n{"text": "fee"}\n{"id": 4}\n')
        deploy.predict_file(
            smoke_run / "systems" / "tfidf-logreg", source, tmp_path / "out.csv", chunk_size=1, overwrite=True
        )
        out = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
        assert out["id"].tolist() == ["1", "", "", "4"]
        assert (out["label"][:3] != "").all() and out["label"][3] == ""
        # ids (and texts) that first appear after the first chunk were left out of the output
        source.write_text('{"body": "refund"}\n{"id": 7, "text": "debt"}\n')
        result = deploy.predict_file(
            smoke_run / "systems" / "tfidf-logreg", source, tmp_path / "out.csv", chunk_size=1, overwrite=True
        )
        assert (result["id_column"], result["text_column"]) == ("id", "text")
        out = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
        assert out["id"].tolist() == ["", "7"] and out["label"][0] == "" and out["label"][1] != ""
        # a first chunk with no id at all set the Parquet file's id type to null, and the next chunk's
        # ids could not be written into it
        deploy.predict_file(smoke_run / "systems" / "tfidf-logreg", source, tmp_path / "out.parquet", chunk_size=1)
        assert pd.read_parquet(tmp_path / "out.parquet")["id"].fillna("").tolist() == ["", "7"]
        # a text that is a list was classified as its printed form "['debt', 'fee']"
        source.write_text('{"text": "refund"}\n{"text": ["debt", "fee"]}\n')
        with pytest.raises(TailtuneError, match=r'text column .text. holds a list \(\["debt", "fee"\]\)'):
            deploy.predict_file(smoke_run / "systems" / "tfidf-logreg", source, tmp_path / "list.csv", chunk_size=1)
        assert not (tmp_path / "list.csv").exists()
        # true labels: a chunk without the label key had been "label column not found", mid-file
        test = run_test_texts(smoke_run).iloc[0]
        source.write_text(
            json.dumps({"text": "refund"}) + "\n" + json.dumps({"text": test["text"], "Product": test["label"]})
        )
        result = deploy.predict_file(
            smoke_run / "systems" / "tfidf-logreg",
            source,
            tmp_path / "out.csv",
            chunk_size=1,
            label_column="Product",
            overwrite=True,
        )
        expected = deploy.load_predictor(smoke_run / "systems" / "tfidf-logreg").predict([test["text"]])[0]
        assert result["rows"] == 2 and result["unknown_labels"] == {}
        assert result["accuracy"] == float(expected == test["label"])


def test_predict_reads_a_json_document_with_predicts_own_errors(smoke_run, tmp_path):
    """A .json input was refused ("cannot stream"); read whole, its errors name predict's options."""
    system = smoke_run / "systems" / "tfidf-logreg"
    source = tmp_path / "in.json"
    source.write_bytes('{"text": ["le caf\u00e9", "refund"]}'.encode("cp1252"))  # a file of columns
    result = cli("predict", system, "--input", source, "--output", tmp_path / "o.csv")
    assert result.exit_code == 2 and not (tmp_path / "o.csv").exists()
    assert result.stderr.strip().splitlines() == [
        f"error: {source} is not valid UTF-8: byte 0xe9 at line 1 (byte offset 17); if the file was saved in "
        "another encoding say which (--encoding cp1252), or re-save it as UTF-8"
    ]
    result = cli(
        "predict",
        system,
        "--input",
        source,
        "--output",
        tmp_path / "o.csv",
        "--encoding",
        "cp1252",
        "--chunk-size",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("2 rows -> ")
    expected = deploy.load_predictor(system).predict(["le caf\u00e9", "refund"])
    assert pd.read_csv(tmp_path / "o.csv")["label"].tolist() == expected
    source.write_text("[]")
    result = cli("predict", system, "--input", source, "--output", tmp_path / "o.csv", "--overwrite")
    assert result.exit_code == 2 and result.stderr.strip() == f"error: input file has no rows: {source}"
    source.write_text('[{"text": "refund"}]')
    result = cli("predict", system, "--input", source, "--output", tmp_path / "one.csv")
    assert result.exit_code == 0 and result.stdout.startswith("1 row -> "), result.output


def test_predict_on_a_csv_that_is_not_utf8_is_one_line(smoke_run, tmp_path):
    source = tmp_path / "excel.csv"
    source.write_bytes("Consumer complaint narrative\nle caf\u00e9\n".encode("cp1252"))
    result = cli("predict", smoke_run / "systems" / "tfidf-logreg", "--input", source, "--output", tmp_path / "o.csv")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: {source} is not valid UTF-8: byte 0xe9 at line 2 (byte offset 35); if the file was saved in "
        "another encoding say which (--encoding cp1252), or re-save it as UTF-8"
    )
    assert not (tmp_path / "o.csv").exists()
    result = cli(
        "predict",
        smoke_run / "systems" / "tfidf-logreg",
        "--input",
        source,
        "--output",
        tmp_path / "o.csv",
        "--encoding",
        "cp1252",
    )
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "o.csv")) == 1
    result = cli(
        "predict",
        smoke_run / "systems" / "tfidf-logreg",
        "--input",
        source,
        "--output",
        tmp_path / "p.csv",
        "--encoding",
        "klingon",
    )
    assert result.exit_code == 2 and result.stderr.strip().startswith("error: --encoding 'klingon' is not a known")


def test_predict_reads_a_plain_tsv_whose_text_starts_with_a_quote(smoke_run, tmp_path):
    """CSV quoting read the quote as opening a field: 3 of 4 rows vanished into one text."""
    source = tmp_path / "in.tsv"
    source.write_text('id\ttext\n1\t"Pay now" they said\n2\tsecond\n3\tthird "x"\n4\tfourth\n')
    deploy.predict_file(smoke_run / "systems" / "tfidf-logreg", source, tmp_path / "out.csv", chunk_size=2)
    assert pd.read_csv(tmp_path / "out.csv")["id"].tolist() == [1, 2, 3, 4]


def test_predict_command_runs(smoke_run, tmp_path):
    frame = _input_frame(20).rename(columns={"text": "Consumer complaint narrative"})
    frame.to_csv(tmp_path / "new.csv", index=False)
    result = tailtune(
        "predict",
        smoke_run / "systems" / "decoder-lora",
        "--input",
        tmp_path / "new.csv",
        "--output",
        tmp_path / "preds.csv",
        "--top-k",
        "2",
        "--chunk-size",
        "6",
    )
    assert result.returncode == 0, result.stderr
    out = pd.read_csv(tmp_path / "preds.csv")
    assert len(out) == 20 and out["Complaint ID"].tolist() == frame["Complaint ID"].tolist()
    assert {"label", "confidence", "label_2", "confidence_2"} <= set(out.columns)


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (
            "Complaint ID,body\n1,hello\n",
            [],
            "text column 'Consumer complaint narrative' not found",
        ),
        ("text\nhello\n", ["--text-column", "narrative"], "text column 'narrative' not found"),
        ("", [], "input file is empty"),
        ("text\n", [], "no rows"),
        ("text\nhello\n", ["--top-k", "99"], "more than the system's"),
        ("text\nhello\n", ["--batch-size", "-1"], "--batch-size must be at least 1"),
        ("text\nhello\n", ["--precision", "fp64"], "unknown precision 'fp64'"),
        (None, [], "input file not found"),
        ("text\nhello\n", ["--system", "."], "not a tailtune system folder"),
        ("text\nhello\n", ["--label-column", "Issue"], "label column 'Issue' not found"),
        (
            "text,Issue\nhello,Mortgage\nbye,Payday\n",
            ["--label-column", "Issue"],
            "none of the labels in column 'Issue' (e.g. 'Mortgage', 'Payday') is a class of this model",
        ),
    ],
)
def test_predict_bad_input_is_one_line_exit_2_and_no_output(smoke_run, tmp_path, content, args, message):
    source = tmp_path / "in.csv"
    if content is not None:
        source.write_text(content)
    system = smoke_run / "systems" / "tfidf-logreg"
    if args[:1] == ["--system"]:
        system, args = tmp_path, args[2:]
    output = tmp_path / "out" / "preds.csv"
    result = cli("predict", system, "--input", source, "--output", output, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not output.exists() and not (output.parent.exists() and any(output.parent.iterdir()))


def test_predict_refuses_to_write_over_its_input(smoke_run, tmp_path):
    """`--output` = `--input` replaced the user's file with the predictions."""
    source = tmp_path / "in.csv"
    source.write_text("text\nhello\n")
    result = cli("predict", smoke_run / "systems" / "tfidf-logreg", "--input", source, "--output", source)
    assert result.exit_code == 2 and "--output is the input file" in result.output
    assert source.read_text() == "text\nhello\n"


def test_predict_checks_true_labels_against_the_models_classes(smoke_run, tmp_path):
    test = run_test_texts(smoke_run)
    frame = pd.DataFrame({"text": test["text"], "Issue": test["label"]}).head(30).reset_index(drop=True)
    frame.loc[[3, 7], "Issue"] = "A label the model never saw"
    frame.to_csv(tmp_path / "labelled.csv", index=False)
    system = smoke_run / "systems" / "tfidf-logreg"
    done = deploy.predict_file(system, tmp_path / "labelled.csv", tmp_path / "p.csv", label_column="Issue")
    assert done["unknown_labels"] == {"A label the model never saw": 2}
    predicted = pd.read_csv(tmp_path / "p.csv")["label"]
    known = frame["Issue"] != "A label the model never saw"
    assert done["accuracy"] == pytest.approx((predicted[known] == frame["Issue"][known]).mean())
    result = cli(
        "predict",
        system,
        "--input",
        tmp_path / "labelled.csv",
        "--output",
        tmp_path / "q.csv",
        "--label-column",
        "Issue",
    )
    assert result.exit_code == 0, result.output
    assert "2 rows carry labels the model cannot predict: 'A label the model never saw' (2)" in result.output


def test_a_run_made_with_relative_paths_deploys_from_anywhere(tmp_path, small_frame, monkeypatch):
    """The run recorded ./mybert and d.csv as typed: predict, export and bench failed from any other
    folder ('backbone folder not found: ./mybert', 'data file not found: d.csv')."""
    import shutil

    from tailtune import backbones

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    shutil.copytree(backbones.make_tiny("bert"), work / "mybert")
    small_frame.to_csv(work / "d.csv", index=False)
    monkeypatch.chdir(work)
    made = cli(
        "run",
        "smoke",
        "encoder.name=./mybert",
        "--data",
        "d.csv",
        "--systems",
        "tfidf-logreg,encoder-lora",
        "--out",
        "r",
        "--no-report",
    )
    assert made.exit_code == 0, made.output

    monkeypatch.chdir(elsewhere)
    small_frame.head(5).to_csv("in.csv", index=False)
    system = work / "r" / "systems" / "encoder-lora"
    predicted = cli("predict", system, "--input", "in.csv", "--output", "out.csv")
    assert predicted.exit_code == 0, predicted.output
    assert len(pd.read_csv("out.csv")) == 5
    exported = cli("export", system, "--merged", "merged", "--format", "tailtune")
    assert exported.exit_code == 0, exported.output
    benched = cli(
        "bench", work / "r", "--systems", "encoder-lora", "--max-texts", "8", "--repeats", "1", "--batch-sizes", "8"
    )
    assert benched.exit_code == 0, benched.output

    # The merged export holds the whole backbone: it predicts where the base folder is gone.
    (work / "mybert").rename(work / "gone")
    alone = cli("predict", "merged", "--input", "in.csv", "--output", "merged.csv")
    assert alone.exit_code == 0, alone.output
    assert pd.read_csv("merged.csv")["label"].tolist() == pd.read_csv("out.csv")["label"].tolist()


def test_predict_scores_joined_label_columns_as_training_joined_them(tmp_path, small_csv):
    """A run trained on `Product+Issue` could not be scored: predict --label-column took one column."""
    out = smoke_run_quietly(
        tmp_path / "run", "systems=[tfidf-logreg]", f"data.path={small_csv}", "data.label_column=Product+Issue"
    )
    system = out / "systems" / "tfidf-logreg"
    frame = pd.read_csv(small_csv)
    frame.loc[0, "Issue"] = ""  # a missing part: no label, as in training
    frame.to_csv(tmp_path / "labelled.csv", index=False)
    done = deploy.predict_file(system, tmp_path / "labelled.csv", tmp_path / "p.csv", label_column="Product+Issue")
    assert done["unknown_labels"] == {}
    predicted = pd.read_csv(tmp_path / "p.csv")["label"][1:]
    truth = (frame["Product"] + " / " + frame["Issue"])[1:]
    assert done["accuracy"] == pytest.approx((predicted == truth).mean())
    result = cli(
        "predict",
        system,
        "--input",
        tmp_path / "labelled.csv",
        "--output",
        tmp_path / "q.csv",
        "--label-column",
        "Product+Isue",
    )
    assert result.exit_code == 2 and "label column 'Isue' not found" in result.output, result.output


def test_predict_on_a_failed_system_says_it_failed_and_why(tmp_path):
    """It said 'system folder not found' for a system the run had tried and marked failed."""
    failed = tmp_path / "systems" / ".encoder-lora.failed"
    failed.mkdir(parents=True)
    (failed / "reason.txt").write_text("collapsed: predicts 1 of 12 classes\n")
    (tmp_path / "in.csv").write_text("text\nhello\n")
    result = cli(
        "predict", tmp_path / "systems" / "encoder-lora", "--input", tmp_path / "in.csv", "--output", tmp_path / "o.csv"
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: encoder-lora failed in this run, so it has no model: collapsed: predicts 1 of 12 classes "
        f"(see {failed / 'reason.txt'})"
    )


def test_predict_on_a_run_directory_names_its_systems(smoke_run, tmp_path):
    (tmp_path / "in.csv").write_text("text\nhello\n")
    result = cli("predict", smoke_run, "--input", tmp_path / "in.csv", "--output", tmp_path / "o.csv")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: {smoke_run} is a run directory; pass one of its systems, e.g. ")
    assert "tfidf-logreg" in result.stderr


def test_predict_leaves_a_text_with_no_tokens_unlabelled(smoke_run, tmp_path):
    """A text the tokenizer reads as no token (here: characters the tiny Qwen2 vocabulary lacks)
    stopped the whole file with an error whose "text N" counted within a chunk, not the file."""
    system_dir = smoke_run / "systems" / "decoder-lora"
    texts = ["refund", "ZZZ", "debt", "\u20ac\u20ac", "fee", "card"]
    predictor = deploy.load_predictor(system_dir, precision="fp32")
    with pytest.raises(TailtuneError, match=r"text 1 \('ZZZ'\) has no tokens for this tokenizer \(and 1 more\)"):
        predictor.predict(texts[:4])
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": texts}).to_csv(source, index=False)
    result = cli(
        "predict",
        system_dir,
        "--input",
        source,
        "--output",
        tmp_path / "out.csv",
        "--chunk-size",
        "4",
        "--precision",
        "fp32",
    )
    assert result.exit_code == 0, result.output
    assert "2 rows have no text to classify (empty, or no tokens) and are left unlabelled" in result.stdout
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False, na_values=[""])
    readable = [0, 2, 4, 5]
    assert out.loc[readable, "label"].tolist() == predictor.predict([texts[i] for i in readable])
    assert out.loc[[1, 3], "label"].isna().all() and out.loc[[1, 3], "confidence"].isna().all()
    only = tmp_path / "only.csv"
    pd.DataFrame({"text": ["ZZZ"]}).to_csv(only, index=False)
    assert deploy.predict_file(system_dir, only, tmp_path / "o.csv")["unlabelled"] == 1


def test_prediction_frame_rounds_confidences_to_six_decimals():
    """Fails when predict's confidences are not rounded to 6 decimals (deploy.prediction_frame)."""
    import pandas as pd

    from tailtune.deploy import prediction_frame

    proba = np.array([[0.123456789, 0.876543211, 0.0], [0.5, 0.2999999999, 0.2000000001]])
    predictor = types.SimpleNamespace(classes_=["x", "y", "z"], predict_proba=lambda texts, progress=None: proba)
    out = prediction_frame(predictor, pd.DataFrame({"id": [7, 8], "text": ["a", "b"]}), "text", "id", k=2)
    assert out["label"].tolist() == ["y", "x"] and out["label_2"].tolist() == ["x", "y"]
    assert out["confidence"].tolist() == [0.876543, 0.5]
    assert out["confidence_2"].tolist() == [0.123457, 0.3]
    assert out["id"].tolist() == ["7", "8"]


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _drop_classes(path: Path) -> None:
    meta = json.loads(path.read_text())
    del meta["classes"]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("system", "file", "damage", "message"),
    [
        ("encoder-lora", "tailtune.json", lambda p: _truncate(p, 100), "tailtune.json is not readable JSON"),
        ("tfidf-logreg", "pipeline.joblib", lambda p: _truncate(p, 1000), "could not load the model saved in"),
        ("encoder-probe", "probe.joblib", lambda p: _truncate(p, 100), "could not load the model saved in"),
        ("encoder-probe", "tailtune.json", _drop_classes, "tailtune.json lacks 'classes'"),
    ],
)
def test_a_damaged_saved_system_is_one_line_exit_2(smoke_run, tmp_path, system, file, damage, message):
    """A review: predict, serve and bench read tailtune.json and the joblib files outside
    TextClassifier.load's guard, and a torn one was an internal error (exit 1)."""
    import shutil

    folder = tmp_path / system
    shutil.copytree(smoke_run / "systems" / system, folder)
    damage(folder / "model" / file)
    source = tmp_path / "in.csv"
    source.write_text("text\nhello\n")
    result = cli("predict", folder, "--input", source, "--output", tmp_path / "out.csv")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and system in lines[0], result.output
    assert not (tmp_path / "out.csv").exists()


def test_predict_refuses_an_existing_output_unless_told_to_overwrite(smoke_run, tmp_path):
    """A review: predict wrote over any file, the run's own predictions.csv included."""
    source, output = tmp_path / "in.csv", tmp_path / "preds.csv"
    source.write_text("text\nhello\n")
    output.write_text("keep me\n")
    system = smoke_run / "systems" / "tfidf-logreg"
    result = cli("predict", system, "--input", source, "--output", output)
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output, result.output
    assert output.read_text() == "keep me\n"
    result = cli("predict", system, "--input", source, "--output", output, "--engine", "ray", "--overwrite")
    assert result.exit_code == 2 and "--overwrite works with --engine local only" in result.output, result.output
    result = cli("predict", system, "--input", source, "--output", output, "--overwrite")
    assert result.exit_code == 0, result.output
    assert pd.read_csv(output).columns.tolist() == ["label", "confidence"]


@pytest.mark.parametrize(
    ("make", "message"), [("folder", "is a folder; name a file"), ("parent-file", "is a file, not a folder")]
)
def test_predict_checks_the_output_path_before_anything_is_predicted(smoke_run, tmp_path, monkeypatch, make, message):
    """A review: a folder as --output failed after the whole input was predicted, naming a hidden temp file."""
    source = tmp_path / "in.csv"
    source.write_text("text\nhello\n")
    if make == "folder":
        output = tmp_path / "preds.csv"
        output.mkdir()
    else:
        (tmp_path / "plain").write_text("")
        output = tmp_path / "plain" / "sub" / "preds.csv"
    monkeypatch.setattr(deploy, "load_predictor", lambda *a, **k: pytest.fail("the model was loaded"))
    result = cli("predict", smoke_run / "systems" / "tfidf-logreg", "--input", source, "--output", output)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and ".tmp" not in lines[0], result.output


def test_a_first_row_longer_than_the_header_is_refused_not_shifted(smoke_run, tmp_path):
    """A review: pandas made the extra leading field an index, so ids were classified as texts,
    the texts were dropped, and predict exited 0."""
    from tailtune.data import read_table

    source = tmp_path / "in.csv"
    source.write_text("id,text\n1,hello fee,extra\n2,late fee\n3,card\n")
    output = tmp_path / "preds.csv"
    result = cli("predict", smoke_run / "systems" / "tfidf-logreg", "--input", source, "--output", output)
    assert result.exit_code == 2, result.output
    assert "its first row has more fields than the header's 2" in result.output and not output.exists()
    with pytest.raises(TailtuneError, match="first row has more fields than the header's 2"):
        read_table(source)


def test_an_unknown_or_missing_device_is_one_line(smoke_run):
    system = smoke_run / "systems" / "tfidf-logreg"
    with pytest.raises(TailtuneError, match="device must be auto, cpu or cuda, got 'tpu'"):
        deploy.load_predictor(system, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TailtuneError, match="this machine has no CUDA GPU"):
            deploy.load_predictor(system, device="cuda")


def test_predict_top_k_takes_a_whole_number(tmp_path):
    """A review: 2.0 and "2" were raw TypeErrors from numpy and from a comparison."""
    clf = make_lora_system(tmp_path / "model", "bert", 1)
    for k in (2.0, "2", True):
        with pytest.raises(TailtuneError, match="k must be between 1 and the"):
            clf.predict_top_k(["a fee"], k)
    assert clf.predict_top_k(["a fee"], np.int64(2))[0].shape == (1, 2)


def test_a_missing_run_or_a_system_still_training_says_so(tmp_path):
    """A review: "is not a finished tailtune run (no comparison.csv)" for a path that does not
    exist, and "system folder not found" for a system whose training is under way."""
    result = cli("bench", tmp_path / "nope")
    assert result.exit_code == 2 and f"run directory not found: {tmp_path / 'nope'}" in result.output
    (tmp_path / "systems" / ".encoder-lora.partial").mkdir(parents=True)
    (tmp_path / "in.csv").write_text("text\nhello\n")
    result = cli(
        "predict", tmp_path / "systems" / "encoder-lora", "--input", tmp_path / "in.csv", "--output", tmp_path / "o.csv"
    )
    assert result.exit_code == 2 and "encoder-lora is still being trained" in result.output, result.output
