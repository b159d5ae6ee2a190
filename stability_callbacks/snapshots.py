"""In-memory snapshots of model and optimizer state, to roll a run back to.

:class:`SnapshotRing` keeps at most ``max_snapshots`` copies, one every ``every_n_steps`` steps, on the
device or in (pinned) host memory, and restores one in place. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks._checks import check_choice, check_int

__all__ = ["Snapshot", "SnapshotRing"]


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
        check_int("every_n_steps", every_n_steps)
        check_int("max_snapshots", max_snapshots)
        check_choice("device", device, ("host", "device"))
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
