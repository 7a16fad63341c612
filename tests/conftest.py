"""Shared fixtures: tiny random-weight backbones and a small labelled CSV."""

from __future__ import annotations

import os

import pandas as pd
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def small_frame() -> pd.DataFrame:
    from tailtune.demo import make_demo_corpus

    return make_demo_corpus(n_classes=8, max_count=40, min_count=6, exponent=1.0, seed=3)


@pytest.fixture()
def small_csv(tmp_path, small_frame):
    path = tmp_path / "complaints.csv"
    small_frame.to_csv(path, index=False)
    return path
