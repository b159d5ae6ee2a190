"""FSDP2 through Lightning's ``ModelParallelStrategy`` on CPU (gloo, 2 processes), against an unsharded run.

Each ``Linear`` of a small MLP is put under ``fully_shard``; its 37 output rows split unevenly (19 and
18). Every rank reads its own half of each global batch (rank r takes rows r, r + 2, ...; no
distributed sampler), so the gradients FSDP2 averages are those of the unsharded model on the global
batch, which a one-process reference fit in this process sees. For each callback both fits must give:

- the same norms (the monitor's total and per-layer norms, the clippers' ``clip/*`` values), computed
  from the local shards and summed over the mesh, to float32 rounding;
- the same decisions (clipped or not, the thresholds, the guard's skips) and so the same final weights;
- a NaN written into rank 1's shard alone (after the reduce-scatter) makes both ranks skip that step.

HistogramLogger's records (weights and gradients) equal the unsharded run's. AGC clips units whole on a
rank (FSDP2 rows, column-wise) and split across ranks (row-wise, biases); InitSwap's report and weights
(full-tensor draws, LSUV on the global batch) equal the unsharded run's. AdaGC, MomentReset and
UpdateMonitor run together on AdamW: AdaGC's per-tensor levels and ``clip/*`` values, the count of
spike-clipped elements, and the update-to-weight ratios, Adam's update norm and the jump flag (which
rises after a moment reset) equal the unsharded run's.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from tb_events import histograms, load_events
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stability_callbacks import (
    AGC,
    AdaGC,
    AutoClip,
    GradientMonitor,
    HistogramLogger,
    InitSwap,
    MomentReset,
    NonFiniteGuard,
    NormClip,
    StabilityAutopilot,
    UpdateMonitor,
    ValueClip,
    ZClip,
    adam_update_norms,
)
from stability_callbacks.update_monitor import snapshot_weights_, update_norms_

pytestmark = [
    pytest.mark.ddp,
    # the resumed fits start mid-epoch from a checkpoint of a plain (not resumable) data loader
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
]

STEPS = 6
BATCH = 8  # rows per rank and step; the reference takes 2 * BATCH
NAN_STEP = 3
DEADLINE_S = 300.0
SCENARIOS = [
    "GradientMonitor",
    "NormClip",
    "ZClip",
    "AutoClip",
    "ValueClip",
    "NonFiniteGuard",
    "tensor_parallel",
    "HistogramLogger",
    "HistogramLogger_tensor_parallel",
    "StabilityAutopilot",
    "AGC",
    "AGC_tensor_parallel",
    "InitSwap",
    "InitSwap_tensor_parallel",
    "Updates",
    "Updates_tensor_parallel",
]
ADAM_SCENARIOS = ("StabilityAutopilot", "Updates", "Updates_tensor_parallel")


class ShardedMLP(pl.LightningModule):
    """8 -> width -> width -> 3 with tanh. Under FSDP2 each Linear is put under fully_shard (37 rows split
    19 + 18); under tensor parallelism (an even width: DTensor's matmuls need even halves) the first two
    Linear layers are split column- then row-wise and the head stays whole on every rank."""

    def __init__(self, width: int = 37) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)
        )

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if self.device_mesh["tensor_parallel"].size() > 1:  # column- then row-wise; the head stays whole
            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class PoisonShard(Callback):
    """At step ``NAN_STEP``, a NaN in one element of the first layer's gradient: on one rank's shard only
    (sharded fit) or in the full gradient (reference), before any other callback."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        if trainer.global_step != NAN_STEP or trainer.global_rank != max(self.rank, 0):
            return
        grad = pl_module.net[0].weight.grad
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        local.view(-1)[0] = float("nan")


class Record(Callback):
    """After every other callback: the monitor's numbers, the clippers' decision counters."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        row: dict[str, Any] = {"step": trainer.global_step}
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, GradientMonitor) and cb.last_diagnosis is not None:
                row["total"] = cb.last_diagnosis.total_norm
                row["depth_ratio"] = cb.last_diagnosis.depth_ratio
            if hasattr(cb, "clipped_steps"):
                row["clipped"] = float(cb.clipped_steps)
            if isinstance(cb, NonFiniteGuard):
                row["skipped"] = cb.skipped
            if isinstance(cb, StabilityAutopilot):
                row["skipped"], row["rollbacks"] = cb.skipped, cb.rollbacks
            if isinstance(cb, (RecordedAGC, RecordedAdaGC)):  # the clip/* numbers of this step
                for key in ("norm_pre", "norm_post", "threshold", "coef", "clipped"):
                    row[f"clip/{key}"] = float(getattr(cb.decision, key))
            if isinstance(cb, AdaGC) and cb.gamma is not None:  # each tensor's level, after this step
                row.update({f"adagc/{n}": float(g) for n, g in zip(cb.names, cb.gamma, strict=True)})
            if isinstance(cb, RecordedMomentReset):
                result = cb.result
                row["moment/reset"], row["moment/clip_active"] = result.reset, result.clip_active
                row["moment/spike_clipped"] = None if result.clipped is None else float(result.clipped)
            if isinstance(cb, InitSwap) and cb.last_report is not None:  # the report, per parameter
                for r in cb.last_report.records:
                    row[f"init/{r.param}"] = (r.scheme, r.shape, r.modified)
                    row[f"init_old_std/{r.param}"], row[f"init_new_std/{r.param}"] = r.old_std, r.new_std
                for layer, res in cb.last_report.lsuv.items():
                    row[f"lsuv/{layer}"] = (res.tries, res.converged)
                    row[f"lsuv_before/{layer}"], row[f"lsuv_after/{layer}"] = res.std_before, res.std_after
        self.steps.append(row)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """After the optimizer step: the update monitor's measurement of it."""
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            result = cb.last_result if isinstance(cb, UpdateMonitor) else None
            if result is not None and self.steps and result.step == self.steps[-1]["step"]:
                row = self.steps[-1]
                median = float(result.median)
                row["update/ratio"] = float(result.ratio)
                row["update/median"] = None if math.isnan(median) else median  # NaN before any sample
                row["update/jump"], row["update/high"] = bool(result.jump), bool(result.high)
                row["update/adam_norm"] = None if result.adam_norm is None else float(result.adam_norm)
                for name, value in zip(result.layer_names, result.layer_ratios.tolist(), strict=True):
                    row[f"update/ratio/{name}"] = value


class RecordedAdaGC(AdaGC):
    """AdaGC keeping its last decision, so that the ``clip/*`` numbers are compared step by step."""

    def clip(self, *args: Any, **kwargs: Any) -> Any:
        self.decision = super().clip(*args, **kwargs)
        return self.decision


class RecordedMomentReset(MomentReset):
    """MomentReset keeping the result of its last step."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.result = super().step(*args, **kwargs)
        return self.result


class RecordedAGC(AGC):
    """AGC keeping its last decision, so that the ``clip/*`` numbers are compared step by step."""

    def clip(self, *args: Any, **kwargs: Any) -> Any:
        self.decision = super().clip(*args, **kwargs)
        return self.decision


class AdamShardedMLP(ShardedMLP):
    """The same MLP trained with AdamW, so a rollback has optimizer shards (moments) to restore."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def make_callbacks(scenario: str) -> list[Callback]:
    return {
        "GradientMonitor": lambda: [GradientMonitor(log_every_n_steps=1, warn=False)],
        "NormClip": lambda: [NormClip(0.3)],
        "ZClip": lambda: [ZClip(warmup_steps=2, z_thresh=0.5)],
        "AutoClip": lambda: [AutoClip(percentile=50.0)],
        "ValueClip": lambda: [ValueClip(0.02)],
        "NonFiniteGuard": lambda: [NonFiniteGuard(max_consecutive=None)],
        "tensor_parallel": lambda: [GradientMonitor(log_every_n_steps=1, warn=False), NormClip(0.3)],
        "HistogramLogger": lambda: [
            HistogramLogger(every_n_steps=2, bins=16, activations=True, figure_every_n_steps=3)
        ],
        "HistogramLogger_tensor_parallel": lambda: [
            HistogramLogger(every_n_steps=2, bins=16, figure_every_n_steps=0)
        ],
        # units whole on a rank (FSDP2 rows, column-wise) and split across ranks (row-wise, biases)
        "AGC": lambda: [RecordedAGC(clip_factor=0.05)],
        "AGC_tensor_parallel": lambda: [RecordedAGC(clip_factor=0.05, exclude=[])],
        # LSUV: full orthogonal matrices drawn, then scaled in the first step on both ranks' rows
        "InitSwap": lambda: [InitSwap(scheme="lsuv", verbose=False)],
        "InitSwap_tensor_parallel": lambda: [InitSwap(scheme="lsuv", verbose=False)],
        # AdaGC: global clipping for two steps, then per tensor; moment resets before steps 2 and 5, spike
        # clipping from the step after each; the ratio jumps on the fresh Adam step after a reset
        "Updates": updates_callbacks,
        "Updates_tensor_parallel": updates_callbacks,
        # the poisoned step is skipped on both ranks, and one skip is enough to roll back to step 2
        "StabilityAutopilot": lambda: [
            StabilityAutopilot(
                clipper=None, reinit=False, snapshot_every_n_steps=2, max_consecutive_skips=1, verbose=False
            )
        ],
    }[scenario]()


def updates_callbacks() -> list[Callback]:
    return [
        RecordedAdaGC(lambda_abs=0.6, lambda_rel=1.5, warmup_steps=2, log_every_n_steps=1),
        RecordedMomentReset(interval=3, theta=50.0, clip_delay=1, log_every_n_steps=1),
        UpdateMonitor(log_every_n_steps=1, factor=1.05, patience=1, min_history=2),
    ]


def global_data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * BATCH * STEPS, 8, generator=g), torch.randint(
        0, 3, (2 * BATCH * STEPS,), generator=g
    )


def fit(scenario: str, out: Path, rank: int | None) -> dict[str, Any]:
    """One fit: sharded on this rank (``rank`` given) or the one-process reference (``rank=None``)."""
    x, y = global_data()
    poison = scenario in ("NonFiniteGuard", "StabilityAutopilot")
    record = Record()
    callbacks = [*make_callbacks(scenario), record]
    if poison:
        callbacks.insert(0, PoisonShard(1 if rank is not None else -1))
    if rank is None or "tensor_parallel" in scenario:  # tensor parallel: every rank sees the whole batch
        loader = DataLoader(TensorDataset(x, y), batch_size=2 * BATCH)  # batch k = both ranks' batch k
    else:
        order = torch.arange(x.shape[0]).view(-1, 2)[:, rank]  # rows r, r + 2, ...
        loader = DataLoader(TensorDataset(x[order], y[order]), batch_size=BATCH)
    tensorboard = scenario.startswith("HistogramLogger")
    logger: Any = TensorBoardLogger(str(out), name="tb", version=0) if tensorboard else False
    if scenario.startswith("Updates"):  # a logger, so that the logging steps (the spike count) run
        logger = CSVLogger(str(out), name="csv", version=0)
    if rank is None:
        trainer = make_trainer(
            out, max_steps=STEPS, max_epochs=None, log_every_n_steps=1, callbacks=callbacks, logger=logger
        )
    else:
        tp = 2 if "tensor_parallel" in scenario else 1
        strategy = ModelParallelStrategy(
            data_parallel_size=2 // tp, tensor_parallel_size=tp, timeout=timedelta(seconds=90)
        )
        trainer = make_trainer(
            out,
            devices=2,
            strategy=strategy,
            max_steps=STEPS,
            max_epochs=None,
            log_every_n_steps=1,
            use_distributed_sampler=False,
            callbacks=callbacks,
            logger=logger,
        )
    model = (AdamShardedMLP if scenario in ADAM_SCENARIOS else ShardedMLP)(
        36 if "tensor_parallel" in scenario else 37
    )
    trainer.fit(model, loader)
    weights = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    result: dict[str, Any] = {"steps": record.steps, "weights": [w.detach().clone() for w in weights]}
    if scenario.startswith("Updates"):  # layer 1 called alone reduces its own norms over the mesh
        params = list(model.parameters())
        buffer = snapshot_weights_(params)
        torch._foreach_zero_(buffer)
        result["weight_norms"] = update_norms_(buffer, params)  # ||0 - w||
        result["adam_norms"] = adam_update_norms(trainer.optimizers[0], params)
    return result


class StateAtStart(Callback):
    """The state of the ZClip of the trainer when training starts (after a checkpoint was restored)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        clipper = next(cb for cb in trainer.callbacks if isinstance(cb, ZClip))  # type: ignore[attr-defined]
        self.state = clipper.state_dict()


def resume_fit(out: Path, devices: int, ckpt: Path | None, steps: int) -> dict[str, Any]:
    """ZClip under FSDP2 on ``devices`` processes, from ``ckpt`` (a distributed checkpoint) if given;
    saves a distributed checkpoint at the end. Returns the ZClip's state at the start and at the end."""
    x, y = global_data()
    clipper, start = ZClip(warmup_steps=2), StateAtStart()
    strategy = ModelParallelStrategy(
        data_parallel_size=devices, tensor_parallel_size=1, timeout=timedelta(seconds=90)
    )
    trainer = make_trainer(
        out, devices=devices, strategy=strategy, max_steps=steps, max_epochs=None, callbacks=[clipper, start]
    )
    trainer.fit(ShardedMLP(), DataLoader(TensorDataset(x, y), batch_size=BATCH), ckpt_path=ckpt)
    trainer.save_checkpoint(out / "ckpt")
    return {"start": start.state, "end": clipper.state_dict(), "global_step": trainer.global_step}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    # Lightning re-seeds every distributed process from PL_GLOBAL_SEED when an earlier seed_everything
    # left it set; the reference fit in the parent is not re-seeded, so neither may the ranks be
    os.environ.pop("PL_GLOBAL_SEED", None)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        try:
            results[scenario] = fit(scenario, Path(out) / scenario, rank)
        except Exception:
            results[scenario] = {"error": traceback.format_exc()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    try:  # a distributed checkpoint, written and resumed by two ranks
        first = resume_fit(Path(out) / "resume", 2, None, STEPS)
        second = resume_fit(Path(out) / "resumed", 2, Path(out) / "resume" / "ckpt", STEPS + 2)
        results["resume"] = {"first": first, "second": second}
    except Exception:
        results["resume"] = {"error": traceback.format_exc()}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every scenario on two spawned FSDP2 ranks; each rank's results."""
    out = tmp_path_factory.mktemp("fsdp2")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(out))) for rank in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"FSDP2 ranks {hung} still running after {DEADLINE_S:.0f} s: a hang")
    assert [p.exitcode for p in procs] == [0, 0]
    return [{"out": out, **torch.load(out / f"rank{rank}.pt", weights_only=True)} for rank in (0, 1)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp2_matches_the_unsharded_run(
    sharded: list[dict[str, Any]], scenario: str, tmp_path: Path
) -> None:
    r0, r1 = (r[scenario] for r in sharded)
    assert "error" not in r0, r0.get("error")
    assert "error" not in r1, r1.get("error")
    reference = fit(scenario, tmp_path, rank=None)
    assert len(r0["steps"]) == len(r1["steps"]) == len(reference["steps"]) == STEPS
    for a, b, ref in zip(r0["steps"], r1["steps"], reference["steps"], strict=True):
        assert a == b  # every rank takes the same decisions and sees the same numbers
        assert a.keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=1e-5), (scenario, key, a["step"])
            else:
                assert a[key] == value, (scenario, key, a["step"])
    for got, want in zip(r0["weights"], reference["weights"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for key in ("weight_norms", "adam_norms"):  # the full tensors' norms, on every rank
        if key in reference:
            torch.testing.assert_close(r0[key], reference[key], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(r1[key], r0[key], rtol=0.0, atol=0.0)
    if scenario == "NonFiniteGuard":
        assert reference["steps"][-1]["skipped"] == 1  # the poisoned step was skipped on both ranks
    if scenario == "StabilityAutopilot":  # rolled back on both ranks, to the same shards as unsharded
        assert reference["steps"][-1]["rollbacks"] == 1 and reference["steps"][-1]["skipped"] == 1
    clippers = ("NormClip", "ZClip", "AutoClip", "ValueClip", "tensor_parallel", "AGC", "AGC_tensor_parallel")
    if scenario in clippers:
        assert reference["steps"][-1]["clipped"] > 0  # the settings clip some steps
    if scenario.startswith("Updates"):  # every rule acted: clipped in both phases, reset, spikes, a jump
        rows = reference["steps"]
        assert [row["clip/clipped"] for row in rows[:2]] == [0.0, 1.0]  # global clipping in warm-up
        assert all(0.0 < row["clip/clipped"] < 1.0 for row in rows[2:])  # then some tensors of each step
        assert [row["moment/reset"] for row in rows] == [False, False, True, False, False, True]
        assert rows[3]["moment/spike_clipped"] > 0
        assert any(row["update/jump"] for row in rows) and not all(row["update/jump"] for row in rows)
        assert all(row["update/adam_norm"] > 0 and row["update/ratio"] > 0 for row in rows)


def test_distributed_checkpoint_resumes_the_callback_state_on_two_ranks_and_on_one(
    sharded: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r0, r1 = (r["resume"] for r in sharded)
    assert "error" not in r0, r0.get("error")
    assert "error" not in r1, r1.get("error")
    saved = r0["first"]["end"]
    assert saved["steps"] == STEPS and saved["policy"]  # the EMA statistics are there
    assert r0["first"]["end"] == r1["first"]["end"]
    assert r0["second"]["start"] == saved  # restored on both ranks from the distributed checkpoint
    assert r1["second"]["start"] == saved
    assert r0["second"]["end"]["steps"] == STEPS + 2  # and counted on from it
    # another world size: one process resumes the two ranks' checkpoint
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    try:
        one = resume_fit(tmp_path, 1, Path(sharded[0]["out"]) / "resume" / "ckpt", STEPS + 2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert one["start"] == saved
    assert one["end"]["steps"] == STEPS + 2


@pytest.mark.parametrize("scenario", ["HistogramLogger", "HistogramLogger_tensor_parallel"])
def test_sharded_histograms_count_the_full_tensors(
    sharded: list[dict[str, Any]], scenario: str, tmp_path: Path
) -> None:
    """Weight and gradient histograms under FSDP2 (uneven shards) and tensor parallelism: every rank bins
    its shard, ranges and counts are reduced, rank zero writes; the records equal the unsharded run's."""
    assert "error" not in sharded[1][scenario], sharded[1][scenario].get("error")
    fit(scenario, tmp_path, rank=None)
    got = load_events(str(Path(sharded[0]["out"]) / scenario / "tb" / "version_0"))
    want = load_events(str(tmp_path / "tb" / "version_0"))
    assert not (Path(sharded[0]["out"]) / scenario / "tb" / "version_1").exists()  # rank zero alone writes
    tags = sorted(t for t in want.Tags()["histograms"] if not t.startswith("activations/"))
    assert len(tags) == 12 and sorted(t for t in got.Tags()["histograms"] if t in tags) == tags
    exact = 0
    for tag in tags:
        a, b = histograms(got, tag), histograms(want, tag)
        assert sorted(a) == sorted(b) == [1, 3, 5], tag
        for step in b:
            ha, hb = a[step], b[step]
            assert ha.num == hb.num, (tag, step)  # every value of the full tensor, once
            # a sum that cancels is as exact as float32 sums of its terms: abs(sum) <= sqrt(num * sum_squares)
            scale = {"sum": math.sqrt(hb.num * hb.sum_squares)}
            for field in ("min", "max", "sum", "sum_squares"):
                want_value = pytest.approx(
                    getattr(hb, field), rel=1e-5, abs=max(1e-7, 1e-6 * scale.get(field, 0.0))
                )
                assert getattr(ha, field) == want_value, (tag, step, field)
            np.testing.assert_allclose(ha.bucket_limit, hb.bucket_limit, rtol=1e-5, atol=1e-7)
            moved = np.abs(np.array(ha.bucket) - np.array(hb.bucket)).sum()
            assert moved <= 2, (tag, step, list(ha.bucket), list(hb.bucket))  # a value at a rounded edge
            exact += moved == 0
    assert exact >= 0.9 * 3 * len(tags)
    if scenario == "HistogramLogger":  # activations: rank zero's own micro-batch (half the global batch)
        assert histograms(got, "activations/net.1")[1].num == BATCH * 37
        assert histograms(want, "activations/net.1")[1].num == 2 * BATCH * 37
        assert sorted(e.step for e in got.Images("grad_flow")) == [2, 5]


@pytest.mark.parametrize(
    "callback", [GradientMonitor, NormClip, ZClip, AGC, AdaGC, InitSwap, MomentReset, UpdateMonitor]
)
def test_flat_shards_of_fsdp1_are_refused_by_the_norm_callbacks(callback: Any) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    cb = callback()
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[cb], gradient_clip_val=None)
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy.*ModelParallelStrategy"):
        cb.setup(trainer, ShardedMLP(), "fit")  # type: ignore[arg-type]
