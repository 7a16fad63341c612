"""``tailtune serve``: an HTTP API over the finished systems of a run (FastAPI).

- ``POST /predict`` ``{"texts": [str, ...], "system": name?, "top_k": int?}`` ->
  ``{"system": name, "predictions": [{"label", "confidence", "top_k": [{"label", "confidence"}, ...]}]}``;
  without ``system`` the run's best system by test macro-F1 answers; ``top_k`` defaults to 1.
- ``GET /health``; ``GET /systems``: name, kind, backbone, method, classes, shared_base,
  default (the system that answers without ``system``).

Requests are checked before any model runs: an empty list or an item that is not a string
-> 422; more than ``max_batch`` texts or a text longer than ``max_chars`` characters -> 413;
an unknown system -> 404. A text the model cannot read (empty, no tokens, a lone surrogate)
-> 422, from the predictor's own check, before its forward pass.

LoRA systems of one run that share a base model are served from one copy of the base
weights: every adapter is loaded into one peft model (``load_adapter``), each keeps its own
``score`` head, and a request switches adapter and head under a lock. Other systems are
loaded with their adapter merged (:func:`tailtune.deploy.load_predictor`). Models are
loaded when the app is created, so a bad run directory fails before the port opens, and are
released when the app shuts down (uvicorn turns SIGTERM into a graceful shutdown).
"""

from __future__ import annotations

import gc
import json
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from tailtune import deploy
from tailtune.classifier import top_k
from tailtune.errors import TailtuneError


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] = Field(min_length=1)
    system: str | None = None
    top_k: StrictInt | None = Field(default=None, ge=1)  # not true, 2.0 or "2"


class SharedBase:
    """LoRA systems on one copy of a base model; ``predict_proba(name, texts)`` switches to ``name``."""

    def __init__(self, folders: dict[str, Path], device, precision: str = "auto"):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        from tailtune.classifier import TextClassifier, damaged_model

        names = list(folders)
        clf = TextClassifier.load(folders[names[0]])  # its adapter is peft's "default"
        self.model = clf.model_.to(device)
        self.precision = deploy.pick_precision(precision, device)
        self.lock = threading.Lock()
        self.systems: dict[str, dict] = {}
        for name in names:
            with damaged_model(folders[name]):  # a torn adapter or head: one line naming the folder
                meta = deploy.load_meta(folders[name])
                if name == names[0]:
                    adapter, head, tokenizer = "default", self.model.score, clf.tokenizer_
                else:
                    adapter = f"system_{len(self.systems)}"  # peft refuses '.' in a name (@dropout=0.1)
                    self.model.backbone.load_adapter(str(folders[name] / "adapter"), adapter_name=adapter)
                    state = load_file(str(folders[name] / "head.safetensors"))
                    # decoder heads are bias-free, like transformers' <Family>ForSequenceClassification.score
                    head = torch.nn.Linear(self.model.score.in_features, len(meta["classes"]), bias="bias" in state)
                    head.load_state_dict(state)
                    head = head.to(device).eval().requires_grad_(False)
                    tokenizer = AutoTokenizer.from_pretrained(folders[name] / "tokenizer")
                    tokenizer.padding_side = meta["padding_side"]
                self.systems[name] = {
                    "adapter": adapter,
                    "head": head,
                    "tokenizer": tokenizer,
                    "pooling": meta["pooling"],
                    "classes": meta["classes"],
                    "max_length": meta["backbone"]["max_length"],
                    "batch_size": meta["backbone"]["eval_batch_size"],
                }
        self.model.backbone.requires_grad_(False)

    def predict_proba(self, name: str, texts: list[str]) -> np.ndarray:
        from tailtune.classifier import run_forward, softmax, tokenize

        s = self.systems[name]
        ids = tokenize(s["tokenizer"], texts, s["max_length"])
        with self.lock:  # adapter, head and pooling are state of the one shared model
            self.model.backbone.set_adapter(s["adapter"])
            self.model.score = s["head"]
            self.model.pooling = s["pooling"]
            logits = run_forward(self.model, s["tokenizer"], ids, s["batch_size"], self.precision, "logits")
        return softmax(logits)


class _AdapterView(deploy.Predictor):
    """One system of a :class:`SharedBase`, with the :class:`~tailtune.deploy.Predictor` face."""

    def __init__(self, shared: SharedBase, name: str, info: dict):
        self.shared, self.name = shared, name
        self.classes_ = shared.systems[name]["classes"]
        self.kind, self.info = "finetune", info

    @property
    def params(self) -> int:
        from tailtune.classifier import count_params

        return count_params(self.shared.model)[1]

    def predict_proba(self, texts, progress=None) -> np.ndarray:
        return self.shared.predict_proba(self.name, texts)


class Registry:
    """The served systems of a run: name -> predictor, a lock each, and what /systems shows."""

    def __init__(
        self, run_dir: str | Path, systems: list[str] | None = None, device: str = "auto", precision: str = "auto"
    ):
        from tailtune.run import read_comparison

        run_dir = Path(run_dir)
        names = deploy.finished_systems(run_dir, systems)
        device = deploy.pick_device(device)
        folders = {n: deploy.resolve_system(run_dir / "systems" / n)[1] for n in names}
        groups: dict[str, list[str]] = {}
        for name in names:
            meta = deploy.load_meta(folders[name])
            if meta.get("method") == "lora":
                bb = meta["backbone"]
                groups.setdefault(json.dumps([bb["spec"], bb["path"], bb["model_type"]]), []).append(name)
        self.predictors: dict[str, deploy.Predictor] = {}
        self.shared_base: dict[str, dict | None] = dict.fromkeys(names)
        for group in (g for g in groups.values() if len(g) > 1):
            shared = SharedBase({n: folders[n] for n in group}, device, precision)
            for name in group:
                meta = deploy.load_meta(folders[name])
                info = {"backbone": meta["backbone"]["name"], "method": "lora"}
                self.predictors[name] = _AdapterView(shared, name, info)
                self.shared_base[name] = {"backbone": meta["backbone"]["name"], "systems": group}
        for name in names:
            if name not in self.predictors:
                self.predictors[name] = deploy.load_predictor(folders[name], device=str(device), precision=precision)
        self.locks = {name: threading.Lock() for name in names}
        macro_f1 = read_comparison(run_dir, needs=("macro_f1",)).set_index("system")["macro_f1"]
        self.default = max(names, key=lambda n: (macro_f1.get(n, float("-inf")), -names.index(n)))

    def describe(self) -> list[dict]:
        return [
            {
                "name": name,
                "kind": p.kind,
                "backbone": p.info.get("backbone"),
                "method": p.info.get("method"),
                "classes": len(p.classes_),
                "shared_base": self.shared_base[name],
                "default": name == self.default,
            }
            for name, p in self.predictors.items()
        ]

    def predict_proba(self, name: str, texts: list[str]) -> np.ndarray:
        with self.locks[name]:
            return self.predictors[name].predict_proba(texts)

    def close(self) -> None:
        """Drop every model and give the memory back."""
        self.predictors.clear()
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def create_app(
    run_dir: str | Path,
    systems: list[str] | None = None,
    max_batch: int = 256,
    max_chars: int = 20000,
    device: str = "auto",
    precision: str = "auto",
) -> FastAPI:
    """The API over the finished systems of ``run_dir`` (all, or those named in ``systems``).

    ``precision`` as in :func:`tailtune.deploy.load_predictor` (auto: bf16 where native).
    """
    if max_batch < 1 or max_chars < 1:
        raise TailtuneError(f"--max-batch and --max-chars must be at least 1, got {max_batch} and {max_chars}")
    registry = Registry(run_dir, systems, device, precision)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            registry.close()

    app = FastAPI(title="tailtune", lifespan=lifespan)
    app.state.registry = registry

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes the offending input, and a NaN or 1e400 in the body cannot be
        # written back as JSON: that was a 500. Where and what, without the value.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "systems": len(registry.predictors), "default": registry.default}

    @app.get("/systems")
    def list_systems() -> dict:
        return {"default": registry.default, "systems": registry.describe()}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict:
        texts = request.texts
        if len(texts) > max_batch:
            raise HTTPException(413, f"at most {max_batch} texts per request, got {len(texts)}")
        for i, text in enumerate(texts):
            if len(text) > max_chars:
                raise HTTPException(413, f"text {i} has {len(text)} characters; the limit is {max_chars}")
        name = registry.default if request.system is None else request.system  # "" is no system's name
        if name not in registry.predictors:
            raise HTTPException(404, f"unknown system '{name}' (served: {', '.join(registry.predictors)})")
        classes = registry.predictors[name].classes_
        k = request.top_k or 1
        if k > len(classes):
            raise HTTPException(422, f"top_k {k} is more than the system's {len(classes)} classes")
        try:
            proba = registry.predict_proba(name, texts)
        except TailtuneError as exc:  # a text the model cannot read (empty, no tokens, a lone surrogate)
            raise HTTPException(422, str(exc)) from None
        labels, confidence = top_k(proba, classes, k)
        return {
            "system": name,
            "predictions": [
                {
                    "label": row_labels[0],
                    "confidence": float(row_conf[0]),
                    "top_k": [
                        {"label": lab, "confidence": float(c)} for lab, c in zip(row_labels, row_conf, strict=True)
                    ],
                }
                for row_labels, row_conf in zip(labels, confidence, strict=True)
            ],
        }

    return app


def check_port(host: str, port: int) -> None:
    """Refuse a port outside 0-65535, or one that ``host`` cannot bind (taken, or not allowed)."""
    import socket

    if not 0 <= port <= 65535:
        raise TailtuneError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TailtuneError(f"--host {host!r} does not resolve: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise TailtuneError(
                f"cannot listen on {host}:{port}: {exc.strerror}; pass another --port (or --host)"
            ) from None


def serve(
    run_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    systems: list[str] | None = None,
    max_batch: int = 256,
    max_chars: int = 20000,
    precision: str = "auto",
) -> None:
    """Build the app and run it with uvicorn until SIGINT/SIGTERM.

    The port is checked before the models load, so a taken port is one line, not a traceback
    after the wait."""
    check_port(host, port)
    app = create_app(run_dir, systems, max_batch=max_batch, max_chars=max_chars, precision=precision)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=30)
