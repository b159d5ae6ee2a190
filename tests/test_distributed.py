"""DDP on CPU (gloo, 2 processes) for the monitor, the histogram logger, every clipper and the guard.

For each callback one 2-rank fit of 8 steps checks, on both ranks:

- identical weights at the end, and at every step identical callback state (the same decisions);
- logs and histograms written by global rank zero only: one event file, named after rank zero's
  process, each logged key once per step;
- a NaN put into rank 1's gradient of ``net.2.weight`` at step 3, before DDP's all-reduce (a hook on
  the parameter), reaches both ranks through the all-reduce: both see it (the monitor's diagnosis, the
  clippers' "non-finite, left alone" counter) and both skip the step (the guard, which runs after them);
  the guard is also shown a NaN that only rank 1 has (written into its gradient after the all-reduce),
  and both ranks still skip, because the guard sums its flag across ranks; with the guard first (the
  documented order) that step never reaches the clippers on either rank. With ``action="halt"`` both
  ranks raise the same exception at the same step, and nothing hangs;
- the checkpoint written by the 2-rank run resumes in a 1-process run in this process (world size
  2 -> 1), which starts from exactly the callbacks' saved state and carries on counting from it.

Spawning two processes costs about ten seconds (importing Lightning), so all the fits run in one pair
of spawned workers: each worker runs every scenario in turn with ``DDPStrategy`` (the strategy of
``ddp_spawn``; the workers join the process group from the ``LOCAL_RANK``/``WORLD_SIZE`` environment,
the way Lightning runs under ``torchrun``), catches each scenario's exception, and saves what it saw.
The parent waits with a deadline and kills the workers if they hang, so a hang fails the test; the
process group also has a collective timeout, so a rank left waiting raises instead of blocking.
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
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from tb_events import histograms, load_events, scalars
from test_contracts import assert_same_state
from torch import Tensor, nn

from stability_callbacks import (
    AGC,
    AutoClip,
    GradientMonitor,
    HistogramLogger,
    NonFiniteGradientError,
    NonFiniteGuard,
    NormClip,
    ValueClip,
    ZClip,
)
from stability_callbacks._trainer import StabilityCallback

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.filterwarnings("ignore:NonFiniteGuard runs after ValueClip"),
    # the 2-rank run's last step is mid-epoch for one process, which sees twice the batches per epoch
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
]

STEPS = 8
SHARED_NAN_STEP = 3  # rank 1's gradient gets a NaN before the all-reduce: every rank sees it
OWN_NAN_STEP = 5  # rank 1's gradient gets a NaN after the all-reduce: only rank 1 sees it
DEADLINE_S = 480.0  # the whole pair of workers; a normal run takes well under a minute
COLLECTIVE_TIMEOUT = timedelta(seconds=90)

SCENARIOS = [
    "GradientMonitor",
    "HistogramLogger",
    "AutoClip",
    "ZClip",
    "AGC",
    "NormClip",
    "ValueClip",
    "NonFiniteGuard",
    "guard_then_clippers",
    "halt",
    "halt_one_rank",
]
ONE_CALLBACK = SCENARIOS[:8]
CLIPPERS = {"AutoClip", "ZClip", "AGC", "NormClip", "ValueClip"}


def make_callbacks(scenario: str) -> list[Callback]:
    """The callbacks of a scenario; the one under test is first, the guard (if any) after it."""
    if scenario == "halt" or scenario == "halt_one_rank":
        return [NonFiniteGuard("halt")]
    if scenario == "NonFiniteGuard":
        return [NonFiniteGuard()]
    clippers = {
        "AutoClip": lambda: AutoClip(),
        "ZClip": lambda: ZClip(warmup_steps=2, z_thresh=0.5),
        "AGC": lambda: AGC(),
        "NormClip": lambda: NormClip(max_norm=0.3),
        "ValueClip": lambda: ValueClip(max_value=0.01),
    }
    if scenario == "guard_then_clippers":  # the documented order: the guard first, then one clipper
        return [NonFiniteGuard(), clippers["AutoClip"]()]
    under_test: Callback = {
        "GradientMonitor": lambda: GradientMonitor(),
        "HistogramLogger": lambda: HistogramLogger(every_n_steps=1, figure_every_n_steps=0),
        **clippers,
    }[scenario]()
    return [under_test, NonFiniteGuard()]


def fault_steps(scenario: str) -> tuple[int | None, int | None]:
    """(step of the NaN every rank sees, step of the NaN only rank 1 sees)."""
    if scenario == "halt_one_rank":
        return None, OWN_NAN_STEP
    if scenario in ("NonFiniteGuard", "guard_then_clippers"):
        return SHARED_NAN_STEP, OWN_NAN_STEP
    return SHARED_NAN_STEP, None


def _poison(grad: Tensor) -> Tensor:
    grad = grad.clone()
    grad.view(-1)[0] = math.nan
    return grad


class FaultyMLP(MLPModule):
    """The MLP; on global rank 1 a NaN goes into the gradient of ``net.2.weight`` at the given steps.

    ``shared_step``: through a hook on the parameter, before DDP's all-reduce, which spreads it to every
    rank. ``own_step``: written into rank 1's gradient after the all-reduce, so only rank 1 has it.
    """

    def __init__(self, shared_step: int | None = None, own_step: int | None = None) -> None:
        super().__init__()
        self.shared_step = shared_step
        self.own_step = own_step
        self._handle: Any = None

    @property
    def poisoned(self) -> Tensor:
        layer: nn.Linear = self.net[2]  # type: ignore[assignment]
        return layer.weight

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.global_rank == 1 and self.global_step == self.shared_step:
            self._handle = self.poisoned.register_hook(_poison)
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.global_rank == 1 and self.global_step == self.own_step:
            grad = self.poisoned.grad
            assert grad is not None
            with torch.no_grad():
                grad.view(-1)[0] = math.nan


def flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def ours(trainer: pl.Trainer) -> dict[str, StabilityCallback]:
    return {type(cb).__name__: cb for cb in trainer.callbacks if isinstance(cb, StabilityCallback)}  # type: ignore[attr-defined]


class Recorder(Callback):
    """Per step: the state of the library's callbacks; and the weights around the shared NaN step."""

    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []
        self.weights_at: dict[int, Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.weights_at[trainer.global_step] = flat(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.states.append({name: cb.state_dict() for name, cb in ours(trainer).items()})


def _run_scenario(scenario: str, out: Path) -> dict[str, Any]:
    shared, own = fault_steps(scenario)
    callbacks = make_callbacks(scenario)
    recorder = Recorder()
    trainer = make_trainer(
        out / scenario,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=COLLECTIVE_TIMEOUT),
        devices=2,
        max_steps=STEPS,
        max_epochs=None,
        log_every_n_steps=1,
        logger=TensorBoardLogger(out / scenario, name="tb", version=0),
        callbacks=[*callbacks, recorder],
    )
    model = FaultyMLP(shared, own)
    result: dict[str, Any] = {"error": None}
    try:
        trainer.fit(model, make_loader(n=2 * 16 * STEPS))
        trainer.save_checkpoint(out / scenario / "last.ckpt")
    except NonFiniteGradientError as err:
        result["error"] = [type(err).__name__, str(err)]
    result["global_step"] = trainer.global_step
    result["weights"] = flat(model)
    result["weights_at"] = recorder.weights_at
    result["states"] = recorder.states
    result["final_state"] = {name: cb.state_dict() for name, cb in ours(trainer).items()}
    return result


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: every scenario in turn, results saved after each one."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    results: dict[str, Any] = {"pid": os.getpid()}
    for scenario in SCENARIOS:
        try:
            results[scenario] = _run_scenario(scenario, Path(out))
        except Exception:
            results[scenario] = {"error": ["unexpected", traceback.format_exc()]}
        torch.save(results, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Run every scenario on two spawned ranks; returns the output folder and each rank's results."""
    out = tmp_path_factory.mktemp("ddp")
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
        pytest.fail(f"DDP ranks {hung} still running after {DEADLINE_S:.0f} s: a hang")
    codes = [p.exitcode for p in procs]
    assert codes == [0, 0], f"worker exit codes {codes}"
    return out, [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _both(ranks: tuple[Path, list[dict[str, Any]]], scenario: str) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = (r[scenario] for r in ranks[1])
    return r0, r1


# -- one callback (and the guard) per scenario -------------------------------------------------------


@pytest.mark.parametrize("scenario", ONE_CALLBACK)
def test_ranks_agree_and_skip_the_nan_step_together(
    ranks: tuple[Path, list[dict[str, Any]]], scenario: str
) -> None:
    r0, r1 = _both(ranks, scenario)
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert r0["global_step"] == r1["global_step"] == STEPS
    assert torch.equal(r0["weights"], r1["weights"])
    assert torch.isfinite(r0["weights"]).all()
    # The same state on both ranks after every step: every decision was taken alike.
    assert len(r0["states"]) == len(r1["states"]) == STEPS
    assert_same_state(r0["states"], r1["states"])
    # The NaN step changed no weight, on either rank.
    for r in (r0, r1):
        assert torch.equal(r["weights_at"][SHARED_NAN_STEP], r["weights_at"][SHARED_NAN_STEP + 1])
        assert not torch.equal(r["weights_at"][SHARED_NAN_STEP + 1], r["weights_at"][SHARED_NAN_STEP + 2])

    skipped = [s["NonFiniteGuard"]["skipped"] for s in r0["states"]]
    if scenario == "NonFiniteGuard":  # also the NaN only rank 1 had, at step 5
        assert skipped == [0, 0, 0, 1, 1, 2, 2, 2]
        for r in (r0, r1):
            assert torch.equal(r["weights_at"][OWN_NAN_STEP], r["weights_at"][OWN_NAN_STEP + 1])
    else:
        assert skipped == [0, 0, 0, 1, 1, 1, 1, 1]
    if scenario in CLIPPERS:  # seen, left alone (not clipped, not recorded), counted on both ranks
        assert [s[scenario]["skipped"] for s in r0["states"]] == [0, 0, 0, 1, 1, 1, 1, 1]
        assert r0["final_state"][scenario]["steps"] == STEPS
    if scenario == "GradientMonitor":  # diagnosed as non-finite at step 3 only; NaN kept out of history
        assert [s["GradientMonitor"]["state"]["nonfinite"] for s in r0["states"]] == [
            i == SHARED_NAN_STEP for i in range(STEPS)
        ]
        assert len(r0["final_state"]["GradientMonitor"]["diagnostician"]["history"]) == STEPS - 1


LOGGED: dict[str, str] = {
    "GradientMonitor": "grad_norm/total",
    "AutoClip": "clip/norm_pre",
    "ZClip": "clip/norm_pre",
    "AGC": "clip/norm_pre",
    "NormClip": "clip/norm_pre",
    "ValueClip": "clip/norm_pre",
    "NonFiniteGuard": "guard/nonfinite",
}


@pytest.mark.parametrize("scenario", ONE_CALLBACK)
def test_rank_zero_alone_writes_the_logs(ranks: tuple[Path, list[dict[str, Any]]], scenario: str) -> None:
    out, results = ranks
    log_dir = out / scenario / "tb" / "version_0"
    event_files = sorted(p.name for p in (out / scenario).rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files
    assert f".{results[0]['pid']}." in event_files[0]  # written by rank zero's process
    acc = load_events(str(log_dir))
    guard = scalars(acc, "guard/nonfinite")  # the guard runs in every scenario
    expected_nan = {SHARED_NAN_STEP, OWN_NAN_STEP} if scenario == "NonFiniteGuard" else {SHARED_NAN_STEP}
    assert guard == {i: float(i in expected_nan) for i in range(STEPS)}
    if scenario == "HistogramLogger":
        assert sorted(histograms(acc, "grads/net.0.weight")) == list(range(STEPS))
        assert sorted(histograms(acc, "weights/net.4.bias")) == list(range(STEPS))
        assert scalars(acc, "nonfinite/grads/net.2.weight") == {SHARED_NAN_STEP: 1.0}
        return
    values = scalars(acc, LOGGED[scenario])
    assert sorted(values) == list(range(STEPS))  # once per step, not once per rank
    if scenario == "GradientMonitor":
        assert scalars(acc, "grad_health/nonfinite") == {i: float(i == SHARED_NAN_STEP) for i in range(STEPS)}
    if scenario in CLIPPERS:
        assert [i for i, v in values.items() if not math.isfinite(v)] == [SHARED_NAN_STEP]


def test_guard_first_keeps_a_nan_of_one_rank_away_from_every_clipper(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    """In the documented order (the guard first) a NaN that only rank 1 has, after the all-reduce, is
    dropped on both ranks before the clipper sees it: the clipper's statistics stay identical."""
    r0, r1 = _both(ranks, "guard_then_clippers")
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert torch.equal(r0["weights"], r1["weights"]) and torch.isfinite(r0["weights"]).all()
    assert_same_state(r0["states"], r1["states"])
    assert [s["NonFiniteGuard"]["skipped"] for s in r0["states"]] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert r0["final_state"]["AutoClip"]["steps"] == STEPS - 2  # the skipped steps never reached it
    assert r0["final_state"]["AutoClip"]["skipped"] == 0
    assert r0["final_state"]["AutoClip"]["clipped"] > 0  # it did act on the other steps


@pytest.mark.parametrize("scenario", ["halt", "halt_one_rank"])
def test_halt_stops_every_rank_with_the_same_exception(
    ranks: tuple[Path, list[dict[str, Any]]], scenario: str
) -> None:
    r0, r1 = _both(ranks, scenario)
    step = SHARED_NAN_STEP if scenario == "halt" else OWN_NAN_STEP
    assert r0["error"] is not None and r1["error"] is not None, (r0["error"], r1["error"])
    assert r0["error"][0] == r1["error"][0] == "NonFiniteGradientError", (r0["error"], r1["error"])
    assert f"at step {step}" in r0["error"][1] and f"at step {step}" in r1["error"][1]
    if scenario == "halt":  # the same gradients on both ranks: the same message
        assert r0["error"][1] == r1["error"][1]
        assert "net.2.weight: 1" in r0["error"][1]
    else:  # each rank says what it saw
        assert "net.2.weight: 1" in r1["error"][1]
        assert "another rank's gradients were not finite" in r0["error"][1]
    assert r0["global_step"] == r1["global_step"] == step
    assert torch.equal(r0["weights"], r1["weights"]) and torch.isfinite(r0["weights"]).all()
    assert torch.equal(r0["weights"], r0["weights_at"][step])  # halted before the step


# -- resume with another world size ---------------------------------------------------------------------


class StateAtStart(Callback):
    def __init__(self) -> None:
        self.states: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states = {name: cb.state_dict() for name, cb in ours(trainer).items()}


@pytest.mark.parametrize("scenario", ONE_CALLBACK)
def test_two_rank_checkpoint_resumes_on_one_process(
    ranks: tuple[Path, list[dict[str, Any]]], scenario: str, tmp_path: Path
) -> None:
    out, results = ranks
    ckpt = out / scenario / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    callbacks = make_callbacks(scenario)
    spy = StateAtStart()
    trainer = make_trainer(
        tmp_path,
        max_steps=STEPS + 2,
        max_epochs=None,
        log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="resumed", version=0),
        callbacks=[*callbacks, spy],
    )
    model = FaultyMLP()
    trainer.fit(model, make_loader(n=2 * 16 * STEPS), ckpt_path=ckpt)
    assert trainer.global_step == STEPS + 2 and trainer.world_size == 1
    assert torch.isfinite(flat(model)).all()
    # Started from the state rank zero saved (equal to rank one's), not afresh.
    assert spy.states is not None
    for cb in callbacks:
        name = type(cb).__name__
        assert_same_state(spy.states[name], saved["callbacks"].get(cb.state_key, {}))
        assert_same_state(spy.states[name], results[0][scenario]["final_state"][name])
        assert_same_state(spy.states[name], results[1][scenario]["final_state"][name])
    # ... and carried on counting from it.
    states = {type(cb).__name__: cb.state_dict() for cb in callbacks}
    assert states["NonFiniteGuard"]["skipped"] == (2 if scenario == "NonFiniteGuard" else 1)
    if scenario in CLIPPERS:
        assert states[scenario]["steps"] == STEPS + 2 and states[scenario]["skipped"] == 1
    if scenario == "GradientMonitor":
        assert len(states["GradientMonitor"]["diagnostician"]["history"]) == STEPS - 1 + 2
