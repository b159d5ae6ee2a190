"""Skip an outlier optimizer step before it lands, with the decision kept on the device.

Two pieces, plain PyTorch (no Lightning), usable from any training loop:

- :class:`OutlierStepTest` judges a step's loss and total gradient norm against robust statistics of
  the recent accepted steps (median and MAD of the logarithms over a window kept in a device ring) and
  returns the decision as a 0-d bool tensor; nothing is read on the host.
- :class:`StepUndo` makes that decision take effect without a host sync: before ``optimizer.step()``
  it zeroes the gradients of a skipped step and copies the parameters and their optimizer state into
  buffers it keeps; after the step it puts them back where the decision says so, with one fused
  ``torch._foreach_lerp_`` whose weight is the decision (exactly 0 or 1, so the result is bit for bit
  either the new or the old value). Weights, moments and step counts (Adam's ``step`` included) of a
  skipped step are those of a run that never saw it.

The idea is OLMo-core's skip-step optimizer (``olmo_core/optim/skip_step_optimizer.py``), which
multiplies the update by a device-side step factor computed from a rolling mean and standard deviation
of the loss and the gradient norm. Here it works with any ``torch.optim`` optimizer instead of a
re-implemented one, and the statistics are robust ones of the logarithms: a median and a MAD are not
dragged up by the outliers they are meant to catch (a burst of bad batches does not raise the bar for
the next one), and on a log scale a 10x jump is the same test for a loss of 2.0 and of 0.02 or a norm
of 1e-3 and of 1e3. Outliers never enter the window.

Example::

    test, undo = OutlierStepTest(), StepUndo()
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        skip = test.judge(loss, total_norm([p.grad for p in model.parameters()])).skip
        undo.before_step(optimizer, skip)
        optimizer.step()
        undo.after_step()
        optimizer.zero_grad()

Limits: a step whose gradients are not finite is flagged too, but arithmetic cannot undo a NaN update
(``NaN * 0`` is NaN); drop such gradients first (:class:`~stability_callbacks.guard.NonFiniteGuard`
does, with its one documented host read). Optimizer state that lives on another device than the
decision (Adam's ``step`` is a host tensor unless ``capturable=True`` or ``fused=True``) gets a copy of
the decision on that device, which waits for the accelerator; on a CPU run nothing waits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from stability_callbacks._checks import check_int, check_number
from stability_callbacks.stats import local_tensor

__all__ = ["OutlierStepTest", "SkipDecision", "StepUndo"]

_MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class SkipDecision:
    """What :meth:`OutlierStepTest.judge` decided about one step; every field a 0-d device tensor.

    Attributes:
        skip: ``True`` when the step is an outlier (or not finite) and should be skipped.
        loss_score: rise of ``log(loss)`` over its window median, in robust standard deviations
            (0 before warm-up or for a non-positive loss).
        norm_score: the same for the total gradient norm.
        nonfinite: the loss or the norm is NaN or infinite.
    """

    skip: Tensor
    loss_score: Tensor
    norm_score: Tensor
    nonfinite: Tensor


class OutlierStepTest:
    """Robust statistics of recent steps' loss and gradient norm, and an outlier test against them.

    For each of the two quantities a ring of the last ``window`` accepted values of ``log(x)`` is kept
    on the device. A step is an outlier when, after ``warmup`` accepted steps,
    ``log(x) - median > threshold * max(1.4826 * MAD, min_log_scale)`` for the loss, or for the norm
    while the loss is not below its median (only rises count: a gradient norm that grows while the
    loss falls is a model learning), or when either is not finite (always, also during warm-up). An
    outlier does not enter the rings. After ``adapt_after`` outliers in a row the level is taken to
    have moved (a new phase of training, not a bad batch): the values are accepted again.

    Every rank must pass the same values (an all-reduced loss; a total norm of averaged or
    mesh-reduced gradients) to decide the same.

    Args:
        window: accepted steps in the statistics (>= 4).
        threshold: robust z-score of a rise that makes an outlier (> 0).
        warmup: accepted steps before the first judgement (>= 2, <= ``window``).
        min_log_scale: floor of the robust standard deviation in natural-log units (>= 0): the default
            0.1 keeps rises below ``exp(0.6) = 1.8x`` (at ``threshold=6``) from ever counting.
        adapt_after: outliers in a row after which values are accepted again (>= 1), or ``None``.
    """

    def __init__(
        self,
        window: int = 64,
        threshold: float = 6.0,
        warmup: int = 16,
        min_log_scale: float = 0.1,
        adapt_after: int | None = 32,
    ) -> None:
        check_int("window", window, 4)
        check_number("threshold", threshold, 0, low_open=True)
        check_int("warmup", warmup, 2)
        if warmup > window:
            raise ValueError(f"`warmup` must be at most `window`={window}, got {warmup!r}")
        check_number("min_log_scale", min_log_scale, 0)
        check_int("adapt_after", adapt_after, allow_none=True)
        self.window = window
        self.threshold = float(threshold)
        self.warmup = warmup
        self.min_log_scale = float(min_log_scale)
        self.adapt_after = adapt_after
        self.history: Tensor | None = None  # (2, window) float64: log loss, log norm; NaN = empty
        self.count: Tensor | None = None  # (2,) accepted values so far
        self.outliers_in_a_row: Tensor | None = None  # 0-d float64

    def _ensure(self, device: torch.device) -> None:
        if self.history is None or self.count is None or self.outliers_in_a_row is None:
            self.history = torch.full((2, self.window), float("nan"), dtype=torch.float64, device=device)
            self.count = torch.zeros(2, dtype=torch.float64, device=device)
            self.outliers_in_a_row = torch.zeros((), dtype=torch.float64, device=device)
        elif self.history.device != device:
            self.history, self.count = self.history.to(device), self.count.to(device)
            self.outliers_in_a_row = self.outliers_in_a_row.to(device)

    def judge(self, loss: Tensor, grad_norm: Tensor) -> SkipDecision:
        """Judge one step from its loss and total gradient norm (0-d tensors), then update the
        statistics with the values of an accepted step. No host sync."""
        device = grad_norm.device
        self._ensure(device)
        assert self.history is not None and self.count is not None and self.outliers_in_a_row is not None
        x = torch.stack(
            [
                loss.detach().reshape(()).to(device, torch.float64),
                grad_norm.detach().reshape(()).to(torch.float64),
            ]
        )
        finite = torch.isfinite(x)
        nonfinite = ~finite.all()
        positive = finite & (x > 0)
        logs = torch.where(positive, x, torch.ones_like(x)).log()
        median = torch.nanmedian(self.history, dim=1).values
        mad = torch.nanmedian((self.history - median[:, None]).abs(), dim=1).values
        scale = torch.clamp_min(_MAD_TO_STD * mad, self.min_log_scale).clamp_min(1e-12)
        ready = self.count >= self.warmup
        score = torch.where(ready & positive, (logs - median) / scale, torch.zeros_like(logs))
        # a norm that rises while the loss is below its median is a model learning, not a bad step
        rise = score > self.threshold
        outlier = nonfinite | rise[0] | (rise[1] & (score[0] >= 0))
        accept = ~outlier
        if self.adapt_after is not None:  # a level that moved for good is accepted again
            accept = accept | (~nonfinite & (self.outliers_in_a_row >= self.adapt_after))
        self.outliers_in_a_row.copy_(torch.where(outlier, self.outliers_in_a_row + 1, 0.0))
        add = accept & positive  # (2,)
        slot = torch.remainder(self.count, self.window).long()
        onehot = torch.arange(self.window, device=device)[None, :] == slot[:, None]
        self.history.copy_(torch.where(onehot & add[:, None], logs[:, None], self.history))
        self.count.add_(add.to(torch.float64))
        return SkipDecision(
            skip=outlier, loss_score=score[0].float(), norm_score=score[1].float(), nonfinite=nonfinite
        )

    def reset(self) -> None:
        """Forget the statistics (warm-up starts again)."""
        self.history = self.count = self.outliers_in_a_row = None

    def state_dict(self) -> dict[str, Any]:
        """The statistics as CPU tensors (empty before the first step)."""
        if self.history is None or self.count is None or self.outliers_in_a_row is None:
            return {}
        return {
            "history": self.history.detach().cpu().clone(),
            "count": self.count.detach().cpu().clone(),
            "outliers_in_a_row": self.outliers_in_a_row.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; an empty or mismatched state is a fresh start."""
        history = state.get("history") if state else None
        if not isinstance(history, Tensor) or tuple(history.shape) != (2, self.window):
            self.reset()
            return
        device = self.history.device if self.history is not None else torch.device("cpu")
        self.history = history.to(device, torch.float64).clone()
        self.count = torch.as_tensor(state["count"], dtype=torch.float64).to(device).clone()
        self.outliers_in_a_row = (
            torch.as_tensor(state.get("outliers_in_a_row", 0.0), dtype=torch.float64).to(device).clone()
        )


class StepUndo:
    """Undo an optimizer step on the device when a 0-d bool tensor says so: no host sync, bit exact.

    :meth:`before_step` zeroes the gradients when ``skip`` holds (so the update stays finite and can
    be undone exactly) and copies every parameter that has a gradient and its optimizer state (the
    local shards of DTensors) into buffers kept from step to step; :meth:`after_step` writes the copies
    back where ``skip`` holds and leaves the new values otherwise. Costs one copy and one ``lerp`` of
    the parameters and their state each step (for Adam three times the parameters' size), and that
    much memory. State the step creates (an optimizer's first step) is not undone.
    """

    def __init__(self) -> None:
        self._slots: list[tuple[Tensor, str | None]] = []  # (parameter, state key or None: the value)
        self._buffers: list[Tensor] = []
        self._skip: Tensor | None = None
        self._optimizer: Optimizer | None = None

    @staticmethod
    def _resolve(optimizer: Optimizer, slot: tuple[Tensor, str | None]) -> Tensor | None:
        p, key = slot
        value = p.detach() if key is None else optimizer.state.get(p, {}).get(key)
        return local_tensor(value) if isinstance(value, Tensor) else None

    @staticmethod
    def _gather(optimizer: Optimizer) -> list[tuple[Tensor, str | None]]:
        slots: list[tuple[Tensor, str | None]] = []
        seen: set[int] = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in seen:
                    continue
                seen.add(id(p))
                slots.append((p, None))
                slots += [(p, k) for k, v in optimizer.state.get(p, {}).items() if isinstance(v, Tensor)]
        return slots

    def before_step(self, optimizer: Optimizer, skip: Tensor) -> None:
        """Zero the gradients of a skipped step and copy the parameters and state (call right before
        ``optimizer.step()``)."""
        with torch.no_grad():
            keep = (~skip).to(torch.float32)
            grads = [
                local_tensor(g)
                for group in optimizer.param_groups
                for p in group["params"]
                if (g := p.grad) is not None
            ]
            for (device, dtype), group in _by_device_dtype(grads).items():
                torch._foreach_mul_(group, keep.to(device, dtype))
            slots = self._gather(optimizer)
            values = [self._resolve(optimizer, s) for s in slots]
            tensors = [v for v in values if v is not None]
            if (
                len(slots) != len(self._slots)
                or any(a[0] is not b[0] or a[1] != b[1] for a, b in zip(slots, self._slots, strict=True))
                or any(
                    t.shape != b.shape or t.dtype != b.dtype
                    for t, b in zip(tensors, self._buffers, strict=False)
                )
            ):
                self._slots = slots
                self._buffers = [t.clone() for t in tensors]
            else:
                for idx in _by_device_dtype_idx(tensors).values():
                    torch._foreach_copy_([self._buffers[i] for i in idx], [tensors[i] for i in idx])
        self._skip = skip
        self._optimizer = optimizer

    def after_step(self) -> None:
        """Write back the copies if the step was to be skipped (call right after ``optimizer.step()``)."""
        if self._skip is None or self._optimizer is None:
            return
        skip, optimizer = self._skip, self._optimizer
        self._skip = self._optimizer = None
        pairs = [
            (t, b)
            for s, b in zip(self._slots, self._buffers, strict=True)
            if (t := self._resolve(optimizer, s)) is not None and t.shape == b.shape
        ]
        targets = [t for t, _ in pairs]
        with torch.no_grad():
            for (device, dtype), idx in _by_device_dtype_idx(targets).items():
                group = [targets[i] for i in idx]
                saved = [pairs[i][1].to(dtype) for i in idx]
                if dtype.is_floating_point or dtype.is_complex:
                    w = skip.to(device, dtype)
                    torch._foreach_lerp_(group, saved, [w.expand_as(t) for t in group])
                else:  # integer state: rare, one kernel each
                    w = skip.to(device)
                    for t, b in zip(group, saved, strict=True):
                        t.copy_(torch.where(w, b, t))

    def release(self) -> None:
        """Free the buffers."""
        self._slots, self._buffers, self._skip, self._optimizer = [], [], None, None


def _by_device_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups


def _by_device_dtype_idx(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups
