"""End to end: logs written by a short fit are served by a real TensorBoard server.

A tiny CPU fit with the library's callbacks writes TensorBoard event files; ``python -m
tensorboard.main`` serves them on 127.0.0.1 (a free port, stopped at teardown), and the test reads
them back through TensorBoard's HTTP data API, the one its web page uses:

* ``/data/plugin/scalars/tags`` and ``/data/plugin/scalars/scalars?run=..&tag=..``
* ``/data/plugin/histograms/tags`` and ``/data/plugin/histograms/histograms?run=..&tag=..``
* ``/data/plugin/images/tags``, ``/data/plugin/images/images?run=..&tag=..`` and
  ``/data/plugin/images/individualImage?blob_key=..``

Checked: every scalar tag of GradientMonitor is served with the values it logged; every
``weights/<param>`` and ``grads/<param>`` histogram of HistogramLogger is served with the range and
bucket counts of a naive count over the same tensors; the ``grad_flow`` picture is served as the PNG
that the same statistics, counted naively, draw. Needs the ``tensorboard`` package and matplotlib
(no browser, no network beyond the loopback interface).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import MLPModule, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.optim import Optimizer

from stability_callbacks.histograms import HistogramLogger, grad_flow_image
from stability_callbacks.monitor import GradientMonitor

STEPS = 4
HIST_EVERY = 2  # histograms and the gradient-flow picture on steps 1 and 3
HIST_STEPS = [s for s in range(STEPS) if (s + 1) % HIST_EVERY == 0]
BINS = 16
RUN = "fit/run"  # TensorBoardLogger(save_dir=logdir, name="fit", version="run") -> run "fit/run"
SERVER_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.1

# Talk to 127.0.0.1 directly, whatever proxy the environment configures.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call: what the callbacks handed to the loggers, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> list[tuple[int | None, float]]:
        """(step, value) of every logged value of ``key``, in logging order."""
        return [(step, float(m[key])) for step, m in self.rows if key in m]

    def logged_keys(self) -> set[str]:
        return {k for _, m in self.rows for k in m}


class TensorSpy(Callback):
    """Copies of every parameter and gradient on the histogram steps, as the optimizer sees them."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.grads: dict[int, dict[str, Tensor]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if trainer.global_step in HIST_STEPS:
            named = list(pl_module.named_parameters())
            self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in named}
            self.grads[trainer.global_step] = {
                n: p.grad.detach().clone() for n, p in named if p.grad is not None
            }


@dataclass
class Served:
    """A running server over the logs of one fit, and what that fit logged."""

    url: str
    model: MLPModule
    recorder: RecordingLogger
    spy: TensorSpy

    def get(self, route: str, **query: Any) -> bytes:
        address = self.url + route + ("?" + urllib.parse.urlencode(query) if query else "")
        with _OPENER.open(address, timeout=10) as response:
            return bytes(response.read())

    def json(self, route: str, **query: Any) -> Any:
        return json.loads(self.get(route, **query))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def layer_names(model: torch.nn.Module) -> list[str]:
    """Modules that own parameters directly (the library's notion of a layer)."""
    return [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def float32(x: float) -> float:
    """``x`` rounded to float32, as a TensorBoard scalar event stores it."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def expected_tags(model: torch.nn.Module) -> dict[str, set[str]]:
    """Tags each TensorBoard plugin must serve for our callbacks, from the model's own names."""
    scalars = {"grad_norm/total", *(f"grad_norm/{n}" for n in layer_names(model))}
    scalars |= {f"grad_health/{k}" for k in ("depth_ratio", "vanishing", "exploding", "nonfinite")}
    params = [n for n, _ in model.named_parameters()]
    histograms = {f"weights/{n}" for n in params} | {f"grads/{n}" for n in params}
    return {"scalars": scalars, "histograms": histograms, "images": {"grad_flow"}}


def missing_tags(served: Served, expected: dict[str, set[str]]) -> dict[str, set[str]]:
    """Expected tags that the server does not list (yet) for our run, per plugin."""
    missing: dict[str, set[str]] = {}
    for plugin, tags in expected.items():
        listed = served.json(f"/data/plugin/{plugin}/tags").get(RUN, {})
        if tags - set(listed):
            missing[plugin] = tags - set(listed)
    return missing


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    output: Path

    def describe(self) -> str:
        code = self.process.poll()
        state = "still running" if code is None else f"exited with code {code}"
        return f"tensorboard {state}; its output:\n{self.output.read_text(errors='replace')[-4000:]}"

    def stop(self) -> None:
        """Stop the server and the data-loading process it started (one process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        else:  # the server exited; a data-loading child may still hold the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)


def start_server(logdir: Path, workdir: Path) -> tuple[Server, str]:
    port = free_port()
    output = workdir / "tensorboard.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown stops its children too
        )
    return Server(process, output), f"http://127.0.0.1:{port}"


def wait_until_served(server: Server, served: Served, expected: dict[str, set[str]]) -> None:
    """Poll the data API until every expected tag is listed; fail with a clear message after a timeout."""
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    last: str = "no answer yet"
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"TensorBoard stopped before serving the logs. {server.describe()}")
        try:
            missing = missing_tags(served, expected)
            if not missing:
                return
            last = f"tags not listed yet: {missing}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as e:
            last = f"no answer from {served.url}: {e!r}"
        if time.monotonic() > deadline:
            pytest.fail(
                f"TensorBoard did not serve our tags within {SERVER_TIMEOUT_S:.0f} s ({last}). "
                f"{server.describe()}"
            )
        time.sleep(POLL_INTERVAL_S)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("tensorboard")
    logdir = workdir / "logs"
    torch.manual_seed(0)
    model = MLPModule(depth=3, width=16, activation=torch.nn.Sigmoid)
    recorder = RecordingLogger()
    spy = TensorSpy()
    callbacks: list[Callback] = [
        GradientMonitor(log_every_n_steps=1, warn=False),
        HistogramLogger(every_n_steps=HIST_EVERY, bins=BINS, figure_every_n_steps=HIST_EVERY),
        spy,
    ]
    trainer = make_trainer(
        workdir,
        logger=[TensorBoardLogger(save_dir=str(logdir), name="fit", version="run"), recorder],
        callbacks=callbacks,
        max_steps=STEPS,
        log_every_n_steps=1,
    )
    trainer.fit(model, make_loader(n=16 * STEPS, batch_size=16))

    server, url = start_server(logdir, workdir)
    try:
        result = Served(url, model, recorder, spy)
        wait_until_served(server, result, expected_tags(model))
        yield result
    finally:
        server.stop()


def test_server_lists_our_run(served: Served) -> None:
    assert served.json("/data/runs") == [RUN]


def test_scalar_tags_are_served(served: Served) -> None:
    listed = set(served.json("/data/plugin/scalars/tags")[RUN])
    expected = expected_tags(served.model)["scalars"]
    assert expected <= listed
    # Everything the monitor logged is served, and every served gradient key was logged by it.
    ours = {k for k in listed if k.startswith(("grad_norm/", "grad_health/"))}
    assert ours == {k for k in served.recorder.logged_keys() if k.startswith(("grad_norm/", "grad_health/"))}


def test_served_scalars_equal_what_the_callback_logged(served: Served) -> None:
    for tag in sorted(expected_tags(served.model)["scalars"]):
        logged = served.recorder.series(tag)
        assert [step for step, _ in logged] == list(range(STEPS)), tag  # every step logs
        rows = served.json("/data/plugin/scalars/scalars", run=RUN, tag=tag)
        assert [(step, value) for _, step, value in rows] == [(s, float32(v)) for s, v in logged], tag


def test_served_total_norm_is_the_norm_of_the_served_layer_norms(served: Served) -> None:
    layers = layer_names(served.model)
    assert layers == ["net.0", "net.2", "net.4"]

    def values(tag: str) -> dict[int, float]:
        rows = served.json("/data/plugin/scalars/scalars", run=RUN, tag=tag)
        return {step: value for _, step, value in rows}

    total = values("grad_norm/total")
    per_layer = [values(f"grad_norm/{n}") for n in layers]
    for step, norm in total.items():
        assert norm > 0
        assert norm == pytest.approx(math.sqrt(sum(v[step] ** 2 for v in per_layer)), rel=1e-5)
    first, last = per_layer[0], per_layer[-1]
    ratio = values("grad_health/depth_ratio")
    for step in total:
        assert ratio[step] == pytest.approx(first[step] / last[step], rel=1e-5)


def test_histogram_tags_are_served(served: Served) -> None:
    listed = set(served.json("/data/plugin/histograms/tags")[RUN])
    params = [n for n, _ in served.model.named_parameters()]
    assert len(params) == 6
    assert {f"weights/{n}" for n in params} | {f"grads/{n}" for n in params} <= listed


def test_served_histograms_match_the_tensors(served: Served) -> None:
    """Each served histogram has the tensor's range and, bucket by bucket, the counts of a naive count."""
    for kind, recorded in (("weights", served.spy.weights), ("grads", served.spy.grads)):
        assert sorted(recorded) == HIST_STEPS
        for name, _ in served.model.named_parameters():
            rows = served.json("/data/plugin/histograms/histograms", run=RUN, tag=f"{kind}/{name}")
            assert [step for _, step, _ in rows] == HIST_STEPS, (kind, name)
            for _, step, buckets in rows:
                values = recorded[step][name].double().flatten().numpy()
                left = np.array([b[0] for b in buckets])
                right = np.array([b[1] for b in buckets])
                counts = np.array([b[2] for b in buckets])
                assert len(buckets) == BINS
                np.testing.assert_array_equal(left[1:], right[:-1])  # contiguous buckets
                assert left[0] == pytest.approx(values.min(), rel=1e-6, abs=1e-12), (kind, name, step)
                assert right[-1] == pytest.approx(values.max(), rel=1e-6, abs=1e-12), (kind, name, step)
                assert counts.sum() == values.size, (kind, name, step)
                reference, _ = np.histogram(values, bins=np.append(left, right[-1]))
                np.testing.assert_array_equal(counts, reference, err_msg=f"{kind}/{name} step {step}")


def test_gradient_flow_image_is_served(served: Served) -> None:
    assert "grad_flow" in served.json("/data/plugin/images/tags")[RUN]
    entries = served.json("/data/plugin/images/images", run=RUN, tag="grad_flow")
    assert [e["step"] for e in entries] == HIST_STEPS
    png = served.get("/data/plugin/images/individualImage?" + entries[-1]["query"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    served_image = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))
    assert served_image.shape == (height, width, 3)

    # The same picture drawn from per-layer statistics counted naively from the spied gradients.
    step = HIST_STEPS[-1]
    grads = served.spy.grads[step]
    layers = layer_names(served.model)
    means, maxes = [], []
    for layer in layers:
        values = torch.cat([g.flatten() for n, g in grads.items() if n.rpartition(".")[0] == layer])
        means.append(values.abs().double().mean().item())
        maxes.append(values.abs().max().item())
    assert maxes[0] < maxes[-1]  # sigmoid: smaller gradients toward the input
    expected = grad_flow_image(layers, means, maxes, title=f"gradient flow, step {step}")
    assert served_image.shape == expected.shape
    assert (served_image != expected).any(axis=-1).mean() < 0.001
