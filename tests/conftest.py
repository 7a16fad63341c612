"""Shared fixtures: tiny random-weight backbones and a small labelled CSV."""

from __future__ import annotations

import os
import signal

import pandas as pd
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A suite started in the background (`cmd &`, nohup) inherits SIGINT ignored, and so would every
# `tailtune` it starts: the Ctrl-C tests' SIGINT would then do nothing and the run would finish.
# A Python handler here becomes the default disposition in a child at exec, and the child's
# Python turns that into KeyboardInterrupt, as it does for a run started from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def small_frame() -> pd.DataFrame:
    from tailtune.demo import make_demo_corpus

    return make_demo_corpus(n_classes=8, max_count=40, min_count=6, exponent=1.0, seed=3)


@pytest.fixture()
def small_csv(tmp_path, small_frame):
    path = tmp_path / "complaints.csv"
    small_frame.to_csv(path, index=False)
    return path


@pytest.fixture()
def synced(monkeypatch) -> list[str]:
    """The paths ``os.fsync`` is called on, in order (Linux: read from /proc/self/fd)."""
    paths: list[str] = []
    fsync = os.fsync

    def recording(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return paths


def restamp(system_dir) -> None:
    """Rewrite a system folder's files.json after a test edited one of its files, as training
    the system again would; otherwise the report reads the edit as a cut file (system missing)."""
    import json

    from tailtune.run import FILES, _list_files

    listed = {k: v for k, v in _list_files(system_dir).items() if k != FILES}
    (system_dir / FILES).write_text(json.dumps(listed))
