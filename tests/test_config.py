import pytest

from tailtune.config import PRESET_DIR, Config, available_presets, dump, load_config
from tailtune.errors import TailtuneError


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.systems


def test_presets_include_the_documented_ones():
    assert {"demo", "smoke", "cpu-real", "cfpb-paper"} <= set(available_presets())


def test_paper_preset_matches_the_reference_study():
    cfg = load_config("cfpb-paper")
    assert (cfg.method.rank, cfg.method.alpha, cfg.train.epochs) == (16, 32, 3)
    assert cfg.method.targets == ["attention", "ffn"]
    assert cfg.encoder.name == "answerdotai/ModernBERT-base"
    assert cfg.decoder.name == "Qwen/Qwen2.5-0.5B"
    assert cfg.data.tier_edges[0] == 27


def test_dotted_overrides_are_typed():
    cfg = load_config("demo", ["train.epochs=3", "method.rank=8", "data.path=x.csv", "systems=tfidf-logreg,encoder-lora"])
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    assert cfg.method.rank == 8
    assert cfg.data.path == "x.csv"
    assert cfg.systems == ["tfidf-logreg", "encoder-lora"]
    # YAML 1.1 reads 5e-4 as a string; a float field still takes it
    assert load_config("demo", ["train.lr=5e-4", "train.head_lr=1e-3"]).train.lr == 5e-4


def test_demo_tiers_apply_to_the_demo_corpus_only():
    demo = load_config("demo")
    assert demo.data.effective_tier_edges == [10, 40, 150]  # the synthetic corpus is ~20x smaller
    # a real file with the default preset gets the reference study's edges
    assert load_config("demo", ["data.path=complaints.csv"]).data.effective_tier_edges == [27, 99, 999]


def test_yaml_file_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("out: somewhere\ntrain: {epochs: 2}\n")
    cfg = load_config(str(path))
    assert cfg.out == "somewhere" and cfg.train.epochs == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "did you mean 'train.epochs'"),
        (["trian.epochs=3"], "did you mean 'train'"),
        (["train.epochs=abc"], "must be float"),
        (["method.targets=[attn]"], "unknown target role 'attn'"),
        (["systems=encoder-lorax"], "unknown system 'encoder-lorax'"),
        (["systems=encoder-generate"], r"unknown system 'encoder-generate' \(did you mean 'decoder-generate'\?\).*"
                                       r"decoder-generate\[-logit_adjusted\].*schemes: none, sqrt_inverse"),
        (["train.weighting=sqrt"], "unknown class weighting"),
        (["data.tier_names=[a,b]"], "tier_names needs 4 names"),
        (["train.precision=fp8"], "precision must be one of"),
        (["train.logit_tau=0"], "logit_tau must be > 0"),
        (["train.checkpoint_every=-1"], "checkpoint_every must be >= 0"),
        (["method.dropout=1.5"], "method.dropout must be in"),
        (["train.lr=nan"], "lr >= 0"),
        (["train.epochs=inf"], "epochs > 0"),
        (["data.max_rows=0"], "data.max_rows must be >= 1"),
        (["train.early_stopping_patience=0"], "early_stopping_patience must be >= 1"),
        (["tfidf.C=0"], "tfidf: C > 0"),
        (["tfidf.ngram_max=0"], "tfidf: C > 0"),
        # a system name's settings follow the same rules
        (["systems=encoder-lora@rank=0"], "system 'encoder-lora@rank=0': rank must be >= 1"),
        (["systems=encoder-lora@dropout=2"], "system 'encoder-lora@dropout=2': dropout must be in"),
        (["systems=encoder-lora@lr=-1"], "lr and head_lr must be >= 0"),
        (["systems=decoder-lora@epochs=0"], "system 'decoder-lora@epochs=0': epochs must be > 0"),
        (["data.demo.tier_edges=[40,10]"], "data.demo.tier_edges must be strictly increasing"),
        (["noequals"], "must look like key=value"),
    ],
)
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(TailtuneError, match=message):
        load_config("demo", overrides)


def test_unknown_preset_suggests():
    with pytest.raises(TailtuneError, match="did you mean 'demo'"):
        load_config("dmeo")


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """`tailtune run smoke --out smoke`, run again to resume: "config 'smoke' is a directory"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").mkdir()
    assert load_config("smoke") == load_config(str(PRESET_DIR / "smoke.yaml"))
    with pytest.raises(TailtuneError, match="is a directory"):
        load_config("./smoke")


def test_dump_round_trips(tmp_path):
    cfg = load_config("smoke", ["train.epochs=1"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump(cfg))
    assert load_config(str(path)) == cfg
