"""``tailtune serve``: the API answers, validates, and serves adapters from one shared base."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from test_deploy import make_lora_system

from tailtune import deploy
from tailtune.classifier import TextClassifier
from tailtune.serve import check_port, create_app

TEXTS = [
    "the debt collector keeps calling about a debt I do not owe",
    "refund",
    "my credit report shows an account that is not mine and the bureau did not fix it after my dispute",
]


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """Two LoRA systems on one tiny BERT (different adapters and heads), and two on one tiny Qwen2
    (bias-free heads: serve built every extra head with a bias and failed to start)."""
    run_dir = tmp_path_factory.mktemp("adapters")
    for name, arch, seed in (
        ("encoder-lora", "bert", 11),
        ("encoder-lora-weighted", "bert", 12),
        ("decoder-lora", "qwen2", 13),
        ("decoder-lora-weighted", "qwen2", 14),
    ):
        make_lora_system(run_dir / "systems" / name / "model", arch, seed)
    pd.DataFrame(
        {
            "system": ["encoder-lora", "encoder-lora-weighted", "decoder-lora", "decoder-lora-weighted"],
            "status": ["ok", "ok", "ok", "ok"],
            "macro_f1": [0.2, 0.3, 0.1, 0.05],
        }
    ).to_csv(run_dir / "comparison.csv", index=False)
    return run_dir


@pytest.fixture(scope="module")
def client(adapter_run):
    # fp32: the comparisons below are against TextClassifier, which predicts in the run's fp32.
    with TestClient(create_app(adapter_run, max_batch=8, max_chars=500, precision="fp32")) as c:
        yield c


def test_health_and_systems(client):
    assert client.get("/health").json() == {
        "status": "ok",
        "systems": 4,
        "default": "encoder-lora-weighted",
    }
    systems = {s["name"]: s for s in client.get("/systems").json()["systems"]}
    assert set(systems) == {"encoder-lora", "encoder-lora-weighted", "decoder-lora", "decoder-lora-weighted"}
    for arch, slot in (("bert", "encoder"), ("qwen2", "decoder")):
        shared = systems[f"{slot}-lora"]["shared_base"]
        assert shared == {"backbone": f"tiny:{arch}", "systems": [f"{slot}-lora", f"{slot}-lora-weighted"]}
        assert systems[f"{slot}-lora-weighted"]["shared_base"] == shared
    assert all(s["classes"] == 5 and s["kind"] == "finetune" and s["method"] == "lora" for s in systems.values())


def test_predict_answers_with_top_k(client):
    body = client.post("/predict", json={"texts": TEXTS, "system": "decoder-lora", "top_k": 3}).json()
    assert body["system"] == "decoder-lora" and len(body["predictions"]) == len(TEXTS)
    for p in body["predictions"]:
        assert [t["label"] for t in p["top_k"]][0] == p["label"] and len(p["top_k"]) == 3
        confidences = [t["confidence"] for t in p["top_k"]]
        assert confidences == sorted(confidences, reverse=True) and 0 < p["confidence"] <= 1
    default = client.post("/predict", json={"texts": TEXTS[:1]}).json()
    assert default["system"] == "encoder-lora-weighted" and len(default["predictions"][0]["top_k"]) == 1


@pytest.mark.parametrize("slot", ["encoder", "decoder"])
def test_two_adapters_on_one_base_answer_as_each_alone(adapter_run, client, slot):
    registry = client.app.state.registry
    names = (f"{slot}-lora", f"{slot}-lora-weighted")
    a, b = (registry.predictors[n] for n in names)
    assert a.shared is b.shared and len(a.shared.model.backbone.peft_config) == 2
    alone = {name: TextClassifier.load(adapter_run / "systems" / name / "model").predict_proba(TEXTS) for name in names}
    assert np.abs(alone[names[0]] - alone[names[1]]).max() > 1e-2  # the switch matters
    for name in (*names, *names):
        body = client.post("/predict", json={"texts": TEXTS, "system": name, "top_k": 5}).json()
        classes = TextClassifier.load(adapter_run / "systems" / name / "model").classes_
        served = np.array(
            [[dict((t["label"], t["confidence"]) for t in p["top_k"])[c] for c in classes] for p in body["predictions"]]
        )
        np.testing.assert_allclose(served, alone[name], atol=1e-5)


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"texts": []}, 422),
        ({"texts": ["fine", 3]}, 422),
        ({"texts": "not a list"}, 422),
        ({"texts": ["a"] * 9}, 413),
        ({"texts": ["x" * 501]}, 413),
        ({"texts": ["  "]}, 422),
        ({"texts": ["fine"], "system": "nope"}, 404),
        ({"texts": ["fine"], "system": ""}, 404),
        ({"texts": ["fine"], "top_k": 6}, 422),
        ({"texts": ["fine"], "top_k": 0}, 422),
        ({}, 422),
    ],
)
def test_bad_requests_are_4xx(client, payload, status):
    response = client.post("/predict", json=payload)
    assert response.status_code == status, response.text


@pytest.mark.parametrize(
    ("body", "system", "says"),
    [
        # str.strip() keeps U+200B, and it has no tokens for the Qwen2 tokenizer
        ('{"texts": ["fine", "\\u200b"]}', "decoder-lora", "text 1 is empty"),
        ('{"texts": ["fine", " "]}', "encoder-lora", "text 1 is empty"),
        # a lone surrogate is valid JSON but not text: the tokenizer raised a TypeError
        ('{"texts": ["ok \\ud800 text"]}', "encoder-lora", "text 0 is not valid Unicode"),
        ('{"texts": ["ok \\ud800 text"]}', "decoder-lora", "text 0 is not valid Unicode"),
    ],
)
def test_texts_the_model_cannot_read_are_422_not_500(client, body, system, says):
    """A review: HTTP 500 "Internal Server Error" in plain text for both."""
    body = body[:-1] + f', "system": "{system}"}}'
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert says in response.json()["detail"]


def test_unknown_system_at_start_is_refused(adapter_run):
    from tailtune.errors import TailtuneError

    with pytest.raises(TailtuneError, match="no finished system named nope"):
        create_app(adapter_run, systems=["nope"])


def test_bad_limits_are_refused(adapter_run):
    from tailtune.errors import TailtuneError

    with pytest.raises(TailtuneError, match="--max-batch and --max-chars must be at least 1"):
        create_app(adapter_run, max_batch=0)


def test_a_taken_port_is_one_line_before_any_model_loads(adapter_run, monkeypatch):
    """uvicorn found it only after the models loaded, and printed its own ERROR log; an
    out-of-range port was an internal OverflowError."""
    from typer.testing import CliRunner

    from tailtune.cli import app
    from tailtune.errors import TailtuneError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TailtuneError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_port("127.0.0.1", port)
        monkeypatch.setattr("tailtune.serve.create_app", lambda *a, **k: pytest.fail("models loaded first"))
        result = CliRunner().invoke(app, ["serve", str(adapter_run), "--port", str(port)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on"), result.output
    with pytest.raises(TailtuneError, match="--port must be between 0 and 65535, got 70000"):
        check_port("127.0.0.1", 70000)
    check_port("127.0.0.1", 0)  # any free port: accepted


def test_serve_command_answers_and_stops_on_sigterm(adapter_run):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tailtune.cli",
            "serve",
            str(adapter_run),
            "--port",
            str(port),
            "--systems",
            "encoder-lora,encoder-lora-weighted",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        body = httpx.post(f"{url}/predict", json={"texts": TEXTS, "system": "encoder-lora"}, timeout=60).json()
        expected = deploy.load_predictor(adapter_run / "systems" / "encoder-lora").predict(TEXTS)
        assert [p["label"] for p in body["predictions"]] == expected
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully (lifespan releases the models), then re-raises SIGTERM.
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        log = server.stdout.read()
        assert "Application shutdown complete" in log and "Traceback" not in log, log
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_system_name_with_a_dot_is_served(tmp_path):
    """peft refuses '.' in an adapter name: a sweep's encoder-lora@dropout=0.1 stopped serve."""
    for name, seed in (("encoder-lora", 11), ("encoder-lora@dropout=0.1", 12)):
        make_lora_system(tmp_path / "systems" / name / "model", "bert", seed)
    pd.DataFrame(
        {"system": ["encoder-lora", "encoder-lora@dropout=0.1"], "status": ["ok", "ok"], "macro_f1": [0.2, 0.3]}
    ).to_csv(tmp_path / "comparison.csv", index=False)
    with TestClient(create_app(tmp_path, max_batch=8, max_chars=500, precision="fp32")) as c:
        body = c.post("/predict", json={"texts": TEXTS, "system": "encoder-lora@dropout=0.1"}).json()
    alone = TextClassifier.load(tmp_path / "systems" / "encoder-lora@dropout=0.1" / "model").predict(TEXTS)
    assert [p["label"] for p in body["predictions"]] == alone


def test_serve_without_fastapi_or_uvicorn_says_what_to_install(tmp_path, monkeypatch):
    """It was 'internal error ModuleNotFoundError: No module named fastapi' (or uvicorn)."""
    from typer.testing import CliRunner

    from tailtune.cli import app

    for missing in ("fastapi", "uvicorn"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, missing, None)  # import it -> ImportError
            m.delitem(sys.modules, "tailtune.serve")
            result = CliRunner().invoke(app, ["serve", str(tmp_path)])
        assert result.exit_code == 2
        assert result.output.strip() == f"error: serve needs {missing}: pip install 'tailtune[serve]'"


@pytest.mark.parametrize(
    "body",
    [
        '{"texts": ["a"], "top_k": 1e400}',
        '{"texts": [Infinity]}',
        '{"texts": ["a"], "system": NaN}',
        '{"texts": ["a"], "top_k": NaN}',
        '{"texts": ["a"], "top_k": true}',
        '{"texts": ["a"], "top_k": "2"}',
    ],
)
def test_non_finite_numbers_and_loose_types_are_422_not_500(client, body):
    """A review: FastAPI's 422 echoed the NaN back and could not write it as JSON (a 500)."""
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][0] == "body"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"texts": ["ok \\ud800 text"]}', "text 0 is not valid Unicode"),
        ('{"texts": ["fine", " \\u200b"]}', "text 1 is empty"),
    ],
)
def test_texts_without_text_are_422_for_a_system_without_a_tokenizer(tmp_path_factory, body, says):
    """A review: 422 from the torch systems, 200 with a label from tfidf-logreg."""
    from test_deploy import train_smoke_run

    run = train_smoke_run(tmp_path_factory)
    with TestClient(create_app(run, systems=["tfidf-logreg"], max_batch=8, max_chars=500)) as c:
        response = c.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and says in response.json()["detail"]


def test_a_torn_adapter_on_a_shared_base_is_one_line(adapter_run, tmp_path):
    """A review: serve's shared-base loader had no guard; a torn adapter was a SafetensorError."""
    import shutil

    from tailtune.errors import TailtuneError

    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    adapter = run / "systems" / "encoder-lora-weighted" / "model" / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:500])
    with pytest.raises(TailtuneError, match="could not load the model saved in .*encoder-lora-weighted"):
        create_app(run)
