"""The README's TensorBoard screenshots: a deep sigmoid MLP's vanishing gradients, as TensorBoard shows them.

What it does:

1. trains a 10-layer sigmoid MLP (PyTorch's default initialisation, SGD) on an embedded synthetic
   classification task for a few hundred CPU steps, with ``GradientMonitor`` (``grad_norm/*`` and
   ``grad_health/*`` scalars) and ``HistogramLogger`` (``weights/<param>`` and ``grads/<param>``
   histograms and the ``grad_flow`` picture), logging to a TensorBoardLogger;
2. starts the installed TensorBoard (``python -m tensorboard.main``) on 127.0.0.1 and a free port, and
   waits until its data API lists those tags;
3. opens three TensorBoard pages in headless Chromium and saves them as PNG files:

   * ``tensorboard_scalars.png``: the scalars dashboard filtered to ``grad_norm`` (one chart per
     layer), ``/#scalars&tagFilter=grad_norm&_smoothingWeight=0``;
   * ``tensorboard_histograms.png``: the histograms dashboard with the gradients of the first, a
     middle and the last layer, ``/#histograms&tagFilter=<a regex naming those three tags>``;
   * ``tensorboard_gradient_flow.png``: the images dashboard with the gradient-flow picture,
     ``/#images&tagFilter=grad_flow``;

4. stops the server (and Chromium, if it hangs). The logs stay in ``logs/screenshot/`` (not
   committed): ``tensorboard --logdir logs/screenshot`` opens the same pages interactively.

Needs: the project installed (``pip install -e ".[dev]"``, for matplotlib) and Chromium. On Debian or
Ubuntu, as root::

    apt-get update && apt-get install -y chromium

Run from the repository root (one to two minutes on a 2-core CPU; nothing is downloaded, the browser
only talks to 127.0.0.1)::

    python docs/screenshot.py                                          # docs/tensorboard_*.png
    python docs/screenshot.py --out /tmp/shots --logdir /tmp/shots/logs   # somewhere else

Chromium runs with ``--no-sandbox`` when the script runs as root (as in a container), with a fresh
profile in a temporary directory and background networking off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stability_callbacks.histograms import HistogramLogger
from stability_callbacks.monitor import GradientMonitor

RUN = "deep_sigmoid_mlp"
DEPTH = 10  # Linear layers; the sigmoid sits between them
WIDTH = 64
FEATURES = 16
CLASSES = 4
HERE = Path(__file__).resolve().parent
DEFAULT_LOGDIR = HERE.parent / "logs" / "screenshot"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never a proxy


class DeepSigmoidMLP(pl.LightningModule):
    """``DEPTH`` Linear layers with sigmoid activations, PyTorch's default initialisation, plain SGD."""

    def __init__(self, depth: int = DEPTH, width: int = WIDTH, lr: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        features = FEATURES
        for _ in range(depth - 1):
            layers += [nn.Linear(features, width), nn.Sigmoid()]
            features = width
        layers.append(nn.Linear(features, CLASSES))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def synthetic_loader(n: int = 4096, batch_size: int = 64, seed: int = 0) -> DataLoader:
    """A learnable task with no download: the label is the argmax of a fixed random linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (x @ torch.randn(FEATURES, CLASSES, generator=g)).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def train(logdir: Path, steps: int) -> DeepSigmoidMLP:
    torch.manual_seed(0)
    model = DeepSigmoidMLP()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=TensorBoardLogger(save_dir=str(logdir), name="", version=RUN),
        callbacks=[
            GradientMonitor(log_every_n_steps=10),
            HistogramLogger(
                every_n_steps=max(1, steps // 10), bins=32, figure_every_n_steps=max(1, steps // 10)
            ),
        ],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(logdir),
    )
    trainer.fit(model, synthetic_loader())
    return model


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> object:
    with _OPENER.open(url, timeout=10) as response:
        return json.loads(response.read())


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def missing_tags(url: str, expected: dict[str, set[str]]) -> dict[str, set[str]]:
    """The expected tags that the server does not list (yet) for our run, per plugin."""
    missing: dict[str, set[str]] = {}
    for plugin, tags in expected.items():
        listed = get_json(f"{url}/data/plugin/{plugin}/tags")
        have = set(listed.get(RUN, {})) if isinstance(listed, dict) else set()
        if tags - have:
            missing[plugin] = tags - have
    return missing


@contextlib.contextmanager
def tensorboard(logdir: Path, expected: dict[str, set[str]], timeout: float = 60.0) -> Iterator[str]:
    """Serve ``logdir`` on 127.0.0.1 until the block ends; yields the base URL once ``expected`` is listed.

    The server runs in ``logdir``'s parent with a relative ``--logdir``, so the page shows a short path.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir.name]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            command,
            cwd=logdir.parent,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group with the data server it starts
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    output.seek(0)
                    log = output.read().decode(errors="replace")
                    raise RuntimeError(f"tensorboard exited with code {process.returncode}:\n{log}")
                try:
                    missing = missing_tags(url, expected)
                except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                    missing = {"no answer": {repr(e)}}
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensorboard served no {missing} within {timeout:.0f} s")
                time.sleep(0.2)
            yield url
        finally:
            stop_group(process)


def chromium_binary(given: str | None) -> str:
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(
        "Chromium not found. On Debian/Ubuntu: apt-get update && apt-get install -y chromium "
        "(or pass --chromium /path/to/chrome)."
    )


def screenshot(
    browser: str,
    url: str,
    out: Path,
    size: tuple[int, int],
    budget_ms: int,
    scale: float = 1.0,
    timeout: float = 120.0,
) -> None:
    """Save a PNG of ``url`` as headless Chromium renders it after ``budget_ms`` of virtual time.

    ``size`` is the window in CSS pixels; the PNG has ``scale`` times as many pixels each way.
    """
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        args = [
            browser,
            "--headless",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--force-device-scale-factor={scale}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            url,
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
        out.unlink(missing_ok=True)
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            log, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(process)
            raise RuntimeError(f"Chromium did not finish {url} within {timeout:.0f} s") from None
        finally:
            with contextlib.suppress(ProcessLookupError):  # helpers left behind, if any
                os.killpg(process.pid, signal.SIGKILL)
    if not out.exists():
        raise RuntimeError(f"Chromium wrote no screenshot for {url}:\n{log.decode(errors='replace')[-3000:]}")
    with out.open("rb") as f:
        width, height = struct.unpack(">II", f.read(24)[16:24])
    print(f"{out}: {width}x{height}, {out.stat().st_size / 1024:.0f} KiB  <- {url}")


def page(base: str, dashboard: str, **params: str) -> str:
    """A TensorBoard URL that opens ``dashboard`` with the given hash parameters."""
    fragment = "&".join([dashboard, *(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in params.items())])
    return f"{base}/#{fragment}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory of the PNG files (default: docs/)")
    parser.add_argument(
        "--logdir", type=Path, default=DEFAULT_LOGDIR, help="TensorBoard logs (default: logs/screenshot/)"
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: found on PATH)")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time Chromium waits per page")
    args = parser.parse_args()
    if args.steps < 10:
        raise SystemExit(f"--steps must be at least 10, got {args.steps}")
    browser = chromium_binary(args.chromium)
    args.out.mkdir(parents=True, exist_ok=True)

    logdir = args.logdir.resolve()
    shutil.rmtree(logdir / RUN, ignore_errors=True)  # one fresh run in the pictures
    model = train(logdir, args.steps)

    layers = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    params = [name for name, _ in model.named_parameters()]
    expected = {
        "scalars": {"grad_norm/total", "grad_health/depth_ratio", *(f"grad_norm/{n}" for n in layers)},
        "histograms": {f"grads/{n}" for n in params} | {f"weights/{n}" for n in params},
        "images": {"grad_flow"},
    }
    shown = [layers[0], layers[len(layers) // 2], layers[-1]]  # first, middle, last layer
    histogram_filter = "^grads/(" + "|".join(n.replace(".", r"\.") for n in shown) + r")\.weight$"

    with tensorboard(logdir, expected) as base:
        # (file, page, window size in CSS pixels, device scale factor)
        shots = [
            (
                "tensorboard_scalars.png",
                page(base, "scalars", tagFilter="grad_norm", _smoothingWeight="0"),
                (1500, 1400),
                1.0,
            ),
            (
                "tensorboard_histograms.png",
                page(base, "histograms", tagFilter=histogram_filter),
                (1500, 470),
                1.0,
            ),
            # One image card, drawn at 1.5x so the picture shows at about its own resolution.
            ("tensorboard_gradient_flow.png", page(base, "images", tagFilter="grad_flow"), (1060, 600), 1.5),
        ]
        for name, url, size, scale in shots:
            screenshot(browser, url, args.out / name, size, args.budget_ms, scale)


if __name__ == "__main__":
    main()
