"""AGC's unit norms and statistics on DTensor shards, in one process: two simulated ranks.

Each rank is a thread that holds DTensors built from its own shards (uneven: 19 and 18 rows or
columns of 37) with the global shape; the collectives of :mod:`stability_callbacks.agc` are replaced by
an exchange between the two threads, so the reduction code runs as it does on two real ranks. Every
result is compared with the whole tensors: ``torch.linalg.vector_norm(dim=...)`` for the unit norms,
:func:`adaptive_clip_grad_` on the unsharded tensors for the clipped gradients and the statistics.
The same code on two real processes, against an unsharded fit, is in ``test_sharded.py``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

import stability_callbacks.agc as agc
from stability_callbacks.agc import UnitwisePlan, adaptive_clip_grad_, unitwise_norms

DTensor = pytest.importorskip("torch.distributed.tensor").DTensor
from torch.distributed.tensor import Replicate, Shard  # noqa: E402

ROWS = (19, 18)  # 37 split unevenly, as torch.chunk and FSDP2 do


@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    """A one-process gloo group and its 1-D device mesh (the simulated ranks share it)."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class TwoRanks:
    """Runs a function on two threads, rank 0 and rank 1, whose ``reduce_over_shards`` calls meet: each
    all-reduce sums (or takes the maximum of) the two threads' values, as two processes would."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=30)
        self.slots: list[Tensor | None] = [None, None]
        self.local = threading.local()
        self.calls = [0, 0]

    def reduce(self, values: Tensor, shards: dict[Any, Any], op: Any) -> Tensor:
        rank = self.local.rank
        for positions in shards.values():
            index = positions if isinstance(positions, Tensor) else torch.tensor(positions, dtype=torch.long)
            part = values.index_select(0, index)
            self.slots[rank] = part
            self.barrier.wait()
            other = self.slots[1 - rank]
            assert other is not None and other.shape == part.shape  # the collectives line up
            both = part + other if op == dist.ReduceOp.SUM else torch.maximum(part, other)
            self.barrier.wait()
            values = values.index_copy(0, index, both)
            self.calls[rank] += 1
        return values

    def run(self, fn: Callable[[int], Any], monkeypatch: pytest.MonkeyPatch) -> list[Any]:
        monkeypatch.setattr(agc, "reduce_over_shards", self.reduce)
        out: list[Any] = [None, None]
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            self.local.rank = rank
            try:
                out[rank] = fn(rank)
            except BaseException as error:  # surfaced in the test's thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


def shard(full: Tensor, dim: int, rank: int) -> Tensor:
    """Rank ``rank``'s part of ``full`` along ``dim`` (19 and 18 of 37)."""
    return full.split(ROWS, dim=dim)[rank].clone() if full.shape[dim] == sum(ROWS) else full.clone()


def as_dtensor(full: Tensor, dim: int | None, rank: int, mesh: Any) -> Tensor:
    """A DTensor of the global shape of ``full`` holding rank ``rank``'s shard (``dim=None``: replicated)."""
    if dim is None:
        return DTensor.from_local(full.clone(), mesh, [Replicate()], run_check=False)
    local = shard(full, dim, rank)
    return DTensor.from_local(
        local, mesh, [Shard(dim)], run_check=False, shape=full.shape, stride=full.stride()
    )


def full_model(seed: int = 0) -> tuple[list[Tensor], list[Tensor], list[int | None]]:
    """Weights, gradients (with some large rows, so that some units clip) and each tensor's shard dim:
    FSDP2 rows, a row-wise TP weight (columns), a 1-D bias, a replicated head, a conv kernel's channels."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 8), (5, 37), (37,), (3, 37), (37, 2, 3, 3)]
    dims: list[int | None] = [0, 1, 0, None, 0]
    weights = [torch.randn(s, generator=g) for s in shapes]
    grads = [0.05 * torch.randn(s, generator=g) for s in shapes]
    grads[0][::3] *= 40.0
    grads[1][:, 30:] *= 60.0  # on rank 1's columns only
    grads[4][20:] *= 30.0
    return weights, grads, dims


def sharded_params(rank: int, mesh: Any, seed: int = 0) -> list[Tensor]:
    weights, grads, dims = full_model(seed)
    params = []
    for w, g, d in zip(weights, grads, dims, strict=True):
        p = torch.nn.Parameter(as_dtensor(w, d, rank, mesh))
        p.grad = as_dtensor(g, d, rank, mesh)
        params.append(p)
    return params


def test_the_plan_knows_which_shards_split_units_and_which_split_every_unit(mesh: Any) -> None:
    params = sharded_params(0, mesh)
    plan = UnitwisePlan(params)
    assert plan.sharded
    (reduced,) = plan.reduced_units.values()
    (split,) = plan.split_tensors.values()
    by_input = {i: pos for pos, i in enumerate(plan.order)}
    assert sorted(split) == sorted(by_input[i] for i in (0, 4))  # rows and channels: whole units
    offsets = [sum(plan.rows[:pos]) for pos in range(len(plan.rows))]
    want = sorted(
        u for i in (1, 2) for u in range(offsets[by_input[i]], offsets[by_input[i]] + plan.rows[by_input[i]])
    )
    assert sorted(reduced) == want  # columns and the 1-D bias: every unit split
    assert [plan.rows[by_input[i]] for i in range(5)] == [19, 5, 1, 3, 19]  # local units
    assert not UnitwisePlan([p.detach().to_local() for p in params]).sharded


def test_unit_norms_of_uneven_shards_equal_the_whole_tensors(
    mesh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, grads, dims = full_model()
    ranks = TwoRanks()
    got = ranks.run(
        lambda r: unitwise_norms([as_dtensor(g, d, r, mesh) for g, d in zip(grads, dims, strict=True)]),
        monkeypatch,
    )
    for i, (g, d) in enumerate(zip(grads, dims, strict=True)):
        whole = (
            torch.linalg.vector_norm(g.double(), dim=tuple(range(1, g.ndim)))
            if g.ndim > 1
            else g.double().norm()
        )
        if d == 0 and g.ndim > 1:  # each rank holds its rows whole
            torch.testing.assert_close(torch.cat([got[0][i], got[1][i]]).double(), whole, rtol=1e-6, atol=0)
        else:  # every unit on both ranks, with the norm of the whole unit
            torch.testing.assert_close(got[0][i].double(), whole, rtol=1e-6, atol=0)
            assert torch.equal(got[0][i], got[1][i])
    assert ranks.calls == [1, 1]  # one collective for all the split units


def test_tiny_and_huge_units_split_across_ranks_keep_their_norms(
    mesh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Squares of 1e20 overflow float32 and of 1e-25 underflow it: the partial sums are in float64."""
    full = torch.zeros(2, 37)
    full[0, 3], full[0, 30] = 3e20, 4e20  # one on each rank
    full[1, 5], full[1, 33] = 3e-25, 4e-25
    ranks = TwoRanks()
    got = ranks.run(lambda r: unitwise_norms([as_dtensor(full, 1, r, mesh)])[0], monkeypatch)
    for norms in got:
        torch.testing.assert_close(norms, torch.tensor([5e20, 5e-25]), rtol=1e-6, atol=0)


def test_agc_on_shards_clips_as_on_the_whole_tensors(mesh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    weights, grads, dims = full_model()
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    want = adaptive_clip_grad_(params, clip_factor=0.05)
    assert 0.0 < float(want.clipped) < 1.0  # some units clip, some do not

    def step(rank: int) -> tuple[Any, list[Tensor]]:
        sharded = sharded_params(rank, mesh)
        decision = adaptive_clip_grad_(sharded, clip_factor=0.05)
        return decision, [p.grad.to_local() for p in sharded]  # type: ignore[union-attr]

    ranks = TwoRanks()
    (d0, g0), (d1, g1) = ranks.run(step, monkeypatch)
    for field in ("norm_pre", "norm_post", "coef", "clipped", "threshold"):
        a, b, ref = getattr(d0, field), getattr(d1, field), getattr(want, field)
        assert torch.equal(a, b), field  # every rank the same numbers
        torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-7, msg=field)
    for i, (p, d) in enumerate(zip(params, dims, strict=True)):
        assert p.grad is not None
        if d is None:
            torch.testing.assert_close(g0[i], p.grad, rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(g1[i], p.grad, rtol=1e-6, atol=1e-8)
        else:  # each rank clipped its shard with the factors of the whole units
            torch.testing.assert_close(torch.cat([g0[i], g1[i]], dim=d), p.grad, rtol=1e-6, atol=1e-8)
    assert ranks.calls == [3, 3]  # unit norms of the weights and of the gradients, then the statistics


def test_a_nonfinite_unit_on_one_rank_is_nonfinite_on_both(
    mesh: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def step(rank: int) -> Any:
        sharded = sharded_params(rank, mesh)
        if rank == 1:
            sharded[1].grad.to_local()[2, 0] = float("nan")  # type: ignore[union-attr]
        return adaptive_clip_grad_(sharded, clip_factor=0.05)

    d0, d1 = TwoRanks().run(step, monkeypatch)
    assert not bool(d0.finite) and not bool(d1.finite)
