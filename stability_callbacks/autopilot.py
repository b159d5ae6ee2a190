"""StabilityAutopilot: detect, remedy and recover from unstable training in one callback.

The autopilot composes the library's own remedies and adds the one thing none of them does: recovery.

- at the start, re-initialise once if gradients vanish (:class:`~stability_callbacks.init.InitSwap`,
  ``when="on_vanishing"``);
- always clip exploding gradients adaptively (:class:`~stability_callbacks.clipping.ZClip` by default,
  :class:`~stability_callbacks.clipping.AutoClip` or :class:`~stability_callbacks.clipping.AGC`);
- skip optimizer steps with non-finite gradients (:class:`~stability_callbacks.guard.NonFiniteGuard`);
- and, when a loss spike or a burst of skipped steps gets through, roll back to an in-memory snapshot of
  the model and optimizer, lower the learning rate for a while, skip the batches that caused it, and
  carry on; after ``max_rollbacks`` rollbacks it stops with :class:`RollbackLimitError`.

Layer 1 (no Lightning, usable from a plain PyTorch loop):

- :class:`LossSpikeDetector`: running loss statistics on the device (EMA mean/variance z-score, or the
  ratio to a running median), ``observe(loss)`` returns a device bool; a spike (or a non-finite loss)
  never enters the statistics. The same rule as Lightning's ``SpikeDetection`` and the loss-spike
  checks of OLMo and Megatron-DeepSpeed, kept on the device.
- :class:`SnapshotRing`: every ``every_n_steps`` steps a copy of the model and optimizer state (on the
  device, or in pinned host memory), at most ``max_snapshots``; ``restore`` puts one back in place.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks._trainer import (
    StabilityCallback,
    is_logging_step,
    log_scalars,
    optimizer_grads,
    tensorboard_writer,
)
from stability_callbacks.clipping import AGC, AutoClip, ZClip, _ClipCallback, total_grad_norm
from stability_callbacks.guard import NonFiniteGuard
from stability_callbacks.init import InitSwap
from stability_callbacks.stats import host_reads_are_free

__all__ = ["LossSpikeDetector", "RollbackLimitError", "Snapshot", "SnapshotRing", "StabilityAutopilot"]

_MODES = ("zscore", "ratio")
_DEFAULT_THRESHOLD = {"zscore": 6.0, "ratio": 3.0}
_CLIPPERS = ("zclip", "autoclip", "agc")


class RollbackLimitError(RuntimeError):
    """Raised by :class:`StabilityAutopilot` when training needs more than ``max_rollbacks`` rollbacks."""


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------
# Layer 1: loss spike detection
# ----------------------------------------------------------------------------------------------------


class LossSpikeDetector:
    """Running statistics of the training loss on the device, and a spike test against them.

    ``mode="zscore"``: the mean and variance are exact (Welford) over the first ``warmup`` losses, then
    exponential moving averages with weight ``alpha`` on the past; a loss is a spike when
    ``(loss - mean) / max(std, rel_std_floor * |mean|) > threshold`` (only rises count).
    ``mode="ratio"``: the median of the last ``window`` accepted losses; a spike is
    ``loss > threshold * median``. In both modes a spike must also rise more than ``atol`` above the
    mean (the median), so that a loss near zero does not turn harmless absolute wiggles into spikes.

    A non-finite loss is always a spike, also during warm-up; no spike is judged before ``warmup``
    losses were accepted; a spike never enters the statistics. On accelerators nothing here reads a
    value to the host.

    Args:
        mode: ``"zscore"`` or ``"ratio"``.
        threshold: z-score (default 6) or ratio to the median (default 3), > 0 (ratio: > 1).
        warmup: accepted losses before the first judgement (>= 2).
        alpha: EMA weight of the past in (0, 1) (``"zscore"``).
        window: losses in the running median (``"ratio"``, >= 1).
        rel_std_floor: floor of the standard deviation relative to ``|mean|`` (>= 0), so a very smooth
            loss curve does not turn small wiggles into spikes (``"zscore"``).
        atol: smallest rise above the mean (the median) that can be a spike (>= 0), in loss units.
    """

    def __init__(
        self,
        mode: str = "zscore",
        threshold: float | None = None,
        warmup: int = 20,
        alpha: float = 0.98,
        window: int = 50,
        rel_std_floor: float = 0.05,
        atol: float = 0.0,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}")
        if threshold is None:
            threshold = _DEFAULT_THRESHOLD[mode]
        if not _number(threshold) or threshold <= (1.0 if mode == "ratio" else 0.0):
            raise ValueError(
                f"`threshold` must be a number > {1 if mode == 'ratio' else 0}, got {threshold!r}"
            )
        _positive_int("warmup", warmup, 2)
        if not (_number(alpha) and 0.0 < alpha < 1.0):
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}")
        _positive_int("window", window)
        if not (_number(rel_std_floor) and rel_std_floor >= 0):
            raise ValueError(f"`rel_std_floor` must be a number >= 0, got {rel_std_floor!r}")
        if not (_number(atol) and atol >= 0):
            raise ValueError(f"`atol` must be a number >= 0, got {atol!r}")
        self.mode = mode
        self.threshold = float(threshold)
        self.warmup = warmup
        self.alpha = float(alpha)
        self.window = window
        self.rel_std_floor = float(rel_std_floor)
        self.atol = float(atol)
        self.count: Tensor | None = None  # accepted losses (float64, device)
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.history: Tensor | None = None  # ratio mode: ring of accepted losses, NaN = empty

    def _ensure(self, device: torch.device) -> None:
        if self.count is None or self.mean is None or self.var is None or self.history is None:
            self.count = torch.zeros((), dtype=torch.float64, device=device)
            self.mean = torch.zeros((), dtype=torch.float64, device=device)
            self.var = torch.zeros((), dtype=torch.float64, device=device)
            self.history = torch.full((self.window,), float("nan"), dtype=torch.float64, device=device)
        elif self.count.device != device:
            self.count, self.mean = self.count.to(device), self.mean.to(device)
            self.var, self.history = self.var.to(device), self.history.to(device)

    def observe(self, loss: Tensor) -> Tensor:
        """Judge ``loss`` (a scalar tensor) against the statistics, then add it unless it is a spike.

        Returns a 0-d bool tensor on the loss's device: ``True`` for a spike or a non-finite loss.
        """
        x = loss.detach().reshape(()).to(torch.float64)
        self._ensure(x.device)
        assert self.count is not None and self.mean is not None and self.var is not None
        assert self.history is not None
        if host_reads_are_free(x.device):
            return torch.tensor(
                self._observe_on_host(x.item(), self.count, self.mean, self.var, self.history)
            )
        finite = torch.isfinite(x)
        ready = self.count >= self.warmup
        xs = torch.where(finite, x, self.mean)  # a finite stand-in keeps NaN out of the arithmetic
        if self.mode == "zscore":
            std = torch.maximum(self.var.clamp_min(0).sqrt(), self.rel_std_floor * self.mean.abs())
            high = (xs - self.mean) > torch.clamp_min(self.threshold * std, self.atol)
        else:
            median = torch.nanmedian(self.history)
            high = (xs > self.threshold * median) & (xs - median > self.atol)
        spike = ~finite | (ready & high)
        accept = ~spike
        # statistics update, masked by `accept`
        n1 = self.count + 1
        delta = xs - self.mean
        if self.mode == "zscore":
            warm = self.count < self.warmup
            mean_w = self.mean + delta / n1
            var_w = (self.count * self.var + delta * (xs - mean_w)) / n1
            mean_e = self.mean + (1 - self.alpha) * delta
            var_e = self.alpha * (self.var + (1 - self.alpha) * delta * delta)
            new_mean = torch.where(warm, mean_w, mean_e)
            new_var = torch.where(warm, var_w, var_e)
            self.mean.copy_(torch.where(accept, new_mean, self.mean))
            self.var.copy_(torch.where(accept, new_var, self.var))
        else:
            slot = torch.remainder(self.count, self.window).long()
            onehot = torch.arange(self.window, device=x.device) == slot
            updated = torch.where(onehot, xs, self.history)
            self.history.copy_(torch.where(accept, updated, self.history))
            self.mean.copy_(torch.where(accept, self.mean + delta / n1, self.mean))
        self.count.add_(accept.to(torch.float64))
        return spike

    def observe_value(self, loss: float) -> bool:
        """:meth:`observe` for a loss already read on the host, with the statistics on the CPU: the same
        decision, returned as a ``bool``."""
        self._ensure(torch.device("cpu"))
        assert self.count is not None and self.mean is not None and self.var is not None
        assert self.history is not None
        return self._observe_on_host(float(loss), self.count, self.mean, self.var, self.history)

    def _observe_on_host(
        self, x: float, count_t: Tensor, mean_t: Tensor, var_t: Tensor, history: Tensor
    ) -> bool:
        """:meth:`observe` on the CPU, where reading the statistics is free: the same float64 arithmetic,
        branched in Python instead of masked tensor operations (the decisions are identical)."""
        count, mean, var = count_t.item(), mean_t.item(), var_t.item()
        finite = math.isfinite(x)
        xs = x if finite else mean
        if self.mode == "zscore":
            std = max(math.sqrt(max(var, 0.0)), self.rel_std_floor * abs(mean))
            high = (xs - mean) > max(self.threshold * std, self.atol)
        else:
            median = torch.nanmedian(history).item()
            high = xs > self.threshold * median and xs - median > self.atol
        spike = not finite or (count >= self.warmup and high)
        if not spike:
            n1 = count + 1
            delta = xs - mean
            if self.mode == "zscore":
                if count < self.warmup:
                    new_mean = mean + delta / n1
                    new_var = (count * var + delta * (xs - new_mean)) / n1
                else:
                    new_mean = mean + (1 - self.alpha) * delta
                    new_var = self.alpha * (var + (1 - self.alpha) * delta * delta)
                mean_t.fill_(new_mean)
                var_t.fill_(new_var)
            else:
                history[int(count % self.window)] = xs
                mean_t.fill_(mean + delta / n1)
            count_t.fill_(n1)
        return spike

    def reset(self) -> None:
        """Forget the statistics (warm-up starts again)."""
        self.count = self.mean = self.var = self.history = None

    def state_dict(self) -> dict[str, Any]:
        """Statistics as CPU tensors (empty before the first loss)."""
        if self.count is None:
            return {}
        return {
            "count": self.count.detach().cpu().clone(),
            "mean": self.mean.detach().cpu().clone(),  # type: ignore[union-attr]
            "var": self.var.detach().cpu().clone(),  # type: ignore[union-attr]
            "history": self.history.detach().cpu().clone(),  # type: ignore[union-attr]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; an empty or mismatched state is a fresh start."""
        history = state.get("history")
        if not state or not isinstance(history, Tensor) or history.numel() != self.window:
            self.reset()
            return
        device = self.count.device if self.count is not None else torch.device("cpu")
        self.count = torch.as_tensor(state["count"], dtype=torch.float64).to(device).clone()
        self.mean = torch.as_tensor(state["mean"], dtype=torch.float64).to(device).clone()
        self.var = torch.as_tensor(state["var"], dtype=torch.float64).to(device).clone()
        self.history = history.to(device, torch.float64).clone()


# ----------------------------------------------------------------------------------------------------
# Layer 1: snapshots
# ----------------------------------------------------------------------------------------------------


def _copy_tree(obj: Any, device: str) -> Any:
    """Deep copy of a nest of dicts/lists/tuples whose tensors are copied to the host or cloned."""
    if isinstance(obj, Tensor):
        t = obj.detach()
        if device == "device":
            return t.clone()
        if t.device.type == "cpu":
            return t.clone()
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
        return host.copy_(t, non_blocking=True)  # stream-ordered: the restore copy runs after it
    if isinstance(obj, dict):
        return {k: _copy_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy_tree(v, device) for v in obj)
    return copy.deepcopy(obj)


def _clone_tree(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v) for v in obj)
    return copy.deepcopy(obj)


def _tree_nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tree_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tree_nbytes(v) for v in obj)
    return 0


@dataclass
class Snapshot:
    """One saved training state: the step it was taken at (before that step's update), the model's
    ``state_dict``, each optimizer's ``state_dict`` and any extra state (e.g. loss statistics)."""

    step: int
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot's tensors."""
        return _tree_nbytes(self.model) + _tree_nbytes(self.optimizers) + _tree_nbytes(self.extra)


class SnapshotRing:
    """At most ``max_snapshots`` copies of model and optimizer state, one every ``every_n_steps`` steps.

    Args:
        every_n_steps: steps between snapshots (>= 1); :meth:`due` says when one is due.
        max_snapshots: how many are kept (>= 1); the oldest goes first.
        device: ``"host"`` (CPU memory, pinned when CUDA is available; copied without a host sync)
            or ``"device"`` (clones next to the parameters: fastest restore, costs accelerator memory).
    """

    def __init__(self, every_n_steps: int = 100, max_snapshots: int = 2, device: str = "host") -> None:
        _positive_int("every_n_steps", every_n_steps)
        _positive_int("max_snapshots", max_snapshots)
        if device not in ("host", "device"):
            raise ValueError(f"`device` must be 'host' or 'device', got {device!r}")
        self.every_n_steps = every_n_steps
        self.max_snapshots = max_snapshots
        self.device = device
        self.snapshots: list[Snapshot] = []

    def __len__(self) -> int:
        return len(self.snapshots)

    @property
    def nbytes(self) -> int:
        """Bytes held by all snapshots."""
        return sum(s.nbytes for s in self.snapshots)

    @property
    def steps(self) -> list[int]:
        """Steps of the snapshots held, oldest first."""
        return [s.step for s in self.snapshots]

    def due(self, step: int) -> bool:
        """Whether a snapshot is due before ``step`` (a multiple of ``every_n_steps`` not yet held)."""
        return step % self.every_n_steps == 0 and (not self.snapshots or self.snapshots[-1].step != step)

    def take(
        self,
        step: int,
        model: nn.Module,
        optimizers: Sequence[Optimizer],
        extra: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Copy the state of ``model`` and ``optimizers`` as the state before ``step``; evict the oldest."""
        snap = Snapshot(
            step,
            _copy_tree(model.state_dict(), self.device),
            [_copy_tree(opt.state_dict(), self.device) for opt in optimizers],
            _copy_tree(dict(extra or {}), self.device),
        )
        self.snapshots = [s for s in self.snapshots if s.step != step] + [snap]
        del self.snapshots[: max(0, len(self.snapshots) - self.max_snapshots)]
        return snap

    def newest_before(self, step: int | None = None) -> Snapshot | None:
        """The newest snapshot taken strictly before ``step`` (any step when ``None``), or ``None``."""
        for snap in reversed(self.snapshots):
            if step is None or snap.step < step:
                return snap
        return None

    def drop_after(self, step: int) -> None:
        """Forget the snapshots taken after ``step``."""
        self.snapshots = [s for s in self.snapshots if s.step <= step]

    def clear(self) -> None:
        self.snapshots = []

    def restore(
        self,
        model: nn.Module,
        optimizers: Sequence[Optimizer],
        before_step: int | None = None,
        snapshot: Snapshot | None = None,
    ) -> Snapshot:
        """Copy a snapshot back into ``model`` and ``optimizers`` in place (same parameter objects).

        The newest snapshot taken before ``before_step`` is used unless ``snapshot`` is given. The
        optimizers get back their per-parameter state (moments, step counts); their param-group
        settings (learning rate, ...) stay as they are now, so learning-rate schedules are not undone.
        Returns the snapshot used; raises ``LookupError`` if there is none.
        """
        snap = snapshot if snapshot is not None else self.newest_before(before_step)
        if snap is None:
            raise LookupError(f"no snapshot before step {before_step}")
        if len(snap.optimizers) != len(optimizers):
            raise ValueError(f"snapshot holds {len(snap.optimizers)} optimizers, got {len(optimizers)}")
        with torch.no_grad():
            model.load_state_dict(snap.model)
        for opt, saved in zip(optimizers, snap.optimizers, strict=True):
            groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(_clone_tree(saved))  # clones: the optimizer must not alias the snapshot
            for g, settings in zip(opt.param_groups, groups, strict=True):
                g.update(settings)
        return snap

    def state_dict(self) -> dict[str, Any]:
        """The snapshots as CPU tensors (large: written into checkpoints only when asked)."""
        return {
            "snapshots": [
                {
                    "step": s.step,
                    "model": _copy_tree(s.model, "host"),
                    "optimizers": _copy_tree(s.optimizers, "host"),
                    "extra": _copy_tree(s.extra, "host"),
                }
                for s in self.snapshots
            ]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.snapshots = [
            Snapshot(int(s["step"]), s["model"], list(s["optimizers"]), dict(s.get("extra", {})))
            for s in state.get("snapshots", [])
        ][-self.max_snapshots :]


# ----------------------------------------------------------------------------------------------------
# Layer 2: the callback
# ----------------------------------------------------------------------------------------------------


class StabilityAutopilot(StabilityCallback):
    """Detects, remedies and recovers from unstable training; explains every action it takes.

    It owns and drives these callbacks (do not add them to the trainer as well):

    - ``reinit``: :class:`~stability_callbacks.init.InitSwap` with ``when="on_vanishing"`` (watches the
      first ``reinit_watch_steps`` steps, one host read a step while watching);
    - ``guard``: :class:`~stability_callbacks.guard.NonFiniteGuard` with ``action="skip"`` (one host read a
      step);
    - ``clipper``: ``"zclip"`` (:class:`~stability_callbacks.clipping.ZClip`), ``"autoclip"``, ``"agc"``, a
      clipping callback instance, or ``None``.

    With ``rollback=True`` the training loss of every optimizer step (``outputs["loss"]`` of
    ``training_step``; the mean over micro-batches under gradient accumulation) goes to a
    :class:`LossSpikeDetector` (one host read a step, the flag agreed across ranks), and a
    :class:`SnapshotRing` keeps model and optimizer state every ``snapshot_every_n_steps`` steps. On a
    loss spike, or after ``max_consecutive_skips`` skipped steps in a row, the autopilot

    1. restores the newest snapshot taken before the trouble (weights, optimizer state, loss statistics;
       the trainer's step counter and the data stream go on),
    2. multiplies every optimizer's learning rate by ``lr_factor`` for ``cooldown_steps`` optimizer
       steps (compounded if trouble comes again during a cooldown). The factor is applied around each
       ``optimizer.step()`` only, so learning-rate schedulers (and ``LearningRateMonitor``) see the
       unscaled rates and schedules go on unchanged; ``autopilot/lr_scale`` shows the factor,
    3. remembers the ``(epoch, batch_idx)`` of the batches that triggered it: if one comes again (a
       resumed run replaying them), its optimizer step is skipped,
    4. raises :class:`RollbackLimitError` instead of rolling back more than ``max_rollbacks`` times.

    Every action is explained once on rank zero (a warning) and added to the TensorBoard text
    ``autopilot/timeline``. Counters, the cooldown, the learning-rate factor, the remembered batches and
    the loss statistics are in the callback state; snapshots only with ``checkpoint_snapshots=True``.
    Automatic optimization only.

    Args:
        clipper: ``"zclip"``, ``"autoclip"``, ``"agc"``, a clipping callback, or ``None``.
        reinit: re-initialise once if gradients vanish in the first steps.
        reinit_scheme: the :class:`~stability_callbacks.init.InitSwap` scheme.
        reinit_watch_steps: optimizer steps watched for vanishing gradients.
        guard: skip optimizer steps with non-finite gradients.
        rollback: watch the loss and roll back on trouble.
        snapshot_every_n_steps, max_snapshots, snapshot_device: see :class:`SnapshotRing`.
        spike_mode, spike_threshold, spike_warmup, spike_atol: see :class:`LossSpikeDetector`
            (``mode``, ``threshold``, ``warmup``, ``atol``); set ``spike_atol`` when the loss can come
            close to zero.
        max_consecutive_skips: skipped steps in a row that trigger a rollback.
        lr_factor: learning-rate factor after a rollback, in (0, 1].
        cooldown_steps: optimizer steps the factor holds (>= 0).
        max_rollbacks: rollbacks allowed before :class:`RollbackLimitError` (>= 0).
        checkpoint_snapshots: write the snapshots into checkpoints too.
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
        verbose: warn on rank zero for each action.

    Logged every ``log_every_n_steps`` optimizer steps and at every action (no extra host read):

    =======================  ==============================================================
    key                      value
    =======================  ==============================================================
    ``autopilot/rollback``   rollbacks so far
    ``autopilot/skipped``    optimizer steps skipped so far (non-finite, or a known-bad batch)
    ``autopilot/lr_scale``   learning-rate factor now in force (1.0 outside a cooldown)
    ``autopilot/reinit``     1.0 once the model was re-initialised
    ``autopilot/timeline``   TensorBoard text: every action, its step and why
    =======================  ==============================================================

    The children log their own keys too (``clip/*``, ``guard/*``, ``init/*``).
    """

    def __init__(
        self,
        clipper: str | StabilityCallback | None = "zclip",
        reinit: bool = True,
        reinit_scheme: str = "auto",
        reinit_watch_steps: int = 50,
        guard: bool = True,
        rollback: bool = True,
        snapshot_every_n_steps: int = 100,
        max_snapshots: int = 2,
        snapshot_device: str = "host",
        spike_mode: str = "zscore",
        spike_threshold: float | None = None,
        spike_warmup: int = 20,
        spike_atol: float = 0.0,
        max_consecutive_skips: int = 3,
        lr_factor: float = 0.5,
        cooldown_steps: int = 100,
        max_rollbacks: int = 3,
        checkpoint_snapshots: bool = False,
        log_every_n_steps: int | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(clipper, str):
            if clipper not in _CLIPPERS:
                raise ValueError(f"`clipper` must be one of {_CLIPPERS}, a callback or None, got {clipper!r}")
        elif clipper is not None and not (
            isinstance(clipper, StabilityCallback) and clipper.modifies_gradients
        ):
            raise ValueError(
                f"`clipper` must be one of {_CLIPPERS}, a clipping callback or None, got {clipper!r}"
            )
        for name, flag in (("reinit", reinit), ("guard", guard), ("rollback", rollback)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be a bool, got {flag!r}")
        _positive_int("max_consecutive_skips", max_consecutive_skips)
        _positive_int("cooldown_steps", cooldown_steps, 0)
        _positive_int("max_rollbacks", max_rollbacks, 0)
        if not (_number(lr_factor) and 0.0 < lr_factor <= 1.0):
            raise ValueError(f"`lr_factor` must be in (0, 1], got {lr_factor!r}")
        if log_every_n_steps is not None:
            _positive_int("log_every_n_steps", log_every_n_steps)
        self.ring = SnapshotRing(snapshot_every_n_steps, max_snapshots, snapshot_device)
        self.detector = LossSpikeDetector(spike_mode, spike_threshold, warmup=spike_warmup, atol=spike_atol)
        self.clipper_name = clipper if isinstance(clipper, str) or clipper is None else type(clipper).__name__
        self.children: dict[str, StabilityCallback] = {}
        if reinit:
            self.children["reinit"] = InitSwap(
                scheme=reinit_scheme, when="on_vanishing", watch_steps=reinit_watch_steps, verbose=verbose
            )
        if guard:
            self.children["guard"] = NonFiniteGuard(
                action="skip", max_consecutive=None, log_every_n_steps=None
            )
        if clipper is not None:
            self.children["clipper"] = (
                {"zclip": ZClip, "autoclip": AutoClip, "agc": AGC}[clipper]()
                if isinstance(clipper, str)
                else clipper
            )
        self.rollback = rollback
        self.max_consecutive_skips = max_consecutive_skips
        self.lr_factor = float(lr_factor)
        self.cooldown_steps = cooldown_steps
        self.max_rollbacks = max_rollbacks
        self.checkpoint_snapshots = checkpoint_snapshots
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
        # state
        self.rollbacks = 0
        self.bad_batch_skips = 0  # steps skipped because a known-bad batch came again
        self.lr_scale = 1.0
        self.cooldown_until = -1  # the factor holds while global_step < cooldown_until
        self.bad_batches: set[tuple[int, int]] = set()
        self.events: list[str] = []
        self.reinit_done = False
        self.last_rollback_step = -1
        # per-run
        self._trainer: pl.Trainer | None = None
        self._hooks: list[Any] = []
        self._saved_lrs: dict[int, list[float]] = {}
        self._step_depth: dict[int, int] = {}
        self._window_open = False
        self._window_batches: list[int] = []
        self._window_loss: Tensor | float | None = None  # summed over the micro-batches of a step
        self._stepped = False
        self._skip_window = False
        self._trouble_batches: list[tuple[int, int]] = []
        self._trouble_start = -1
        self._force_snapshot = True
        self._warned_no_loss = False
        self._global_step = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            clipper=self.clipper_name,
            reinit="reinit" in self.children,
            guard="guard" in self.children,
            rollback=self.rollback,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer"] = None
        state["_hooks"] = []
        return state

    # -- properties users read ------------------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """Optimizer steps skipped so far (non-finite gradients or a known-bad batch)."""
        guard = self.children.get("guard")
        return self.bad_batch_skips + (
            guard.skipped + guard.scaler_skipped if isinstance(guard, NonFiniteGuard) else 0
        )

    @property
    def cooldown_remaining(self) -> int:
        """Optimizer steps the learning-rate factor still holds."""
        return max(0, self.cooldown_until - self._global_step) if self.lr_scale != 1.0 else 0

    # -- forwarding -----------------------------------------------------------------------------------

    def _forward(self, hook: str, *args: Any) -> None:
        for child in self.children.values():
            getattr(child, hook)(*args)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forward("setup", trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_fit_start", trainer, pl_module)
        if self.rollback and not pl_module.automatic_optimization:
            raise ValueError("StabilityAutopilot(rollback=True) needs automatic optimization")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_start", trainer, pl_module)
        self._trainer = trainer
        self._remove_hooks()
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._pre_step))
            self._hooks.append(opt.register_step_post_hook(self._post_step))
        self._window_open = False
        self._force_snapshot = self._force_snapshot or not len(self.ring)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_end", trainer, pl_module)
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._forward("on_exception", trainer, pl_module, exception)
        self._remove_hooks()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forward("teardown", trainer, pl_module, stage)
        self._remove_hooks()
        self._trainer = None
        super().teardown(trainer, pl_module, stage)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._forward("on_save_checkpoint", trainer, pl_module, checkpoint)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._step_depth.clear()
        self._saved_lrs.clear()

    # -- learning-rate factor around optimizer.step() -------------------------------------------------

    def _scale_now(self) -> float:
        if self.lr_scale == 1.0 or self._trainer is None:
            return 1.0
        if self._trainer.global_step >= self.cooldown_until:
            return 1.0
        return self.lr_scale

    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # an optimizer subclass whose step() calls super().step() runs the hooks once per level: only the
        # outermost call scales and restores
        depth = self._step_depth.get(id(optimizer), 0)
        self._step_depth[id(optimizer)] = depth + 1
        scale = self._scale_now()
        if depth == 0 and scale != 1.0:
            self._saved_lrs[id(optimizer)] = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * scale

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        depth = self._step_depth.get(id(optimizer), 1) - 1
        self._step_depth[id(optimizer)] = depth
        if depth > 0:
            return
        saved = self._saved_lrs.pop(id(optimizer), None)
        if saved is not None:
            for g, lr in zip(optimizer.param_groups, saved, strict=True):
                g["lr"] = lr

    # -- the step -------------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._global_step = trainer.global_step
        if self.lr_scale != 1.0 and trainer.global_step >= self.cooldown_until:
            self.lr_scale = 1.0
            self._explain(
                trainer, f"step {trainer.global_step}: cooldown over, learning rates back to their schedule."
            )
        if not self._window_open:  # first micro-batch of an optimizer step
            self._window_open = True
            self._window_batches = []
            self._window_loss = None
            self._skip_window = False
            if self.rollback and (self._force_snapshot or self.ring.due(trainer.global_step)):
                self.ring.take(
                    trainer.global_step,
                    pl_module,
                    trainer.optimizers,
                    {"detector": self.detector.state_dict()},
                )
                self._force_snapshot = False
        self._window_batches.append(batch_idx)
        if (trainer.current_epoch, batch_idx) in self.bad_batches:
            self._skip_window = True
        self._forward("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._stepped = True
        if self._skip_window:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            if optimizer is trainer.optimizers[-1]:
                self.bad_batch_skips += 1
                self._explain(
                    trainer,
                    f"step {trainer.global_step}: skipped the optimizer step of batch(es) "
                    f"{self._window_batches} of epoch {trainer.current_epoch}, which caused an earlier "
                    "rollback.",
                )
        self._step_children(trainer, pl_module, optimizer)
        reinit = self.children.get("reinit")
        if isinstance(reinit, InitSwap) and reinit.applied and not self.reinit_done:
            self.reinit_done = True
            self.ring.clear()  # the old weights are no place to return to
            self._force_snapshot = True
            self._explain(
                trainer,
                f"step {trainer.global_step}: gradients vanished in the first steps, so the model was "
                f"re-initialised (scheme {reinit.scheme!r}); older snapshots were dropped.",
            )
        every: int = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 0
        if (
            trainer.loggers
            and every
            and is_logging_step(trainer, every)
            and optimizer is trainer.optimizers[-1]
        ):
            self._log(trainer)

    def _step_children(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """The children's step: the guard and a library clipper share one gathering of the gradients and
        one total norm; any other child gets the hook as it is."""
        guard, clipper = self.children.get("guard"), self.children.get("clipper")
        shared = [c for c in (guard, clipper) if isinstance(c, (NonFiniteGuard, _ClipCallback))]
        for child in self.children.values():  # in order: re-initialisation, guard, clipper
            if child is (shared[0] if shared else None):
                self._shared_step(trainer, pl_module, optimizer, guard, clipper)
            elif child not in shared:
                child.on_before_optimizer_step(trainer, pl_module, optimizer)

    @staticmethod
    def _shared_step(
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
        guard: StabilityCallback | None,
        clipper: StabilityCallback | None,
    ) -> None:
        params, grads = optimizer_grads(optimizer)
        if not grads:
            return
        norm = None
        if isinstance(guard, NonFiniteGuard):
            norm = total_grad_norm(grads, params=params)
            if guard._guard_step(trainer, pl_module, params, norm):
                return  # the gradients were dropped: nothing to clip
        if isinstance(clipper, _ClipCallback):
            clipper._clip_step(trainer, pl_module, params, grads, norm)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._forward("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)
        self._global_step = trainer.global_step
        if self.rollback:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, Tensor):
                # on one CPU process, where reads are free, the loss is read as it comes and judged in Python
                value = (
                    loss.item() if self._judge_on_host(trainer, loss) else loss.detach().reshape(()).float()
                )
                self._window_loss = value if self._window_loss is None else self._window_loss + value
            elif not self._warned_no_loss:
                self._warned_no_loss = True
                rank_zero_warn(
                    "StabilityAutopilot: training_step returned no loss; the loss-spike check is off."
                )
        if not self._stepped:
            return
        # an optimizer step has just ended (trainer.global_step counts it already)
        self._stepped = False
        self._window_open = False
        step = trainer.global_step - 1
        window = [(trainer.current_epoch, b) for b in self._window_batches]
        if not self.rollback:
            return
        spike = False
        if self._window_loss is not None and not self._skip_window:  # a skipped known-bad batch is not judged
            loss = self._window_loss / len(self._window_batches)
            if isinstance(loss, Tensor):
                flag = self.detector.observe(loss).float()
                spike = bool(trainer.strategy.reduce(flag, reduce_op="sum").item() > 0)  # every rank's
            else:
                spike = self.detector.observe_value(loss)
        guard = self.children.get("guard")
        consecutive = guard.consecutive if isinstance(guard, NonFiniteGuard) else 0
        if consecutive:
            if consecutive == 1:
                self._trouble_batches = []
                self._trouble_start = step
            self._trouble_batches += window
        if spike:
            why = f"the training loss spiked at step {step} (batches {self._window_batches})"
            self._roll_back(trainer, pl_module, step, window, why)
        elif consecutive >= self.max_consecutive_skips:
            why = (
                f"{consecutive} optimizer steps in a row had non-finite gradients (steps "
                f"{self._trouble_start}-{step})"
            )
            self._roll_back(trainer, pl_module, self._trouble_start, self._trouble_batches, why)

    @staticmethod
    def _judge_on_host(trainer: pl.Trainer, loss: Tensor) -> bool:
        return trainer.world_size == 1 and host_reads_are_free(loss.device)

    def _roll_back(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        trouble_step: int,
        batches: list[tuple[int, int]],
        why: str,
    ) -> None:
        if self.rollbacks >= self.max_rollbacks:
            raise RollbackLimitError(
                f"StabilityAutopilot: {why}, and the run has already been rolled back {self.rollbacks} "
                f"times (max_rollbacks={self.max_rollbacks}); stopping instead of looping. Lower the "
                "learning rate or inspect the data around these steps."
            )
        snap = self.ring.newest_before(trouble_step)
        if snap is None:
            snap = self.ring.newest_before(None)
        if snap is None:
            raise RollbackLimitError(f"StabilityAutopilot: {why}, and there is no snapshot to roll back to.")
        self.ring.restore(pl_module, trainer.optimizers, snapshot=snap)
        self.detector.load_state_dict(snap.extra.get("detector", {}))
        self.ring.drop_after(snap.step)
        for p in pl_module.parameters():
            p.grad = None
        self.rollbacks += 1
        self.last_rollback_step = trainer.global_step
        in_cooldown = self.lr_scale != 1.0 and trainer.global_step < self.cooldown_until
        self.lr_scale = (self.lr_scale if in_cooldown else 1.0) * self.lr_factor
        self.cooldown_until = trainer.global_step + self.cooldown_steps
        if self.cooldown_steps == 0:
            self.lr_scale = 1.0
        self.bad_batches.update(batches)
        guard = self.children.get("guard")
        if isinstance(guard, NonFiniteGuard):
            guard.consecutive = 0
        self._trouble_batches = []
        epochs = sorted({e for e, _ in batches})
        self._explain(
            trainer,
            f"step {trainer.global_step}: {why}; rolled back to the snapshot taken before step {snap.step}, "
            f"learning rate x{self.lr_scale:g} for the next {self.cooldown_steps} steps, and these batches "
            f"(epoch {epochs}: {[b for _, b in batches]}) will be skipped if they come again "
            f"(rollback {self.rollbacks} of at most {self.max_rollbacks}).",
        )
        self._log(trainer)

    # -- logging --------------------------------------------------------------------------------------

    def _explain(self, trainer: pl.Trainer, message: str) -> None:
        self.events.append(message)
        if self.verbose:
            rank_zero_warn(f"StabilityAutopilot: {message}", category=UserWarning)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            timeline = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(self.events))
            writer.add_text("autopilot/timeline", timeline, global_step=trainer.global_step)

    def _log(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:
            return
        log_scalars(
            trainer,
            {
                "autopilot/rollback": float(self.rollbacks),
                "autopilot/skipped": float(self.skipped),
                "autopilot/lr_scale": self._scale_now(),
                "autopilot/reinit": float(self.reinit_done),
            },
        )

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "rollbacks": self.rollbacks,
            "bad_batch_skips": self.bad_batch_skips,
            "lr_scale": self.lr_scale,
            "cooldown_until": self.cooldown_until,
            "bad_batches": sorted([e, b] for e, b in self.bad_batches),
            "events": list(self.events),
            "reinit_done": self.reinit_done,
            "last_rollback_step": self.last_rollback_step,
            "detector": self.detector.state_dict(),
            "children": {name: child.state_dict() for name, child in self.children.items()},
        }
        if self.checkpoint_snapshots:
            state["snapshots"] = self.ring.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.bad_batch_skips = int(state_dict.get("bad_batch_skips", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.cooldown_until = int(state_dict.get("cooldown_until", -1))
        self.bad_batches = {(int(e), int(b)) for e, b in state_dict.get("bad_batches", [])}
        self.events = [str(e) for e in state_dict.get("events", [])]
        self.reinit_done = bool(state_dict.get("reinit_done", False))
        self.last_rollback_step = int(state_dict.get("last_rollback_step", -1))
        self.detector.load_state_dict(state_dict.get("detector", {}))
        children = state_dict.get("children", {})
        for name, child in self.children.items():
            child.load_state_dict(children.get(name, {}))
        if self.checkpoint_snapshots and "snapshots" in state_dict:
            self.ring.load_state_dict(state_dict["snapshots"])
        self._force_snapshot = not len(self.ring)
