"""In-memory snapshots of model and optimizer state, to roll a run back to.

:class:`SnapshotRing` takes a copy every ``every_n_steps`` steps, on the device or in (pinned) host
memory, and keeps them within a count and a byte budget. With ``spacing="exponential"`` (the default)
recent snapshots are dense and older ones sparse: a snapshot of age ``a`` is kept only if its step is a
multiple of ``every_n_steps * 2**k`` with ``k = floor(log2(a / (2 * every_n_steps)))``, so a handful of
copies covers both "a few steps ago" (a burst of bad batches) and "hundreds of steps ago" (a slow drift).

Snapshots hold each rank's own part of the state: the local shards of DTensor parameters and optimizer
state (FSDP2 ``fully_shard``, tensor parallelism), plain tensors otherwise, and :meth:`SnapshotRing.restore`
copies them back in place, so a restore is exact on every rank and needs no collective. Plain PyTorch, no
Lightning.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks._checks import check_choice, check_int
from stability_callbacks.stats import local_tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a build of torch without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["Snapshot", "SnapshotRing"]

_SPACINGS = ("exponential", "uniform")


def _copy_tensor(t: Tensor, device: str) -> Tensor:
    """A copy of this rank's part of ``t`` (its local shard for a DTensor), on the host or cloned."""
    t = local_tensor(t.detach())
    if device == "device" or t.device.type == "cpu":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return host.copy_(t, non_blocking=True)  # stream-ordered: the restore copy runs after it


def _copy_tree(obj: Any, device: str) -> Any:
    """Deep copy of a nest of dicts/lists/tuples whose tensors are copied with :func:`_copy_tensor`."""
    if isinstance(obj, Tensor):
        return _copy_tensor(obj, device)
    if isinstance(obj, dict):
        return {k: _copy_tree(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy_tree(v, device) for v in obj)
    return copy.deepcopy(obj)


def _tree_nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tree_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tree_nbytes(v) for v in obj)
    return 0


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers by name (tied parameters once)."""
    out: dict[str, Tensor] = dict(model.named_parameters())
    for mod_name, mod in model.named_modules():
        skip: set[str] = getattr(mod, "_non_persistent_buffers_set", set())
        for name, buf in mod.named_buffers(prefix=mod_name, recurse=False):
            if name.rsplit(".", 1)[-1] not in skip:
                out[name] = buf
    return out


def _layout(t: Tensor) -> tuple[torch.device, Any]:
    """Where a tensor's local part lives, and the mesh layout of a DTensor (``None`` otherwise)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local().device, (t.device_mesh, tuple(t.placements), t.shape, t.stride())
    return t.device, None


def _optimizer_params(optimizer: Optimizer) -> list[Tensor]:
    return list({id(p): p for g in optimizer.param_groups for p in g["params"]}.values())


@dataclass
class Snapshot:
    """One saved training state: the step it was taken at (before that step's update), this rank's
    parameters and buffers by name, each optimizer's per-parameter state (a list in param-group order,
    ``None`` for a parameter without state) and any extra state (e.g. loss statistics)."""

    step: int
    model: dict[str, Tensor]
    optimizers: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshot's tensors."""
        return _tree_nbytes(self.model) + _tree_nbytes(self.optimizers) + _tree_nbytes(self.extra)


class SnapshotRing:
    """Copies of model and optimizer state, one every ``every_n_steps`` steps, within a budget.

    Args:
        every_n_steps: steps between snapshots (>= 1); :meth:`due` says when one is due.
        max_snapshots: most snapshots kept (>= 1); beyond it the oldest goes.
        device: ``"host"`` (CPU memory, pinned when CUDA is available; copied without a host sync)
            or ``"device"`` (clones next to the parameters: fastest restore, costs accelerator memory).
        budget_bytes: most bytes all snapshots may hold (``None``: no limit); the oldest go first and
            the newest is always kept (:attr:`over_budget` tells when it alone is too large).
        spacing: ``"exponential"`` (recent dense, older sparse; see the module docstring) or
            ``"uniform"`` (the newest ``max_snapshots``).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        max_snapshots: int = 2,
        device: str = "host",
        budget_bytes: int | None = None,
        spacing: str = "exponential",
    ) -> None:
        check_int("every_n_steps", every_n_steps)
        check_int("max_snapshots", max_snapshots)
        check_choice("device", device, ("host", "device"))
        check_int("budget_bytes", budget_bytes, allow_none=True)
        check_choice("spacing", spacing, _SPACINGS)
        self.every_n_steps = every_n_steps
        self.max_snapshots = max_snapshots
        self.device = device
        self.budget_bytes = budget_bytes
        self.spacing = spacing
        self.snapshots: list[Snapshot] = []
        self.over_budget = False
        self._layouts: dict[int, dict[str, Any]] = {}  # id(parameter) -> key -> where a state tensor lived

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

    def _keep(self, snap_step: int, now: int) -> bool:
        age = now - snap_step
        if self.spacing == "uniform" or age < 2 * self.every_n_steps:
            return True
        level = math.floor(math.log2(age / (2 * self.every_n_steps)))
        return snap_step % (self.every_n_steps * 2**level) == 0

    def take(
        self,
        step: int,
        model: nn.Module,
        optimizers: Sequence[Optimizer],
        extra: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Copy the state of ``model`` and ``optimizers`` as the state before ``step``; thin the older
        snapshots and evict the oldest beyond the count and byte budgets."""
        opt_states = []
        for opt in optimizers:
            per_param: list[dict[str, Any] | None] = []
            for p in _optimizer_params(opt):
                state = opt.state.get(p)
                per_param.append(None if not state else _copy_tree(dict(state), self.device))
                for key, value in (state or {}).items():
                    if isinstance(value, Tensor):
                        self._layouts.setdefault(id(p), {})[key] = _layout(value)
            opt_states.append({"state": per_param})
        snap = Snapshot(
            step,
            {name: _copy_tensor(t, self.device) for name, t in _model_tensors(model).items()},
            opt_states,
            _copy_tree(dict(extra or {}), self.device),
        )
        kept = [s for s in self.snapshots if s.step != step and s.step < step and self._keep(s.step, step)]
        self.snapshots = [*kept, snap]
        del self.snapshots[: max(0, len(self.snapshots) - self.max_snapshots)]
        if self.budget_bytes is not None:
            while len(self.snapshots) > 1 and self.nbytes > self.budget_bytes:
                del self.snapshots[0]
            self.over_budget = self.nbytes > self.budget_bytes
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
        """Copy a snapshot back into ``model`` and ``optimizers`` in place (same tensor objects).

        The newest snapshot taken before ``before_step`` is used unless ``snapshot`` is given. The
        optimizers get back their per-parameter state (moments, step counts; a parameter that had no
        state then has none again); their param-group settings (learning rate, ...) stay as they are
        now, so learning-rate schedules are not undone. Each rank writes its own shards: no collective.
        Returns the snapshot used; raises ``LookupError`` if there is none.
        """
        snap = snapshot if snapshot is not None else self.newest_before(before_step)
        if snap is None:
            raise LookupError(f"no snapshot before step {before_step}")
        if len(snap.optimizers) != len(optimizers):
            raise ValueError(f"snapshot holds {len(snap.optimizers)} optimizers, got {len(optimizers)}")
        current = _model_tensors(model)
        if current.keys() != snap.model.keys():
            missing = sorted(current.keys() ^ snap.model.keys())[:5]
            raise ValueError(f"the model's tensors differ from the snapshot's (e.g. {missing})")
        with torch.no_grad():
            for name, saved in snap.model.items():
                local_tensor(current[name].detach()).copy_(saved)
            for opt, saved_opt in zip(optimizers, snap.optimizers, strict=True):
                params = _optimizer_params(opt)
                states = saved_opt["state"]
                if len(states) != len(params):
                    raise ValueError(f"snapshot holds state of {len(states)} parameters, got {len(params)}")
                for p, saved_state in zip(params, states, strict=True):
                    if saved_state is None:
                        opt.state.pop(p, None)
                        continue
                    opt.state[p] = self._restored_state(p, opt.state.get(p, {}), saved_state)
        return snap

    def _restored_state(self, p: Tensor, now: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in saved.items():
            if not isinstance(value, Tensor):
                out[key] = copy.deepcopy(value)
                continue
            target = now.get(key)
            if isinstance(target, Tensor):
                local = local_tensor(target)
                if local.shape == value.shape and local.dtype == value.dtype:
                    local.copy_(value)
                    out[key] = target
                    continue
            layout = self._layouts.get(id(p), {}).get(key)
            if layout is None:  # a snapshot loaded from a checkpoint: next to the parameter
                layout = (local_tensor(p.detach()).device if value.dim() else torch.device("cpu"), None)
            device, spec = layout
            fresh = value.to(device, copy=True)
            if spec is not None and DTensor is not None:
                mesh, placements, shape, stride = spec
                fresh = DTensor.from_local(
                    fresh, mesh, placements, shape=shape, stride=stride, run_check=False
                )
            out[key] = fresh
        return out

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
        snaps = [
            Snapshot(int(s["step"]), dict(s["model"]), list(s["optimizers"]), dict(s.get("extra", {})))
            for s in state.get("snapshots", [])
        ]
        self.snapshots = [s for s in snaps if all("state" in o for o in s.optimizers)][-self.max_snapshots :]
