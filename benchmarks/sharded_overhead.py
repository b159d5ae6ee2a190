"""Step-time overhead of the callbacks under FSDP2 (``ModelParallelStrategy``) on 2 CPU processes.

Run: ``python benchmarks/sharded_overhead.py [--repeats 3] [--steps 30]``.
Two processes (gloo, one torch thread each) train an MLP whose Linear layers are each under
``fully_shard``. Every variant is one fit; the variants are interleaved within each repetition and the
table gives, per variant, the median step time, its ratio to the bare FSDP2 fit and to torch's own
DTensor-aware ``torch.nn.utils.clip_grad_norm_`` called before each optimizer step, the time in the
callbacks' hooks, and the host syncs (``item``, ``tolist``, ``float``, ``int``, ``bool`` on a tensor)
counted in the callbacks' hooks on steps that do not log (the guard reads one flag a step by design).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stability_callbacks import (
    AGC,
    AdaGC,
    AutoClip,
    GradientMonitor,
    MomentReset,
    NonFiniteGuard,
    NormClip,
    StabilityAutopilot,
    UpdateMonitor,
    ZClip,
)
from stability_callbacks._trainer import is_logging_step

WIDTH, DEPTH, BATCH, LOG_EVERY = 512, 8, 64, 50
SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__")


class ShardedMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(DEPTH - 1):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(WIDTH, 10))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TorchClip(Callback):
    """torch's DTensor-aware ``clip_grad_norm_`` before each optimizer step (the baseline to beat)."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 1.0)


VARIANTS: dict[str, Callable[[], list[Callback]]] = {
    "bare FSDP2": lambda: [],
    "torch clip_grad_norm_": lambda: [TorchClip()],
    f"GradientMonitor every {LOG_EVERY}": lambda: [GradientMonitor(warn=False)],
    "NormClip(1.0)": lambda: [NormClip(1.0)],
    "ZClip()": lambda: [ZClip()],
    "AutoClip()": lambda: [AutoClip()],
    "NonFiniteGuard()": lambda: [NonFiniteGuard()],
    "AGC()": lambda: [AGC()],
    "AdaGC()": lambda: [AdaGC()],
    "MomentReset()": lambda: [MomentReset()],
    "UpdateMonitor() (every step)": lambda: [UpdateMonitor()],
    "StabilityAutopilot(reinit=False)": lambda: [StabilityAutopilot(reinit=False, verbose=False)],
}


class Clock(Callback):
    """Step times after a warm-up, time in the other callbacks' per-step hooks, host syncs in them on
    steps that do not log. Put it last; :meth:`watch` wraps the callbacks to measure."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: list[float] = []
        self.hooks: list[float] = []
        self.syncs = 0
        self._t0 = 0.0
        self._in_hooks = 0.0
        self._counting = False

    def watch(self, callback: Callback) -> None:
        for name in (
            "on_train_batch_start",
            "on_before_backward",
            "on_before_optimizer_step",
            "on_train_batch_end",
        ):
            inner = getattr(callback, name)

            def timed(trainer: pl.Trainer, *args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                self._counting = not is_logging_step(trainer, LOG_EVERY)
                t0 = time.perf_counter()
                try:
                    return _inner(trainer, *args, **kwargs)
                finally:
                    self._in_hooks += time.perf_counter() - t0
                    self._counting = False

            setattr(callback, name, timed)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.warmup:
            self.steps.append(time.perf_counter() - self._t0)
            self.hooks.append(self._in_hooks)
        self._in_hooks = 0.0


def count_syncs(clock: Clock) -> Any:
    """Patch tensor-to-host methods to count calls while ``clock`` is counting; returns an undo."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(original: Any) -> Any:
        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if clock._counting:
                clock.syncs += 1
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(original))

    def undo() -> None:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

    return undo


def one_fit(variant: str, steps: int, rank: int, warmup: int = 5) -> tuple[float, float, int]:
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(BATCH * 8, WIDTH, generator=g), torch.randint(0, 10, (BATCH * 8,), generator=g)
    callbacks = VARIANTS[variant]()
    clock = Clock(warmup)
    for cb in callbacks:
        clock.watch(cb)
    undo = count_syncs(clock)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=2,
                strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                max_steps=steps + warmup,
                max_epochs=None,
                logger=pl.loggers.CSVLogger(tmp),
                log_every_n_steps=LOG_EVERY,
                use_distributed_sampler=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                callbacks=[*callbacks, clock],
            )
            trainer.fit(ShardedMLP(), DataLoader(TensorDataset(x, y), batch_size=BATCH))
    finally:
        undo()
    return statistics.mean(clock.steps), statistics.mean(clock.hooks), clock.syncs


def _worker(rank: int, port: int, repeats: int, steps: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name in VARIANTS:
            results[name].append(one_fit(name, steps, rank))
    torch.save(results, Path(out) / f"rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
        s.close()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, port, args.repeats, args.steps, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            sys.exit(f"worker exit codes {[p.exitcode for p in procs]}")
        results = torch.load(Path(out) / "rank0.pt", weights_only=True)
    median = {name: statistics.median(s for s, _, _ in runs) for name, runs in results.items()}
    base, torch_clip = median["bare FSDP2"], median["torch clip_grad_norm_"]
    print(
        f"FSDP2 overhead on 2 CPU processes x 1 thread (torch {torch.__version__}), MLP {DEPTH}x{WIDTH}, "
        f"batch {BATCH} per rank, {args.steps} timed steps, median of {args.repeats}, rank 0\n"
    )
    print(
        "| variant | step_ms | vs bare | vs torch clip_grad_norm_ | hook_ms | host syncs off logging steps |"
    )
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        hook = statistics.median(h for _, h, _ in runs) * 1e3
        syncs = max(c for _, _, c in runs)
        print(
            f"| {name} | {median[name] * 1e3:.2f} | {median[name] / base:.3f} | "
            f"{median[name] / torch_clip:.3f} | {hook:.2f} | {syncs} |"
        )


if __name__ == "__main__":
    main()
