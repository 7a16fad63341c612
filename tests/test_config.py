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
    cfg = load_config(
        "demo", ["train.epochs=3", "method.rank=8", "data.path=x.csv", "systems=tfidf-logreg,encoder-lora"]
    )
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
        (["systems=encoder-lora-weigted"], r"did you mean 'encoder-lora-weighted'\?"),  # it said 'encoder-lora'
        (["tune.lr_factors=[1,1]"], "tune.lr_factors lists a factor twice"),
        (
            ["systems=encoder-generate"],
            r"unknown system 'encoder-generate' \(did you mean 'decoder-generate'\?\).*"
            r"decoder-generate\[-logit_adjusted\].*schemes: none, sqrt_inverse",
        ),
        (["train.weighting=sqrt"], "unknown class weighting"),
        (["data.tier_names=[a,b]"], "tier_names needs 4 names"),
        (["train.precision=fp8"], "precision must be one of"),
        (["train.logit_tau=0"], r"logit_tau must be in \(0, 100\]"),
        (["train.logit_tau=1e300"], r"logit_tau must be in \(0, 100\]"),
        (["train.weighting=balanced"], "did you mean 'balanced_sampling'"),
        # found by review: these trained, or failed after the run directory was written
        (["encoder.lr=-1"], r"encoder.lr must be >= 0 \(or null for train.lr\)"),
        (["decoder.lr=nan"], "decoder.lr must be >= 0"),
        (["data.seed=-3"], r"data.seed must be between 0 and 4294967295"),
        (["data.seed=4294967296"], "data.seed must be between 0 and 4294967295"),
        (["data.demo.seed=-1"], "data.demo.seed must be between"),
        (["train.seed=-1"], "train.seed must be between"),
        (["eval.seed=4294967296"], "eval.seed must be between"),
        (["train.weight_decay=-1"], "train.weight_decay must be >= 0"),
        (["train.weight_decay=inf"], "train.weight_decay must be >= 0"),
        (["method.targets=[]"], "method.targets must name at least one role"),
        (["data.demo.exponent=nan"], "data.demo.exponent must be >= 0"),
        (["data.tier_names=[x,x,x,x]"], "data.tier_names names a tier twice"),
        (["systems=encoder-lora@rank=8+rank=4"], "system 'encoder-lora@rank=8\\+rank=4' sets rank twice"),
        (
            ["systems=encoder-lora@lr=1e-4,encoder-lora@lr=0.0001"],
            "systems 'encoder-lora@lr=1e-4' and 'encoder-lora@lr=0.0001' are the same system spelt two ways",
        ),
        (["train="], r"'train' is a section; set its keys one by one \(train.<key>=value\)"),
        (["data=null"], "'data' is a section"),
        (["train.checkpoint_every=-1"], "checkpoint_every must be >= 0"),
        (["method.dropout=1.5"], "method.dropout must be in"),
        (["train.lr=nan"], "^train.lr must be a number >= 0, got nan$"),
        (["train.epochs=inf"], "^train.epochs must be a number > 0, got inf$"),
        (["train.grad_accum=0"], "^train.grad_accum must be a number >= 1, got 0$"),
        (["encoder.eval_batch_size=0"], "^encoder.eval_batch_size must be a number >= 1, got 0$"),
        (["tune.max_rows=1"], "^tune.max_rows must be a number >= 2, got 1$"),
        (["data.max_rows=0"], "data.max_rows must be >= 1"),
        (["train.early_stopping_patience=0"], "early_stopping_patience must be >= 1"),
        (["tfidf.C=0"], "^tfidf.C must be a number > 0, got 0"),
        (["tfidf.ngram_max=0"], "^tfidf.ngram_max must be a number >= 1, got 0$"),
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


def test_an_empty_config_file_is_refused(tmp_path):
    """A review: an empty (or truncated to nothing) YAML started a run on the built-in defaults."""
    for text in ("", "# only a comment\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(TailtuneError, match=r"config .*empty.yaml is empty; give it keys, or name a preset"):
            load_config(str(tmp_path / "empty.yaml"))


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


def test_paths_and_column_names_in_overrides_are_text_as_typed():
    """YAML parsing cut "base.csv #old.csv" at the comment (the run read another file) and made
    columns named yes or 2024 a bool and an int."""
    cfg = load_config(
        "demo",
        [
            "data.path=/d/base.csv #old.csv",
            "data.label_column=yes",
            "data.text_column=2024",
            "out=runs/a: b",
            "encoder.name=my model #2",
        ],
    )
    assert cfg.data.path == "/d/base.csv #old.csv"
    assert (cfg.data.label_column, cfg.data.text_column) == ("yes", "2024")
    assert (cfg.out, cfg.encoder.name) == ("runs/a: b", "my model #2")
    assert load_config("demo", ['data.path="quoted name.csv"']).data.path == "quoted name.csv"
    assert load_config("demo", ["data.path = complaints.csv\r"]).data.path == "complaints.csv"  # spaces, CRLF scripts
    assert load_config("demo", ['data.label_column=" Issue "']).data.label_column == " Issue "
    assert load_config("demo", ["data.path="]).data.path is None  # empty: the demo corpus
    assert load_config("demo", ["data.path=null"]).data.path is None


def test_a_section_override_merges_into_the_section():
    """train={epochs: 1} replaced the preset's whole train section with the defaults."""
    smoke = load_config("smoke")
    cfg = load_config("smoke", ["train={epochs: 1}"])
    assert cfg.train.epochs == 1 and cfg.train.lr == smoke.train.lr != load_config("demo").train.lr


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train: {epochs: 1}\nout: x\ntrain: {lr: 0.001}\n")
    with pytest.raises(TailtuneError, match=r"not valid YAML: key 'train' appears twice \(line 3\)"):
        load_config(str(path))
    with pytest.raises(
        TailtuneError, match="override value '{epochs: 1, epochs: 2}' is not valid: key 'epochs' appears twice"
    ):
        load_config("smoke", ["train={epochs: 1, epochs: 2}"])
    # merge keys may repeat what they merge; an unhashable key is YAML's own one-line error
    path.write_text(
        "encoder: &bb {max_length: 64, batch_size: 8}\ndecoder: {<<: *bb, batch_size: 4}\n"
        "method: {<<: [{rank: 4}], alpha: 8}\n"
    )
    cfg = load_config(str(path))
    assert (cfg.decoder.max_length, cfg.decoder.batch_size, cfg.method.rank) == (64, 4, 4)
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(TailtuneError, match="not valid YAML: while constructing a mapping"):
        load_config(str(path))


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "cp1252.yaml"
    path.write_bytes("out: caf\u00e9\n".encode("cp1252"))
    with pytest.raises(TailtuneError, match=r"cp1252.yaml is not valid UTF-8 \(byte 0xe9 at offset 8\); re-save it"):
        load_config(str(path))


def test_a_comma_list_override_refuses_an_empty_or_repeated_name():
    """A review: systems=a,,b dropped the empty entry without a word, while --systems of bench refused it."""
    with pytest.raises(
        TailtuneError, match=r"^config key 'systems' value 'tfidf-logreg,,encoder-probe' has an empty name"
    ):
        load_config(None, ["systems=tfidf-logreg,,encoder-probe"])
    with pytest.raises(
        TailtuneError, match=r"^config key 'systems' value 'tfidf-logreg, tfidf-logreg' names 'tfidf-logreg' twice"
    ):
        load_config(None, ["systems=tfidf-logreg, tfidf-logreg"])
    assert load_config(None, ["systems= tfidf-logreg , encoder-probe"]).systems == ["tfidf-logreg", "encoder-probe"]


def test_a_backbone_s_own_lr_and_epochs_win_over_the_train_section_s():
    from tailtune.config import BackboneConfig, TrainConfig

    train = TrainConfig(lr=1e-3, epochs=3)
    assert BackboneConfig().effective_lr(train) == 1e-3 and BackboneConfig().effective_epochs(train) == 3
    own = BackboneConfig(lr=5e-4, epochs=0.5)
    assert own.effective_lr(train) == 5e-4 and own.effective_epochs(train) == 0.5
