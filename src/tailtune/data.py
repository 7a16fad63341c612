"""Read labelled texts, clean them with a count of every dropped row, split, and assign tiers.

The output is a :class:`Prepared` dataset: one frame with ``id, text, label, y, split`` plus the
class list, training counts and frequency tier of every class. Every decision that removes rows
is counted in :attr:`Prepared.summary`, which the run writes to ``data.json``.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.markup import escape

from tailtune.config import DataConfig
from tailtune.errors import TailtuneError, first_line

READERS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}

# What spreadsheet and dataframe exports write for a missing value. A row whose label is one of
# these has no label; it is not a class called "NaN". ("NA" and "None" are left alone: both
# are plausible real labels.)
NA_MARKERS = frozenset({"nan", "NaN", "-nan", "-NaN", "<NA>", "#N/A", "#NA", "N/A", "n/a", "NULL", "null"})


@dataclass
class Prepared:
    """A cleaned, split dataset. ``frame`` columns: id, text, label, y (class index), split."""

    frame: pd.DataFrame
    classes: list[str]
    train_counts: np.ndarray  # (C,) training rows per class
    tiers: list[str]  # (C,) tier name per class
    tier_names: list[str]
    summary: dict = field(default_factory=dict)

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]

    def texts(self, name: str) -> list[str]:
        return self.split(name)["text"].tolist()

    def y(self, name: str) -> np.ndarray:
        return self.split(name)["y"].to_numpy()


# ----------------------------------------------------------------------------- reading


def text_codec(encoding: str, setting: str = "data.encoding") -> str:
    """The Python codec that reads files in ``encoding``; UTF-8 reads through a leading BOM."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise TailtuneError(
            f"{setting} '{encoding}' is not a known text encoding (e.g. utf-8, cp1252, latin-1)"
        ) from None
    return "utf-8-sig" if name == "utf-8" else name


def file_kind(path: Path, role: str) -> str:
    """The reader for the ``role`` ("data", "input") file ``path`` (a value of ``READERS``),
    after one-line errors for a path that is missing, a folder, of another type, or empty."""
    if not path.exists():
        raise TailtuneError(f"{role} file not found: {path}")
    if path.is_dir():
        raise TailtuneError(f"{role} path is a directory, expected a file: {path}")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise TailtuneError(
            f"unsupported {role} file type '{path.suffix}' for {path} (use .csv, .tsv, .jsonl, .json or .parquet)"
        )
    if path.stat().st_size == 0:
        raise TailtuneError(f"{role} file is empty: {path}")
    return kind


def read_table(path: str | Path, encoding: str = "utf-8") -> pd.DataFrame:
    """Read CSV / TSV / JSONL / JSON / Parquet into strings-as-objects, with clear errors.

    ``encoding`` applies to the text formats; a byte that does not decode is an error naming
    its line and byte offset, never replaced or guessed.
    """
    path = Path(path)
    codec = text_codec(encoding)
    kind = file_kind(path, "data")
    try:
        if kind in ("csv", "tsv"):
            return _read_delimited(path, "\t" if kind == "tsv" else ",", codec)
        if kind == "jsonl":
            with open(path, encoding=codec, newline="") as f:
                frames = list(jsonl_frames(f, 65_536))
            if not frames:
                raise TailtuneError(f"data file has no rows: {path}")
            return pd.concat(frames, ignore_index=True)
        if kind == "json":
            frame = read_json(path, codec)
            if frame.empty:
                raise TailtuneError(f"data file has no rows: {path}")
            return frame
        import pyarrow.parquet as pq

        # integer_object_nulls: an int64 column with a null (pyarrow, Spark, polars) stays ints,
        # so labels and ids read 1, not 1.0, as predict reads them
        return pq.read_table(path).to_pandas(integer_object_nulls=True)
    except TailtuneError:
        raise
    except UnicodeDecodeError:
        raise decode_error(path, codec) from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise TailtuneError(f"could not read {path} as {kind}: {first_line(exc)}") from None


def read_json(path: Path, codec: str) -> pd.DataFrame:
    """A JSON file of records (``[{...}, ...]``) or of columns (``{"col": [...]}`` or
    ``{"col": {"row": ...}}``), numbers kept as written as in :func:`jsonl_frames` (pandas'
    reader made 9007199254741001 a float and a label column with a null "1.0"); any other
    layout is left to pandas. ``[]`` and ``{}`` give an empty frame."""
    with open(path, encoding=codec) as f:
        parsed = json.load(f, parse_int=str, parse_float=str)
    if parsed in ([], {}):
        return pd.DataFrame()
    if not isinstance(parsed, list | dict):  # pandas: "DataFrame constructor not properly called!"
        raise ValueError(
            "it holds a single value, not a table: give a list of records "
            '([{"text": ..., "label": ...}, ...]) or an object of columns, or use JSON lines (.jsonl)'
        )
    if isinstance(parsed, list) and all(isinstance(row, dict) for row in parsed):
        return pd.DataFrame.from_records(parsed)
    if isinstance(parsed, dict) and parsed and all(isinstance(col, list | dict) for col in parsed.values()):
        return pd.DataFrame(parsed)
    return pd.read_json(path, dtype=False, encoding=codec)


def jsonl_frames(text, chunk_size: int) -> Iterator[pd.DataFrame]:
    """DataFrames of up to ``chunk_size`` JSON lines from the text stream ``text``; blank lines
    skipped; numbers kept as written, as strings.

    pandas' reader made a 64-bit id a float (9007199254740993 -> 9007199254740992.0), and an int
    column float ("1.0") in a file where one row lacks it, so training and ``predict`` read the
    same labels differently. A line that is not a JSON object is a ValueError naming it.
    """
    rows = []
    for number, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line, parse_int=str, parse_float=str))
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: {exc.msg}") from None
        if not isinstance(rows[-1], dict):
            raise ValueError(f"line {number} is not a JSON object")
        if len(rows) == chunk_size:
            yield pd.DataFrame.from_records(rows)
            rows = []
    if rows:
        yield pd.DataFrame.from_records(rows)


DATA_ENCODING_HINT = ("data.encoding", "data.encoding=cp1252, or --encoding cp1252 for data inspect")


def tsv_quoting(path: Path, codec: str, hint: tuple[str, str] = DATA_ENCODING_HINT) -> int:
    """How to read the TSV file ``path``: ``csv.QUOTE_MINIMAL`` or ``csv.QUOTE_NONE``.

    TSV has two dialects. Excel and Python's csv module quote a field holding a tab, a line
    break or a quote (``"a<TAB>b"``, ``""`` for a quote); plain TSV writers never quote, and a
    text that merely starts with ``"`` then made CSV quoting swallow the rows up to the next
    quote, without an error. Both readings are tried (rows may be shorter than the header,
    as pandas pads them, never longer):

    - quoting, when every quote forms a well-formed quoted field and no quoted field holds
      both a line break and a tab (whole rows swallowed between two stray quotes) where the
      literal reading also fits;
    - otherwise literally, when every line fits;
    - otherwise an error naming the first line too long for the header.

    A byte ``codec`` cannot decode is an error naming it, with ``hint`` (see :func:`decode_problem`).
    """
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a narrative may pass 128 KiB

    def read(**dialect) -> tuple[bool, bool, tuple[int, int, int] | None]:
        """(parsed, a field spans lines and tabs, (line, fields, header fields) of the first too-long row)."""
        spans = False
        try:
            with open(path, encoding=codec, newline="") as f:
                rows = csv.reader(f, delimiter="\t", **dialect)
                width = len(next(rows, []))
                for row in rows:
                    if len(row) > width:
                        return True, spans, (rows.line_num, len(row), width)
                    spans = spans or any("\t" in x and ("\n" in x or "\r" in x) for x in row)
        except csv.Error:
            return False, spans, None
        return True, spans, None

    try:
        quoted, spans, quoted_long = read(strict=True)
        _, _, literal_long = read(quoting=csv.QUOTE_NONE)
    except UnicodeDecodeError:
        raise decode_error(path, codec, hint) from None
    if quoted and quoted_long is None and not (spans and literal_long is None):
        return csv.QUOTE_MINIMAL
    if literal_long is None:
        return csv.QUOTE_NONE
    line, fields, width = literal_long
    raise TailtuneError(
        f"could not read {path} as tsv: line {line} has {fields} tab-separated fields, the header {width} "
        "(and no quoting of the fields explains it)"
    )


def _read_delimited(path: Path, sep: str, codec: str) -> pd.DataFrame:
    quoting = tsv_quoting(path, codec) if sep == "\t" else csv.QUOTE_MINIMAL
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding=codec, quoting=quoting)
    except pd.errors.EmptyDataError:
        raise TailtuneError(f"data file has no rows or header: {path}") from None
    check_no_implicit_index(frame, path)
    return frame


def check_no_implicit_index(frame: pd.DataFrame, path: Path) -> None:
    """pandas reads a first row with more fields than the header as an index plus shifted
    columns (ids where the texts should be), silently: name it instead. A longer row further
    down is pandas' own "Expected 2 fields in line 3, saw 3"."""
    if not isinstance(frame.index, pd.RangeIndex):
        raise TailtuneError(
            f"could not read {path}: its first row has more fields than the header's {len(frame.columns)} "
            "(a field holding the separator must be quoted)"
        )


def decode_error(path: Path, codec: str, hint: tuple[str, str] = DATA_ENCODING_HINT) -> TailtuneError:
    """The one-line error for a file a reader could not decode (see :func:`decode_problem`)."""
    return TailtuneError(decode_problem(path, codec, hint) or f"{path} could not be decoded as {codec}")


def decode_problem(path: Path, codec: str, hint: tuple[str, str] = DATA_ENCODING_HINT) -> str | None:
    """One line locating the first byte of ``path`` that ``codec`` cannot decode, with the fix;
    None when every byte decodes.

    ``hint`` is (the setting, an example of setting it) as the command reading the file takes it.
    pandas and pyarrow report offsets inside their read buffers (or nothing), so the file is
    scanned again here; this only runs on an error path.
    """
    decoder = codecs.getincrementaldecoder(codec)()
    name = "UTF-8" if codec == "utf-8-sig" else codec
    offset, utf8_before = 0, False
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError as exc:
                where = f"byte {line[exc.start]:#x} at line {number} (byte offset {offset + exc.start})"
                break
            text = line[len(codecs.BOM_UTF8) :] if number == 1 and line.startswith(codecs.BOM_UTF8) else line
            utf8_before = utf8_before or not text.isascii()
            offset += len(line)
        else:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                return f"{path} is not valid {name} (it ends inside a character); re-save it as {name}"
            return None
    if name != "UTF-8":
        return f"{path} is not valid {name}: {where}; check {hint[0]}"
    with open(path, "rb") as f:
        start = f.read(2)
    if start in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # Excel's "Unicode text" and PowerShell's default
        utf16 = hint[1].replace("cp1252", "utf-16")
        return f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8: say so ({utf16}), or re-save it as UTF-8"
    if utf8_before:
        # A file with UTF-8 text before the bad byte mixes encodings: no single encoding
        # setting reads it right, so the line must be fixed.
        return (
            f"{path} mixes text encodings: {where} is not UTF-8 although earlier lines are; "
            "re-save the file as UTF-8 or fix that line"
        )
    return (
        f"{path} is not valid UTF-8: {where}; if the file was saved in another encoding say "
        f"which ({hint[1]}), or re-save it as UTF-8"
    )


# Whitespace, control characters and invisible format characters (zero-width space and joiners,
# directional marks, word joiner, soft hyphen, BOM): str.strip() keeps most of them, and a text
# of only these has no tokens for byte-level BPE tokenizers (Qwen2). Also what shows nothing on
# its own, which a BERT tokenizer reads as [CLS] [SEP] alone (a review): combining marks with no
# letter (U+0300-036F, the grapheme joiner U+034F), variation selectors, Mongolian selectors and
# vowel separator, tag characters, Hangul fillers and the blank Braille pattern.
_VISIBLE = re.compile(
    r"[^\s\x00-\x1f\x7f-\x9f\xad\u0300-\u036f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    r"\u2028-\u202e\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e007f\U000e0100-\U000e01ef]"
)


def blank(texts) -> np.ndarray:
    """(N,) True where a text (of a list or Series; NA counts) has nothing but whitespace,
    control or invisible format characters: an empty text everywhere tailtune reads one.
    Plain Python, not pandas' string methods: those store text in Arrow, which refuses a lone
    surrogate (a request's JSON can hold one)."""
    return np.array([not isinstance(t, str) or _VISIBLE.search(t) is None for t in texts], dtype=bool)


def string_column(df: pd.DataFrame, column: str, role: str) -> pd.Series:
    """``df[column]`` as pandas strings (missing values stay missing), after
    :func:`check_single_values`."""
    check_single_values(df, column, role)
    return df[column].astype("string")


def check_single_values(df: pd.DataFrame, column: str, role: str) -> None:
    """A JSON list or object, or a Parquet list, in a cell of ``df[column]`` is an error naming
    the column and the first such value: its printed form (``"['a', 'b']"``) is not a text, a
    label or an id (``role``), and was classified or trained on as one without a word."""
    values = df[column]
    if values.dtype == object:
        nested = [v for v in values if isinstance(v, list | dict | tuple | np.ndarray)]
        if nested:
            kind = "an object" if isinstance(nested[0], dict) else "a list"
            shown = json.dumps(
                nested[0].tolist() if isinstance(nested[0], np.ndarray) else nested[0], ensure_ascii=False, default=str
            )
            shown = shown if len(shown) <= 40 else shown[:39] + "…"
            raise TailtuneError(
                f"{role} column '{column}' holds {kind} ({shown}) where one value belongs"
                f"{f' (and {len(nested) - 1} more)' if len(nested) > 1 else ''}; give each row a single {role}"
            )


def label_series(df: pd.DataFrame, label_column: str) -> pd.Series:
    """The labels of ``df``: one column, or ``A+B`` columns joined as "a / b" (missing if a part is).

    A column whose own name holds ``+`` is that column. A part named twice is an error."""
    parts = label_parts(df, label_column)
    for col in parts:
        require_column(df, col, "label")
    columns = [string_column(df, col, "label") for col in parts]
    labels = columns[0]
    for column in columns[1:]:
        labels = labels.str.cat(column, sep=" / ")
    if len(columns) > 1:  # a missing part makes the label missing, not a class ("Mortgage / ")
        missing = [c.fillna("").str.strip().isin(["", *NA_MARKERS]) for c in columns]
        labels = labels.mask(pd.concat(missing, axis=1).any(axis=1))
    return labels


def label_parts(df: pd.DataFrame, label_column: str) -> list[str]:
    """The columns ``label_column`` names: itself when ``df`` has a column of that name, else its
    ``+``-separated parts."""
    parts = [label_column] if label_column in df.columns else [c.strip() for c in label_column.split("+")]
    if len(set(parts)) < len(parts):
        raise TailtuneError(f"label column '{label_column}' names a column twice")
    return parts


def require_column(df: pd.DataFrame, column: str, role: str) -> None:
    if column not in df.columns:
        from tailtune.config import suggest

        separator = _separator_hint(df)
        hint = "" if separator else suggest(column, [str(c) for c in df.columns])
        cols = ", ".join(map(str, list(df.columns)[:12]))
        raise TailtuneError(f"{role} column '{column}' not found{hint}; columns are: {cols}{separator}")


def _separator_hint(df: pd.DataFrame) -> str:
    """A one-column table whose header holds ';' or '|' was written with that separator (a CSV
    saved by a spreadsheet in a comma-decimal locale): say so, or the error only lists one odd name."""
    if len(df.columns) != 1:
        return ""
    header = str(df.columns[0])
    found = [sep for sep in (";", "|") if sep in header]
    if not found:
        return ""
    return (
        f"; the header looks separated by '{found[0]}', and tailtune reads commas (.csv) and tabs (.tsv): "
        "save the file with one of those"
    )


def load_frame(cfg: DataConfig) -> tuple[pd.DataFrame, str]:
    """The raw table for ``cfg`` (the demo corpus when ``cfg.path`` is None) and its source name."""
    if cfg.path is None:
        from tailtune.demo import make_demo_corpus

        d = cfg.demo
        frame = make_demo_corpus(
            n_classes=d.n_classes,
            max_count=d.max_count,
            min_count=d.min_count,
            exponent=d.exponent,
            seed=d.seed,
        )
        return frame, "built-in synthetic demo corpus (tailtune.demo)"
    return read_table(cfg.path, cfg.encoding), str(cfg.path)


# ----------------------------------------------------------------------------- cleaning


def clean(df: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, dict]:
    """Return ``(frame with id/text/label, report)`` after dropping unusable rows.

    Order: empty text -> empty or missing-value label (``NA_MARKERS``; with ``A+B`` label
    columns, in any part) -> exact duplicate texts (first kept when labels agree, all copies
    dropped when they conflict) -> the ``max_rows`` sample -> classes below ``min_class_count``.
    """
    require_column(df, cfg.text_column, "text")
    if cfg.text_column in label_parts(df, cfg.label_column):
        raise TailtuneError(
            f"the text column '{cfg.text_column}' is also the label column ('{cfg.label_column}'): the model "
            "would read its answer; pass the narrative as --text-column"
        )
    labels = label_series(df, cfg.label_column)
    if len(df) == 0:
        raise TailtuneError("data file has a header but no rows" + (f": {cfg.path}" if cfg.path else ""))
    if cfg.id_column in df.columns:
        check_single_values(df, cfg.id_column, "id")
        ids = df[cfg.id_column].astype(str)
    else:
        ids = pd.Series(np.arange(len(df)).astype(str), index=df.index)
    texts = string_column(df, cfg.text_column, "text")
    out = pd.DataFrame({"id": ids.to_numpy(), "text": texts.to_numpy(), "label": labels.to_numpy()})
    report: dict = {"rows_read": int(len(out)), "dropped": {}}
    dropped = report["dropped"]

    text = out["text"].fillna("").str.strip()
    keep = pd.Series(~blank(text), index=text.index)
    dropped["empty_text"] = int((~keep).sum())
    if not keep.any():
        raise TailtuneError(f"no usable rows: text column '{cfg.text_column}' is empty in all {len(out)} rows")
    out = out[keep].assign(text=text[keep])

    # A null (JSON, Parquet, a missing part of an A+B label) is a missing value like "NaN" in a
    # CSV; only a written empty string is an empty label.
    label = out["label"].fillna("").str.strip()
    null = out["label"].isna()
    empty = (label.str.len() == 0) & ~null
    missing = label.isin(NA_MARKERS) | null
    dropped["empty_label"] = int(empty.sum())
    dropped["na_label"] = int(missing.sum())
    if (empty | missing).all():
        raise TailtuneError(
            f"no usable rows: label column '{cfg.label_column}' is empty (or NaN) in all {len(out)} rows with text"
        )
    out = out[~(empty | missing)]

    # Labels that differ only by case or surrounding spaces are almost always one class typed
    # twice; they are reported, never silently merged.
    norm = out["label"].str.strip().str.casefold()
    variants = out.groupby(norm)["label"].unique()
    report["possible_duplicate_labels"] = [sorted(map(str, v)) for v in variants if len(v) > 1]

    n_labels = out.groupby("text")["label"].transform("nunique")
    conflicting = n_labels > 1
    report["conflicting_duplicate_texts"] = int(out.loc[conflicting, "text"].nunique())
    dropped["conflicting_duplicates"] = int(conflicting.sum())
    out = out[~conflicting]
    dup = out.duplicated("text", keep="first")
    dropped["duplicate_text"] = int(dup.sum())
    out = out[~dup]

    if cfg.max_rows is not None and len(out) > cfg.max_rows:
        # Before the class-size rule: sampled after it, a class could fall below min_class_count
        # (1 training row, no test row) and still be trained on.
        dropped["max_rows_subsample"] = int(len(out) - cfg.max_rows)
        out = out.sample(n=cfg.max_rows, random_state=cfg.seed)

    counts = out["label"].value_counts()
    too_few = counts[counts < cfg.min_class_count]
    dropped["rare_class_rows"] = int(too_few.sum())
    report["dropped_classes"] = sorted(map(str, too_few.index))
    out = out[~out["label"].isin(too_few.index)]

    if len(out) == 0 and report["dropped_classes"]:
        raise TailtuneError(
            f"no usable rows: all {len(report['dropped_classes'])} classes have fewer than "
            f"{cfg.min_class_count} rows (data.min_class_count), too few to split"
        )
    if len(out) == 0:
        raise TailtuneError("no usable rows left after cleaning (every text has conflicting labels)")
    n_classes = out["label"].nunique()
    if n_classes < 2:
        raise TailtuneError(
            f"only {n_classes} class left after cleaning; a classifier needs at least 2 "
            f"(classes need >= {cfg.min_class_count} rows)"
        )
    report["rows_kept"] = int(len(out))
    return out.reset_index(drop=True), report


# ----------------------------------------------------------------------------- split and tiers


def stratified_split(labels: pd.Series, val_size: float, test_size: float, seed: int) -> np.ndarray:
    """Assign 'train' / 'val' / 'test' per class, so every class keeps its share in each split.

    Per class of n rows: test gets round(n * test_size) and val round(n * val_size), each at
    least 1 when the class has enough rows (n >= 2 for test, n >= 3 for val), and train keeps
    the rest (always >= 1). Tiny classes therefore still appear in the test set, which is
    where long-tail evaluation needs them.
    """
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    codes, uniques = pd.factorize(labels, sort=True)
    for c in range(len(uniques)):
        idx = np.flatnonzero(codes == c)
        rng.shuffle(idx)
        n = len(idx)
        n_test = max(1, round(n * test_size)) if n >= 2 else 0
        n_val = max(1, round(n * val_size)) if n >= 3 else 0
        while n - n_test - n_val < 1:
            if n_val > 0 and n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_val]] = "val"
        split[idx[n_test + n_val :]] = "train"
    return split


def assign_tiers(train_counts, edges: list[int], names: list[str]) -> list[str]:
    """Tier name per class: the first tier whose inclusive upper edge holds its training count."""
    positions = np.searchsorted(np.asarray(edges), np.asarray(train_counts), side="left")
    return [names[i] for i in positions]


def tier_ranges(edges: list[int], names: list[str]) -> dict[str, str]:
    """Human-readable training-count range of each tier, e.g. {'rare': '<=27', 'head': '>=1000'}."""
    lows = [1] + [e + 1 for e in edges]
    out = {}
    for i, name in enumerate(names):
        out[name] = f">={lows[i]}" if i == len(edges) else (f"<={edges[i]}" if i == 0 else f"{lows[i]}-{edges[i]}")
    return out


def prepare(cfg: DataConfig, frame: pd.DataFrame | None = None, source: str | None = None) -> Prepared:
    """Read (unless ``frame`` is given), clean, split and tier the data described by ``cfg``."""
    if frame is None:
        frame, source = load_frame(cfg)
    out, report = clean(frame, cfg)
    out["split"] = stratified_split(out["label"], cfg.val_size, cfg.test_size, cfg.seed)
    classes = sorted(out["label"].unique().tolist())
    index = {c: i for i, c in enumerate(classes)}
    out["y"] = out["label"].map(index).astype(int)
    train_counts = np.bincount(out.loc[out["split"] == "train", "y"], minlength=len(classes))
    edges = cfg.effective_tier_edges
    tiers = assign_tiers(train_counts, edges, cfg.tier_names)
    report.update(
        {
            "source": source,
            "text_column": cfg.text_column,
            "label_column": cfg.label_column,
            "n_classes": len(classes),
            "classes": classes,
            "train_counts": {c: int(n) for c, n in zip(classes, train_counts, strict=True)},
            "tiers": {
                "edges": edges,
                "names": list(cfg.tier_names),
                "ranges": tier_ranges(edges, cfg.tier_names),
                "classes": {t: [c for c, ct in zip(classes, tiers, strict=True) if ct == t] for t in cfg.tier_names},
            },
            "splits": {s: int((out["split"] == s).sum()) for s in ("train", "val", "test")},
            "text_words": _length_summary(out["text"]),
            "seed": cfg.seed,
            "fingerprint": fingerprint(out[["id", "text", "label", "split"]]),
        }
    )
    return Prepared(
        frame=out[["id", "text", "label", "y", "split"]],
        classes=classes,
        train_counts=train_counts,
        tiers=tiers,
        tier_names=list(cfg.tier_names),
        summary=report,
    )


def fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 (16 hex digits) of the frame as CSV: equal exactly when every value and the order are."""
    import hashlib

    return hashlib.sha256(frame.to_csv(index=False).encode("utf-8")).hexdigest()[:16]


def _length_summary(texts: pd.Series) -> dict:
    words = texts.str.split().str.len()
    return {
        "mean": round(float(words.mean()), 1),
        "p50": int(words.quantile(0.5)),
        "p95": int(words.quantile(0.95)),
        "max": int(words.max()),
    }


def inspect_data(cfg: DataConfig, console) -> Prepared:
    """Print class counts, tiers and problems found in ``cfg.path``; return the prepared data."""
    from rich.table import Table

    prepared = prepare(cfg)
    s = prepared.summary
    console.print(f"[bold]{escape(s['source'])}[/]: {s['rows_read']} rows read, {s['rows_kept']} kept")
    for reason, n in s["dropped"].items():
        if n:
            console.print(f"  dropped {n} rows: {reason.replace('_', ' ')}")
    words = s["text_words"]
    console.print(
        f"  words per text: mean {words['mean']}, median {words['p50']}, p95 {words['p95']}, max {words['max']}"
    )
    console.print(
        f"  {s['n_classes']} classes; split train/val/test = "
        f"{s['splits']['train']}/{s['splits']['val']}/{s['splits']['test']} (seed {s['seed']})"
    )
    tiers = Table(title="frequency tiers (by training rows per class)")
    for col in ("tier", "range", "classes", "train rows"):
        tiers.add_column(col, justify="left" if col == "tier" else "right")
    counts = dict(zip(prepared.classes, prepared.train_counts, strict=True))
    for name in prepared.tier_names:
        members = s["tiers"]["classes"][name]
        tiers.add_row(name, s["tiers"]["ranges"][name], str(len(members)), str(sum(counts[c] for c in members)))
    console.print(tiers)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    table = Table(title="classes, most to least frequent (train rows)")
    table.add_column("class")
    table.add_column("train", justify="right")
    table.add_column("tier")
    shown = ranked if len(ranked) <= 30 else ranked[:15] + [("...", None)] + ranked[-15:]
    tier_of = dict(zip(prepared.classes, prepared.tiers, strict=True))
    for label, n in shown:
        table.add_row(escape(label), "" if n is None else str(n), tier_of.get(label, ""))
    console.print(table)
    problems = []
    if s["dropped_classes"]:
        problems.append(
            f"{len(s['dropped_classes'])} classes below {cfg.min_class_count} rows dropped: "
            + ", ".join(s["dropped_classes"][:5])
        )
    if s["conflicting_duplicate_texts"]:
        problems.append(f"{s['conflicting_duplicate_texts']} texts appear with conflicting labels (all copies dropped)")
    for variants in s["possible_duplicate_labels"]:
        problems.append(f"possible duplicate labels, differ only by case/spaces (not merged): {variants}")
    if s["splits"]["val"] == 0:  # what preflight.check_splits refuses in a run
        problems.append(
            "no validation rows (every class has fewer than 3 rows): probes and fine-tuning pick "
            "their model on validation, so a run can train only tfidf-logreg"
        )
    console.print("[bold]problems found:[/] " + ("none" if not problems else ""))
    for p in problems:
        console.print(f"  - {p}", markup=False)
    return prepared
