import numpy as np
import pandas as pd
import pytest

from tailtune.config import DataConfig
from tailtune.data import assign_tiers, clean, prepare, read_table, stratified_split, tier_ranges
from tailtune.errors import TailtuneError

TEXT = "Consumer complaint narrative"


def test_reads_csv_jsonl_parquet_alike(tmp_path, small_frame):
    small_frame.to_csv(tmp_path / "a.csv", index=False)
    small_frame.to_json(tmp_path / "a.jsonl", orient="records", lines=True)
    small_frame.to_parquet(tmp_path / "a.parquet")
    frames = [prepare(DataConfig(path=str(tmp_path / f"a.{ext}"))).frame for ext in ("csv", "jsonl", "parquet")]
    for other in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], other)


def test_cleaning_counts_every_dropped_row():
    df = pd.DataFrame(
        {
            TEXT: [
                "a b",
                "  ",
                "dup text",
                "dup text",
                "conflict",
                "conflict",
                "x",
                "y",
                "z",
                "w",
                None,
                "lonely",
                "\u200b\u00a0\u2060",
            ],
            "Issue": ["A", "A", "A", "A", "A", "B", "B", "B", "A", "", "A", "C", "A"],
        }
    )
    out, report = clean(df, DataConfig(min_class_count=2))
    d = report["dropped"]
    assert d["empty_text"] == 3  # "  ", None, and invisible characters only (no tokens for Qwen2's tokenizer)
    assert d["empty_label"] == 1
    assert d["conflicting_duplicates"] == 2 and report["conflicting_duplicate_texts"] == 1
    assert d["duplicate_text"] == 1
    assert d["rare_class_rows"] == 1 and report["dropped_classes"] == ["C"]
    assert report["rows_read"] == 13
    assert report["rows_kept"] == len(out) == 13 - sum(d.values())
    assert set(out["label"]) == {"A", "B"}


def test_label_case_variants_are_reported_not_merged():
    df = pd.DataFrame({TEXT: list("abcdef"), "Issue": ["Fees", "fees ", "Fees", "fees ", "X", "X"]})
    out, report = clean(df, DataConfig())
    assert report["possible_duplicate_labels"] == [["Fees", "fees "]]
    assert out["label"].nunique() == 3


def test_combined_label_scheme():
    df = pd.DataFrame({TEXT: list("abcd"), "Product": ["P", "P", "Q", "Q"], "Issue": ["i", "i", "i", "i"]})
    out, _ = clean(df, DataConfig(label_column="Product+Issue"))
    assert sorted(out["label"].unique()) == ["P / i", "Q / i"]


def test_split_is_stratified_seeded_and_keeps_tiny_classes_in_test():
    labels = pd.Series(["big"] * 200 + ["mid"] * 20 + ["tiny"] * 3 + ["two"] * 2)
    a = stratified_split(labels, 0.15, 0.15, seed=0)
    b = stratified_split(labels, 0.15, 0.15, seed=0)
    c = stratified_split(labels, 0.15, 0.15, seed=1)
    assert (a == b).all() and not (a == c).all()
    table = pd.crosstab(labels, a)
    assert table.loc["big", "test"] == 30 and table.loc["big", "val"] == 30
    assert table.loc["mid", "test"] == 3
    assert (table.loc["tiny"] == 1).all()  # 1 train, 1 val, 1 test
    assert table.loc["two", "train"] == 1 and table.loc["two", "test"] == 1
    assert (table["train"] >= 1).all()


def test_tiers_use_inclusive_upper_edges():
    names = ["rare", "uncommon", "common", "head"]
    assert assign_tiers([4, 27, 28, 99, 100, 999, 1000], [27, 99, 999], names) == [
        "rare",
        "rare",
        "uncommon",
        "uncommon",
        "common",
        "common",
        "head",
    ]
    assert tier_ranges([27, 99, 999], names) == {
        "rare": "<=27",
        "uncommon": "28-99",
        "common": "100-999",
        "head": ">=1000",
    }


def test_prepare_saves_tiers_with_class_lists(small_csv):
    p = prepare(DataConfig(path=str(small_csv), tier_edges=[10, 30], tier_names=["rare", "mid", "head"]))
    s = p.summary
    assert sum(len(v) for v in s["tiers"]["classes"].values()) == s["n_classes"] == len(p.classes)
    for cls, tier in zip(p.classes, p.tiers, strict=True):
        assert cls in s["tiers"]["classes"][tier]
    assert np.array_equal(p.train_counts, np.bincount(p.y("train"), minlength=len(p.classes)))
    assert set(p.frame["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        (None, {}, "data file not found"),
        ("", {}, "data file is empty"),
        ("a,b\n", {}, "text column 'Consumer complaint narrative' not found"),
        (f"{TEXT},Issu\nx,A\n", {}, "did you mean 'Issu'"),
        (f"{TEXT},issue\nx,A\n", {}, "label column 'Issue' not found \\(did you mean 'issue'\\?\\)"),  # case aside
        (f"{TEXT},Issue\n", {}, "header but no rows"),
        (f"{TEXT},Issue\nx,A\ny,A\nz,A\n", {}, "only 1 class"),
        (f"{TEXT},Issue\n ,A\n ,B\n", {}, "no usable rows"),
        # found by review: "all 10 classes have fewer than 2 rows", and labels "A / A"
        (f"{TEXT},Issue\nx,A\n", {"label_column": TEXT}, "is also the label column"),
        (f"{TEXT},Issue\nx,A\n", {"label_column": f"Issue+{TEXT}"}, "is also the label column"),
        (f"{TEXT},Issue\nx,A\n", {"label_column": "Issue+Issue"}, "names a column twice"),
        # a review: a spreadsheet's ';' CSV only listed the one odd column name
        (f"{TEXT};Issue\nx;A\n", {}, f"columns are: {TEXT};Issue; the header looks separated by ';'"),
        (f"{TEXT}|Issue\nx|A\n", {}, "the header looks separated by '[|]', and tailtune reads commas"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, kwargs, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TailtuneError, match=message) as err:
        prepare(DataConfig(path=str(path), **kwargs))
    assert "\n" not in str(err.value)


def test_non_utf8_and_directory(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(f"{TEXT},Issue\ncaf\xe9,A\n".encode("latin-1"))
    with pytest.raises(TailtuneError, match="not valid UTF-8"):
        read_table(path)
    with pytest.raises(TailtuneError, match="is a directory"):
        read_table(tmp_path)
    with pytest.raises(TailtuneError, match="unsupported data file type"):
        (tmp_path / "x.xlsx").write_text("x")
        read_table(tmp_path / "x.xlsx")


def test_bom_and_crlf_and_quoted_newlines(tmp_path):
    path = tmp_path / "win.csv"
    body = f'{TEXT},Issue\r\n"line one\r\nline two",A\r\nsecond,A\r\nthird,B\r\nfourth,B\r\n'
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    out = read_table(path)
    assert list(out.columns) == [TEXT, "Issue"]
    assert len(out) == 4 and "line two" in out[TEXT][0]


def test_tsv_is_read_quoted_or_literally_as_it_was_written(tmp_path):
    """A plain TSV text starting with a quote made CSV quoting swallow the rows up to the next
    quote, with no error; Excel's tab-delimited export quotes fields with tabs or line breaks."""
    plain = tmp_path / "plain.tsv"
    plain.write_text(f'{TEXT}\tIssue\n"Pay now" they said\tA\nsecond\tB\nthird "x" fee\tA\n"open quote\tB\n')
    out = read_table(plain)
    assert out[TEXT].tolist() == ['"Pay now" they said', "second", 'third "x" fee', '"open quote']
    assert out["Issue"].tolist() == ["A", "B", "A", "B"]
    excel = tmp_path / "excel.tsv"
    excel.write_text(f'{TEXT}\tIssue\n"tab\there"\tA\n"two\nlines"\tB\n"""quoted"" word"\tA\nplain\tB\n')
    out = read_table(excel)
    assert out[TEXT].tolist() == ["tab\there", "two\nlines", '"quoted" word', "plain"]
    assert out["Issue"].tolist() == ["A", "B", "A", "B"]
    # a stray quote at the start of one text and at the end of a later one: a well-formed quoted
    # field, but one that spans whole rows (tab and line break inside); and a short row
    stray = tmp_path / "stray.tsv"
    stray.write_text(f'{TEXT}\tIssue\n"Pay now, they wrote\tA\nsecond\tB\nthe TV was 55"\tA\nfourth\tB\nno label\n')
    out = read_table(stray)
    assert out[TEXT].tolist() == ['"Pay now, they wrote', "second", 'the TV was 55"', "fourth", "no label"]
    assert out["Issue"].tolist() == ["A", "B", "A", "B", ""]
    wide = tmp_path / "wide.tsv"
    wide.write_text(f"{TEXT}\tIssue\none\tA\ntwo\tB\textra\n")
    with pytest.raises(TailtuneError, match="line 3 has 3 tab-separated fields, the header 2"):
        read_table(wide)


def test_max_rows_sample_keeps_no_class_below_min_class_count():
    """Sampled after the class-size rule, 300 of the products rows kept a class with 1 row."""
    labels = ["big"] * 400 + ["mid"] * 60 + ["small"] * 12
    frame = pd.DataFrame({TEXT: [f"complaint number {i}" for i in range(len(labels))], "Issue": labels})
    for seed in range(5):
        p = prepare(DataConfig(max_rows=100, min_class_count=5, seed=seed), frame=frame, source="test")
        counts = p.frame["label"].value_counts()
        assert counts.min() >= 5, (seed, counts.to_dict())
        assert len(p.frame) + p.summary["dropped"]["rare_class_rows"] == 100


def test_a_missing_part_of_a_joined_label_drops_the_row():
    """'Mortgage' + '' became the class 'Mortgage / ' (and 'N/A' one of its own) from a CSV."""
    frame = pd.DataFrame(
        {
            TEXT: [f"complaint {i}" for i in range(8)],
            "P": ["Mortgage"] * 4 + ["Card"] * 4,
            "I": ["Escrow", "Escrow", "", " ", "Fees", "Fees", "N/A", None],
        }
    )
    out, report = clean(frame, DataConfig(label_column="P+I", min_class_count=1))
    assert sorted(out["label"].unique()) == ["Card / Fees", "Mortgage / Escrow"]
    assert report["dropped"]["empty_label"] + report["dropped"]["na_label"] == 4


@pytest.mark.parametrize("content", ["[]", "{}"])
def test_a_json_file_without_rows_says_so(tmp_path, content):
    """It said "text column ... not found; columns are: " with nothing after it."""
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(TailtuneError, match="data file has no rows"):
        read_table(tmp_path / "d.json")


@pytest.mark.parametrize("content", ["42", '"text"', "null", "true"])
def test_a_json_file_of_one_value_says_it_is_not_a_table(tmp_path, content):
    """A review: pandas' "DataFrame constructor not properly called!"."""
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(TailtuneError, match=r"could not read .*d.json as json: it holds a single value, not a table"):
        read_table(tmp_path / "d.json")


def test_every_missing_value_marker_is_dropped_and_na_and_none_are_classes():
    markers = ["NaN", "nan", "<NA>", "#N/A", "N/A", "n/a", "NULL", "null"]  # as docs/input-checks.md lists them
    labels = [*markers, "NA", "NA", "None", "None", "A", "A"]
    frame = pd.DataFrame({TEXT: [f"complaint {i}" for i in range(len(labels))], "Issue": labels})
    out, report = clean(frame, DataConfig(min_class_count=1))
    assert report["dropped"]["na_label"] == len(markers)
    assert sorted(out["label"].unique()) == ["A", "NA", "None"]


def test_a_null_label_is_a_missing_value_and_an_empty_one_is_empty():
    """A JSON or Parquet null was counted as an empty label, and "NaN" in a CSV as a missing value."""
    frame = pd.DataFrame({TEXT: [f"complaint {i}" for i in range(6)], "Issue": ["A", "A", "", None, "NaN", "B"]})
    _, report = clean(frame, DataConfig(min_class_count=1))
    assert (report["dropped"]["empty_label"], report["dropped"]["na_label"]) == (1, 2)


def test_numbers_read_as_written_in_jsonl_json_and_parquet(tmp_path):
    """An int label column with one null became '1.0', '2.0' in training, while predict read '1'
    (.json: ids 2**53 + 1 became 9007199254740992.0 and collided)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    labels, ids = [1, 2, None, 2], [9007199254740993, 11, 12, 13]
    (tmp_path / "d.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "text": f"t {i}", "label": label}) + "\n" for i, label in zip(ids, labels, strict=True)
        )
    )
    pq.write_table(
        pa.table(
            {"id": pa.array(ids, pa.int64()), "text": [f"t {i}" for i in ids], "label": pa.array(labels, pa.int64())}
        ),
        tmp_path / "d.parquet",
    )
    records = [{"id": i, "text": f"t {i}", "label": label} for i, label in zip(ids, labels, strict=True)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "columns.json").write_text(json.dumps({key: [r[key] for r in records] for key in records[0]}))
    for name in ("d.jsonl", "d.parquet", "d.json", "columns.json"):
        cfg = DataConfig(
            path=str(tmp_path / name), text_column="text", label_column="label", id_column="id", min_class_count=1
        )
        out, _ = clean(read_table(cfg.path), cfg)
        assert out["label"].tolist() == ["1", "2", "2"], name
        assert out["id"].tolist() == ["9007199254740993", "11", "13"], name


def test_a_list_or_object_in_a_cell_is_an_error_not_its_printed_form(tmp_path):
    """A review: a JSON-lines text that was a list was trained on as "['my card', 'was stolen']"."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": i, "text": f"complaint {i}", "label": "AB"[i % 2]} for i in range(20)]
    cfg = {"text_column": "text", "label_column": "label", "id_column": "id"}
    for column, value, shown in [
        ("text", ["my card", "was stolen"], r'a list \(\["my card", "was stolen"\]\)'),
        ("label", {"x": 1}, r'an object \(\{"x": "1"\}\)'),
        ("id", [1, 2], r'a list \(\["1", "2"\]\)'),
    ]:
        bad = [dict(r) for r in rows]
        bad[3][column] = bad[7][column] = value
        path = tmp_path / f"{column}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in bad))
        with pytest.raises(
            TailtuneError,
            match=rf"^{column} column '{column}' holds {shown} where one value "
            rf"belongs \(and 1 more\); give each row a single {column}$",
        ):
            clean(read_table(path), DataConfig(path=str(path), **cfg))
    pq.write_table(pa.table({"text": [["a", "b"], ["c"]], "label": ["A", "B"]}), tmp_path / "d.parquet")
    with pytest.raises(TailtuneError, match=r'text column .text. holds a list \(\["a", "b"\]\)'):
        clean(read_table(tmp_path / "d.parquet"), DataConfig(text_column="text", label_column="label"))
    path = tmp_path / "ok.jsonl"  # nested values in a column tailtune does not read are fine
    path.write_text("".join(json.dumps({**r, "meta": {"source": [1]}}) + "\n" for r in rows))
    assert len(clean(read_table(path), DataConfig(path=str(path), **cfg))[0]) == 20


def test_decode_problem_names_a_cut_character_and_is_none_for_a_clean_file(tmp_path):
    from tailtune.data import decode_problem

    (tmp_path / "cut.csv").write_bytes(b"text,Issue\nhello,A\ncaf\xc3")
    (tmp_path / "clean.csv").write_bytes(b"text,Issue\nhello,A\n")
    assert decode_problem(tmp_path / "clean.csv", "utf-8-sig") is None
    with pytest.raises(TailtuneError, match=r"cut.csv is not valid UTF-8 \(it ends inside a character\)"):
        read_table(tmp_path / "cut.csv")


def test_a_label_column_whose_name_holds_a_plus_is_that_column(tmp_path):
    """A review: 'Issue+Sub' was always split, so a column of that name could not be used."""
    path = tmp_path / "plus.csv"
    path.write_text(f"{TEXT},Issue+Sub,Issue\n" + "".join(f"text {i},{'AB'[i % 2]},x\n" for i in range(40)))
    assert sorted(prepare(DataConfig(path=str(path), label_column="Issue+Sub")).classes) == ["A", "B"]


def test_a_utf16_file_is_named_as_utf16_and_reads_with_that_encoding(tmp_path):
    """A review: the error on a UTF-16 file (Excel's "Unicode text") suggested cp1252."""
    path = tmp_path / "u16.csv"
    path.write_bytes(f"{TEXT},Issue\ncafé,A\n".encode("utf-16"))
    with pytest.raises(TailtuneError, match=r"is UTF-16 .*data.encoding=utf-16") as err:
        read_table(path)
    assert "cp1252" not in str(err.value)
    assert read_table(path, encoding="utf-16")[TEXT].tolist() == ["café"]
