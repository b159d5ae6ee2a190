"""A learning-rate cooldown applied around ``optimizer.step()`` only, so schedules go on unchanged.

:class:`LearningRateCooldown` multiplies every param group's ``lr`` by a factor inside each
``optimizer.step()`` (an optimizer step pre-hook scales, a post-hook puts the rate back) for a number of
steps. Learning-rate schedulers, ``LearningRateMonitor`` and anyone reading ``param_groups`` between
steps see the unscaled rates. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.optim import Optimizer

__all__ = ["LearningRateCooldown"]


class LearningRateCooldown:
    """A factor on the learning rates of some optimizers, in force while ``step < until``.

    :meth:`attach` registers the step hooks; ``step`` comes from a callable (the trainer's optimizer
    step counter). :meth:`start` begins a cooldown, compounding the factor if one is in force. An
    ``after_step`` callable given to :meth:`attach` runs after each outermost ``optimizer.step()``.
    """

    def __init__(self) -> None:
        self.scale = 1.0
        self.until = -1  # the factor holds while step < until
        self._now: Callable[[], int] | None = None
        self._after: Callable[[Optimizer], None] | None = None
        self._hooks: list[Any] = []
        self._depth: dict[int, int] = {}
        self._saved: dict[int, list[float]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"scale": self.scale, "until": self.until}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.scale, self.until = float(state["scale"]), int(state["until"])

    def attach(
        self,
        optimizers: Sequence[Optimizer],
        now: Callable[[], int],
        after_step: Callable[[Optimizer], None] | None = None,
    ) -> None:
        """Register the step hooks on ``optimizers`` (removing any earlier ones)."""
        self.detach()
        self._now, self._after = now, after_step
        for opt in optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._pre))
            self._hooks.append(opt.register_step_post_hook(self._post))

    def detach(self) -> None:
        """Remove the step hooks."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._depth.clear()
        self._saved.clear()
        self._now = self._after = None

    def factor_at(self, step: int) -> float:
        """The factor in force at ``step``."""
        return self.scale if self.scale != 1.0 and step < self.until else 1.0

    def remaining(self, step: int) -> int:
        """Steps the factor still holds after ``step``."""
        return max(0, self.until - step) if self.scale != 1.0 else 0

    def start(self, step: int, factor: float, steps: int) -> float:
        """Begin a cooldown of ``steps`` steps at ``step``; returns the factor now in force (compounded
        with one still in force, 1.0 for ``steps == 0``)."""
        self.scale = (self.scale if self.factor_at(step) != 1.0 else 1.0) * factor
        self.until = step + steps
        if steps == 0:
            self.scale = 1.0
        return self.scale

    def end_if_over(self, step: int) -> bool:
        """Drop an expired factor; ``True`` when a cooldown ended now."""
        if self.scale != 1.0 and step >= self.until:
            self.scale = 1.0
            return True
        return False

    # an optimizer subclass whose step() calls super().step() runs the hooks once per level: only the
    # outermost call scales, restores and runs `after_step`
    def _pre(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        depth = self._depth.get(id(optimizer), 0)
        self._depth[id(optimizer)] = depth + 1
        scale = self.factor_at(self._now()) if self._now is not None else 1.0
        if depth == 0 and scale != 1.0:
            self._saved[id(optimizer)] = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * scale

    def _post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        depth = self._depth.get(id(optimizer), 1) - 1
        self._depth[id(optimizer)] = depth
        if depth > 0:
            return
        saved = self._saved.pop(id(optimizer), None)
        if saved is not None:
            for g, lr in zip(optimizer.param_groups, saved, strict=True):
                g["lr"] = lr
        if self._after is not None:
            self._after(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"lr_scale": self.scale, "cooldown_until": self.until}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state.get("lr_scale", 1.0))
        self.until = int(state.get("cooldown_until", -1))
