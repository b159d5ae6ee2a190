"""End to end: logs written by a short fit are served by a real TensorBoard server.

A tiny CPU fit with the library's callbacks writes TensorBoard event files; ``python -m
tensorboard.main`` serves them on 127.0.0.1 (a free port, stopped at teardown), and the test reads
them back through TensorBoard's HTTP data API, the one its web page uses:

* ``/data/plugin/scalars/tags`` and ``/data/plugin/scalars/scalars?run=..&tag=..``
* ``/data/plugin/histograms/tags`` and ``/data/plugin/histograms/histograms?run=..&tag=..``
* ``/data/plugin/images/tags``, ``/data/plugin/images/images?run=..&tag=..`` and
  ``/data/plugin/images/individualImage?blob_key=..``

Only the ``tensorboard`` package is needed (no browser, no network beyond the loopback interface).
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLPModule, make_loader, make_trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from stability_callbacks.monitor import GradientMonitor

try:
    from stability_callbacks.histograms import HistogramLogger
except ImportError:  # the callback is not part of the library yet
    HistogramLogger = None

STEPS = 4
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


@dataclass
class Served:
    """A running server over the logs of one fit, and what that fit logged."""

    url: str
    model: MLPModule
    recorder: RecordingLogger
    image_tags: set[str] = field(default_factory=set)

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
    tags = {"scalars": scalars, "histograms": set(), "images": set()}
    if HistogramLogger is not None:
        params = [n for n, _ in model.named_parameters()]
        tags["histograms"] = {f"weights/{n}" for n in params} | {f"grads/{n}" for n in params}
    return tags


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
    callbacks: list[Any] = [GradientMonitor(log_every_n_steps=1, warn=False)]
    if HistogramLogger is not None:
        callbacks.append(HistogramLogger(log_every_n_steps=2))
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
        result = Served(url, model, recorder)
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
