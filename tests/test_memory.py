"""Memory bound of a logging step: HistogramLogger and GradientMonitor on a 21M-parameter model.

Both callbacks log on every step of a 5-layer, 2048-wide MLP (10 parameter tensors of up to 16 MiB).
Step 0 warms up (imports, caches, the event writer); two later logging steps are measured, each inside
the callbacks' own hooks only (``on_train_batch_start``, ``on_before_optimizer_step``,
``on_train_batch_end``, wrapped on the instances), so Lightning's own per-step work is not counted:

1. **Host memory allocated by Python** (:mod:`tracemalloc`, started right before each hook call,
   peak reset, stopped after it): the peak of what the hook allocates, including what it leaves behind (events
   queued for the writer). tracemalloc sees every allocation made through Python's allocators: Python
   objects (lists of floats, dicts, strings, protobuf messages built in Python) and NumPy arrays (NumPy
   reports its data buffers to tracemalloc). It does **not** see torch's own allocator: tensors created
   by torch operators, on the CPU or on a device, are invisible to it. The bound is proportional to
   ``bins x tensors`` plus a constant; a full-size host copy through Python or NumPy (``.tolist()``,
   ``.numpy().copy()``, ``SummaryWriter.add_histogram``, which bins with NumPy on the host) would
   exceed it a hundredfold.
2. **What torch allocates and what goes to the host**, which tracemalloc cannot see: a
   ``TorchDispatchMode`` records the size of every new storage an operator creates inside the hooks
   (views and in-place results are not new storages), and patched ``Tensor.cpu`` / ``Tensor.to``
   (to a CPU device) / ``numpy`` / ``tolist`` / ``item`` / ``__array__`` count the bytes of every
   tensor sent to the host. On this CPU-only machine those calls copy nothing, but on an accelerator
   each is a device-to-host transfer of that many bytes, so counting them is the check that holds there.
   The largest new storage must stay far below one parameter (the histogram code works in fixed-size
   chunks of scratch memory), and the bytes sent to the host must fit the ``(tensors, 7 + bins)``
   statistics table plus the monitor's per-layer norms.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tb_events import histograms, load_events, scalars
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from stability_callbacks import GradientMonitor, HistogramLogger

WIDTH = 2048
LAYERS = 5
BINS = 64
PARAM_BYTES = WIDTH * WIDTH * 4  # one weight matrix, float32: 16 MiB
HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
TRACED_STEP = 1
SPIED_STEP = 2

# Host memory per histogram bin: the bin passes through the host as a float64 in the fetched NumPy
# table (8 B), a Python float in the list ``tolist`` returns (24 B + an 8 B list slot), and two Python
# floats in the Histogram's bucket lists (2 x 32 B), about 104 B; 256 B leaves room for the protobuf
# record queued for the writer.
BYTES_PER_BIN = 256
# Per step, independent of bins: ~30 tag strings, 20 Histogram objects, the monitor's dict of ~10 keys
# and the scalar events, and the list/dict scaffolding around them; each is tens to hundreds of bytes.
CONSTANT_BYTES = 64 * 1024


class WideMLP(pl.LightningModule):
    """``LAYERS`` Linear layers of ``WIDTH`` x ``WIDTH`` (21M parameters), a quadratic loss."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(LAYERS):
            layers += [nn.Linear(WIDTH, WIDTH)] + ([nn.ReLU()] if i < LAYERS - 1 else [])
        self.net = nn.Sequential(*layers)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        return self.net(x).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class NewStorages(TorchDispatchMode):
    """Records the largest storage any operator creates (outputs that alias an input do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                size = t.untyped_storage().nbytes()
                if size > self.largest:
                    self.largest, self.largest_op = size, str(func)
        return out


class HostTransfers:
    """Bytes of the tensors handed to the host-copy methods while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[tuple[str, int]] = []


def _to_host(tensor: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``tensor.to(*args, **kwargs)`` asks for the host: the string ``"cpu"``, or a CPU device
    other than the tensor's own (``t.to(t.device, dtype)`` moves nothing, on any device)."""
    for target in [*args[:1], kwargs.get("device")]:
        if isinstance(target, str) and target.startswith("cpu"):
            return True
        if isinstance(target, torch.device) and target.type == "cpu" and target != tensor.device:
            return True
    return False


@contextmanager
def count_host_transfers() -> Iterator[HostTransfers]:
    counter = HostTransfers()
    names = ["cpu", "to", "numpy", "tolist", "item", "__array__"]
    originals = {name: getattr(Tensor, name) for name in names}

    def wrap(name: str) -> Callable[..., Any]:
        original = originals[name]

        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter.active and (name != "to" or _to_host(self, args, kwargs)):
                counter.calls.append((name, self.numel() * self.element_size()))
            return original(self, *args, **kwargs)

        return counted

    for name in names:
        setattr(Tensor, name, wrap(name))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(Tensor, name, original)


class Measured:
    """Wraps the hooks of some callbacks: Python-heap peaks on one step, torch allocations and host
    transfers on another."""

    def __init__(self, callbacks: list[Callback], transfers: HostTransfers) -> None:
        self.peaks: list[tuple[str, int]] = []
        self.calls = 0
        self.storages = NewStorages()
        self.transfers = transfers
        for cb in callbacks:
            for hook in HOOKS:
                setattr(cb, hook, self._wrap(type(cb).__name__, hook, getattr(cb, hook)))

    def _wrap(self, owner: str, hook: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def measured(trainer: pl.Trainer, *args: Any) -> Any:
            if trainer.global_step == TRACED_STEP:
                self.calls += 1
                already = tracemalloc.is_tracing()  # e.g. under PYTHONTRACEMALLOC
                if not already:
                    tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                try:
                    return original(trainer, *args)
                finally:
                    peak = tracemalloc.get_traced_memory()[1] - base
                    if not already:
                        tracemalloc.stop()
                    self.peaks.append((f"{owner}.{hook}", peak))
            if trainer.global_step == SPIED_STEP:
                self.transfers.active = True
                try:
                    with self.storages:
                        return original(trainer, *args)
                finally:
                    self.transfers.active = False
            return original(trainer, *args)

        return measured


@pytest.mark.slow
def test_logging_step_host_memory_is_bounded_by_bins_times_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = WideMLP()
    params = list(model.parameters())
    assert sum(p.numel() for p in params) > 20_000_000
    n_hist = 2 * len(params)  # weights and gradients

    monitor = GradientMonitor(log_every_n_steps=1)
    hist = HistogramLogger(every_n_steps=1, bins=BINS, figure_every_n_steps=0)
    data = DataLoader(TensorDataset(torch.randn(4 * (SPIED_STEP + 1), WIDTH)), batch_size=4)
    with count_host_transfers() as transfers:
        measured = Measured([monitor, hist], transfers)
        trainer = make_trainer(
            tmp_path,
            max_steps=SPIED_STEP + 1,
            max_epochs=None,
            log_every_n_steps=1,
            logger=TensorBoardLogger(tmp_path, name="mem", version=0),
            callbacks=[monitor, hist],
        )
        trainer.fit(model, data)

    # The measured steps did log: histograms of every tensor and the monitor's norms.
    acc = load_events(str(tmp_path / "mem" / "version_0"))
    assert sorted(histograms(acc, "grads/net.0.weight")) == [0, 1, 2]
    assert sorted(histograms(acc, "weights/net.8.bias")) == [0, 1, 2]
    assert sorted(scalars(acc, "grad_norm/total")) == [0, 1, 2]
    assert measured.calls == 2 * len(HOOKS)

    # 1. Python-allocated host memory of the hooks on the traced step (the sum of their peaks bounds
    # the peak of the whole step: what one hook keeps counts in its own peak).
    bound = BYTES_PER_BIN * BINS * n_hist + CONSTANT_BYTES
    total = sum(peak for _, peak in measured.peaks)
    assert total <= bound, f"the hooks allocated {measured.peaks} B of host memory; bound {bound} B"
    assert total < PARAM_BYTES // 32  # nowhere near one full-size copy of a weight matrix

    # 2. Torch allocations and host transfers on the spied step.
    assert measured.storages.largest <= PARAM_BYTES // 8, (
        f"{measured.storages.largest_op} created {measured.storages.largest} B (a weight is {PARAM_BYTES} B)"
    )
    moved = [size for _, size in transfers.calls]
    assert moved, "the logging step sends its statistics to the host"
    stats_table = n_hist * (7 + BINS) * 8  # float64 rows of histogram_stats
    per_layer = (LAYERS + 1) * 4 * 4  # the monitor's total and per-layer norms, and its scalars
    assert max(moved) <= stats_table, transfers.calls
    assert sum(moved) <= stats_table + per_layer + 1024, transfers.calls
