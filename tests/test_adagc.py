"""AdaGC: the rule by hand, against a naive per-tensor loop and against pytorch_optimizer's AdaGC; the
callback's logging, host syncs, state and resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, host_syncs_per_step, make_loader, make_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from stability_callbacks import AdaGC, adagc_clip_
from stability_callbacks.clip_functions import CLIP_EPS


class AdamMLP(MLPModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def naive_adagc(
    grads: list[list[float]],
    gamma: list[float],
    warmup: bool,
    lambda_abs: float = 1.0,
    lambda_rel: float = 1.05,
    beta: float = 0.98,
    eps: float = 1e-8,
) -> tuple[list[list[float]], list[float]]:
    """The paper's rule on Python floats, one tensor at a time."""
    norms = [math.sqrt(sum(x * x for x in g)) for g in grads]
    total = math.sqrt(sum(n * n for n in norms))
    out, new_gamma = [], []
    for g, n, level in zip(grads, norms, gamma, strict=True):
        if warmup:
            h = min(lambda_abs / (total + CLIP_EPS), 1.0)
            new = min(level, h * n)
        elif math.isinf(level):
            h, new = 1.0, n
        else:
            h = min(lambda_rel * max(level, eps) / max(n, eps), 1.0)
            new = beta * level + (1 - beta) * h * n
        out.append([h * x for x in g])
        new_gamma.append(new)
    return out, new_gamma


# ---------------------------------------------------------------------------------------------------
# Layer 1
# ---------------------------------------------------------------------------------------------------


def test_adagc_by_hand() -> None:
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])]
    gamma = torch.full((2,), math.inf)
    step = adagc_clip_(grads, gamma, warmup=True)  # total 13 -> 1: global clipping
    coef = 1.0 / (13.0 + CLIP_EPS)
    assert step.decision.norm_pre.item() == pytest.approx(13.0)
    assert step.decision.norm_post.item() == pytest.approx(1.0, rel=1e-5)
    assert step.decision.clipped.item() == 1.0 and step.decision.threshold.item() == 1.0
    assert grads[0].tolist() == pytest.approx([3 * coef, 4 * coef], rel=1e-6)
    assert gamma.tolist() == pytest.approx([5 * coef, 12 * coef], rel=1e-6)  # the first norms set it

    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.5])]
    before = gamma.clone()
    step = adagc_clip_(grads, gamma, warmup=False)  # per tensor: 5 > 1.05 * 0.385, 0.5 < 1.05 * 0.923
    limit = 1.05 * before[0].item()
    assert step.coefs.tolist() == pytest.approx([limit / 5.0, 1.0], rel=1e-6)
    assert grads[0].tolist() == pytest.approx([3 * limit / 5, 4 * limit / 5], rel=1e-6)
    assert grads[1].tolist() == [0.0, 0.5]
    assert step.decision.clipped.item() == 0.5  # one tensor of two
    assert gamma[0].item() == pytest.approx(0.98 * before[0].item() + 0.02 * limit, rel=1e-6)
    assert gamma[1].item() == pytest.approx(0.98 * before[1].item() + 0.02 * 0.5, rel=1e-6)
    threshold = math.hypot(1.05 * before[0].item(), 1.05 * before[1].item())
    assert step.decision.threshold.item() == pytest.approx(threshold, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adagc_matches_a_naive_loop_over_a_run_with_spikes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (2, 2, 2), (1,)]
    gamma = torch.full((len(shapes),), math.inf)
    ref_gamma = [math.inf] * len(shapes)
    clipped_some = 0
    for t in range(40):
        scale = 50.0 if t in (12, 25, 26) else 1.0  # spikes, in one tensor or all
        grads = [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]
        if t == 30:
            grads[2] = grads[2] * 100
        ref_in = [x.double().flatten().tolist() for x in grads]
        warm = t < 5
        step = adagc_clip_(grads, gamma, warmup=warm, lambda_abs=2.0)
        ref_out, ref_gamma = naive_adagc(ref_in, ref_gamma, warm, lambda_abs=2.0)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for got, want in zip(grads, ref_out, strict=True):
            assert got.double().flatten().tolist() == pytest.approx(want, rel=tol, abs=1e-6)
        assert gamma.tolist() == pytest.approx(ref_gamma, rel=1e-5)
        clipped_some += int(step.decision.clipped.item() > 0)
    assert clipped_some >= 4


def test_adagc_leaves_a_non_finite_step_alone() -> None:
    gamma = torch.tensor([1.0, 2.0])
    grads = [torch.tensor([float("nan"), 1.0]), torch.tensor([30.0])]
    step = adagc_clip_(grads, gamma, warmup=False)
    assert not step.decision.finite.item() and step.decision.clipped.item() == 0.0
    assert grads[1].item() == 30.0 and gamma.tolist() == [1.0, 2.0]


def test_adagc_starts_a_new_tensor_after_warmup_unclipped() -> None:
    gamma = torch.tensor([1.0, math.inf])
    grads = [torch.tensor([10.0]), torch.tensor([7.0])]
    adagc_clip_(grads, gamma, warmup=False)
    assert grads[0].item() == pytest.approx(1.05) and grads[1].item() == 7.0
    assert gamma.tolist() == pytest.approx([0.98 + 0.02 * 1.05, 7.0])


def test_adagc_equals_pytorch_optimizer_adagc() -> None:
    """Torch's Adam after ``adagc_clip_`` takes the same steps as the peer's Adam with AdaGC built in."""
    peer = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    theirs = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    theirs.load_state_dict(ours.state_dict())
    warmup = 4
    opt = torch.optim.Adam(ours.parameters(), lr=1e-2, eps=1e-8)
    peer_opt = peer.AdaGC(
        theirs.parameters(), lr=1e-2, weight_decay=0.0, warmup_steps=warmup + 1, lambda_abs=0.5, foreach=False
    )
    params = list(ours.parameters())
    gamma = torch.full((len(params),), math.inf)
    g = torch.Generator().manual_seed(1)
    for t in range(20):
        x = torch.randn(16, 6, generator=g) * (40.0 if t in (9, 14) else 1.0)
        y = torch.randint(0, 3, (16,), generator=g)
        for model, optimizer in ((ours, opt), (theirs, peer_opt)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        adagc_clip_([p.grad for p in params], gamma, warmup=t < warmup, lambda_abs=0.5)  # type: ignore[misc]
        opt.step()
        peer_opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    peer_gamma = [peer_opt.state[p]["gamma"] for p in theirs.parameters()]
    assert gamma.tolist() == pytest.approx([float(v) for v in peer_gamma], rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lambda_abs": 0.0}, "lambda_abs"),
        ({"lambda_rel": -1.0}, "lambda_rel"),
        ({"beta": 1.0}, "beta"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"eps": -1e-8}, "eps"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AdaGC(**kwargs)


class GradRecorder(pl.Callback):
    """Records the gradients before and after the clipping callback that follows it."""

    def __init__(self) -> None:
        self.seen: list[list[Tensor]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.seen.append([p.grad.detach().clone() for p in pl_module.parameters()])  # type: ignore[union-attr]


def test_callback_applies_the_rule_per_parameter_in_a_fit(tmp_path: Path) -> None:
    before, after = GradRecorder(), GradRecorder()
    callback = AdaGC(warmup_steps=2, lambda_abs=0.5)
    torch.manual_seed(0)
    model = AdamMLP(lr=0.05)
    trainer = make_trainer(tmp_path, max_steps=8, max_epochs=None, callbacks=[before, callback, after])
    trainer.fit(model, make_loader())
    names = [n for n, _ in model.named_parameters()]
    assert callback.names == names and callback.steps == 8
    gamma = [math.inf] * len(names)
    for t, (pre, post) in enumerate(zip(before.seen, after.seen, strict=True)):
        want, gamma = naive_adagc([g.double().flatten().tolist() for g in pre], gamma, t < 2, lambda_abs=0.5)
        for got, ref in zip(post, want, strict=True):
            assert got.flatten().tolist() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert callback.gamma is not None and callback.gamma.tolist() == pytest.approx(gamma, rel=1e-5)
    assert callback.clipped_steps.item() > 0


def test_logs_on_logging_steps_and_never_syncs_otherwise(tmp_path: Path) -> None:
    callback = AdaGC(warmup_steps=2, log_every_n_steps=3)
    with host_syncs_per_step(callback) as calls_per_step:
        trainer = make_trainer(
            tmp_path, max_steps=7, max_epochs=None, logger=CSVLogger(tmp_path), callbacks=[callback]
        )
        trainer.fit(AdamMLP(), make_loader())
    assert calls_per_step == [[], [], ["tolist"], [], [], ["tolist"], []]
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))  # type: ignore[union-attr]
    logged = [r for r in rows if r.get("clip/threshold")]
    assert [int(r["step"]) for r in logged] == [2, 5]
    assert float(logged[0]["clip/threshold"]) > 0 and float(logged[0]["clip/clipped"]) <= 1.0


def test_state_round_trip_with_weights_only(tmp_path: Path) -> None:
    callback = AdaGC(warmup_steps=1)
    make_trainer(tmp_path, max_steps=3, max_epochs=None, callbacks=[callback]).fit(AdamMLP(), make_loader())
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    copy = AdaGC(warmup_steps=1)
    copy.load_state_dict(torch.load(path, weights_only=True))
    assert copy.names == callback.names and copy.steps == 3
    assert callback.gamma is not None and copy.gamma is not None
    assert torch.equal(copy.gamma, callback.gamma.cpu())
    fresh = AdaGC()
    fresh.load_state_dict({})  # a checkpoint made without the callback: a fresh start
    assert fresh.gamma is None and fresh.steps == 0


def _fit(tmp_path: Path, callback: AdaGC, epochs: int, ckpt: Path | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_epochs=epochs, callbacks=[callback])
    trainer.fit(AdamMLP(lr=0.05), make_loader(n=96), ckpt_path=ckpt)
    return trainer


def _weights(trainer: pl.Trainer) -> list[Tensor]:
    return [p.detach().clone() for p in trainer.lightning_module.parameters()]


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    def factory() -> AdaGC:
        return AdaGC(warmup_steps=3, lambda_abs=0.5, lambda_rel=0.9)

    full = _fit(tmp_path / "full", factory(), epochs=3)
    first = _fit(tmp_path / "first", factory(), epochs=1)
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    resumed_cb = factory()
    resumed = _fit(tmp_path / "resumed", resumed_cb, epochs=3, ckpt=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(resumed), strict=True))
    assert resumed_cb.state_dict() == full.callbacks[0].state_dict()  # type: ignore[attr-defined]
    # Control: without the callback's state the resumed run warms up again and ends elsewhere.
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["callbacks"] = {}
    torch.save(checkpoint, tmp_path / "stateless.ckpt")
    fresh = _fit(tmp_path / "fresh", factory(), epochs=3, ckpt=tmp_path / "stateless.ckpt")
    assert not all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(fresh), strict=True))


# ---------------------------------------------------------------------------------------------------
# DTensor gradients (FSDP2, tensor parallel): two gloo processes on CPU
# ---------------------------------------------------------------------------------------------------

_SHAPES = [(5, 3), (4,), (3, 2)]  # uneven shards of 5 and 3 rows


def _dtensor_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from stability_callbacks import spike_aware_clip_

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        g = torch.Generator().manual_seed(0)
        results: dict[str, Any] = {}
        gamma = torch.full((len(_SHAPES),), math.inf)
        for t in range(4):
            full = [torch.randn(s, generator=g) * (30.0 if t == 3 else 1.0) for s in _SHAPES]
            placements = [[Shard(0)], [Shard(0)], [Replicate()]]
            grads = [distribute_tensor(x, mesh, p) for x, p in zip(full, placements, strict=True)]
            step = adagc_clip_(grads, gamma, warmup=t < 2, lambda_abs=2.0)  # type: ignore[arg-type]
            results[f"adagc{t}"] = ([x.full_tensor() for x in grads], gamma.clone(), step.norms.clone())
        v_full = [torch.rand(s, generator=g) * 1e-2 for s in _SHAPES]
        g_full = [torch.randn(s, generator=g) for s in _SHAPES]
        grads = [distribute_tensor(x, mesh, [Shard(0)]) for x in g_full]
        second = [distribute_tensor(x, mesh, [Shard(0)]) for x in v_full]
        clipped = spike_aware_clip_(grads, second, theta=20.0, count=True)  # type: ignore[arg-type]
        results["spike"] = [x.full_tensor() for x in grads]
        results["spike_count"] = clipped
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_dtensor_gradients_are_clipped_as_the_full_tensors(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    from stability_callbacks import spike_aware_clip_

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.start_processes(_dtensor_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")

    g = torch.Generator().manual_seed(0)
    gamma = torch.full((len(_SHAPES),), math.inf)
    expected: dict[str, Any] = {}
    for t in range(4):
        full = [torch.randn(s, generator=g) * (30.0 if t == 3 else 1.0) for s in _SHAPES]
        step = adagc_clip_(full, gamma, warmup=t < 2, lambda_abs=2.0)
        expected[f"adagc{t}"] = (full, gamma.clone(), step.norms.clone())
        if t == 3:
            assert bool((step.coefs < 1).any())  # the spike step is clipped per tensor
    v_full = [torch.rand(s, generator=g) * 1e-2 for s in _SHAPES]
    g_full = [torch.randn(s, generator=g) for s in _SHAPES]
    clipped = spike_aware_clip_(g_full, v_full, theta=20.0, count=True)
    assert clipped is not None and clipped.item() > 0
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for t in range(4):
            (grads, level, norms), (ref_grads, ref_level, ref_norms) = got[f"adagc{t}"], expected[f"adagc{t}"]
            torch.testing.assert_close(norms, ref_norms)  # the norms of the whole tensors
            torch.testing.assert_close(level, ref_level)
            for a, b in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(a, b)
        for a, b in zip(got["spike"], g_full, strict=True):
            torch.testing.assert_close(a, b)
        assert got["spike_count"].item() == clipped.item()  # counted over the whole tensors
