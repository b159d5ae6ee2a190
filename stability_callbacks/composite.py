"""A callback that owns child callbacks, forwards Lightning's hooks to them and keeps a timeline.

:class:`CompositeCallback` is the base of :class:`~stability_callbacks.autopilot.StabilityAutopilot`:
its children are callbacks the trainer does not see; the composite forwards the lifecycle hooks to
them, drives their per-step work through their public calls, keeps their state in its own, and
explains each action it takes once (a rank-zero warning and a TensorBoard text of all of them).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from stability_callbacks._trainer import StabilityCallback, tensorboard_writer

__all__ = ["CompositeCallback"]


class CompositeCallback(StabilityCallback):
    """Owns ``children`` (name -> callback), forwards hooks to them, explains its actions.

    Args:
        verbose: warn on rank zero for each action explained.
    """

    timeline_tag = "timeline"

    def __init__(self, verbose: bool = True) -> None:
        super().__init__()
        self.children: dict[str, StabilityCallback] = {}
        self.events: list[str] = []
        self.verbose = verbose

    def _forward(self, hook: str, *args: Any) -> None:
        for child in self.children.values():
            getattr(child, hook)(*args)

    def _release(self) -> None:
        """Remove what a fit attached (hooks, buffers); called at the end, on exception, at teardown."""

    def _explain(self, trainer: pl.Trainer, message: str) -> None:
        """Add ``message`` to :attr:`events`, warn once on rank zero, write the whole timeline."""
        self.events.append(message)
        if self.verbose:
            rank_zero_warn(f"{type(self).__name__}: {message}", category=UserWarning)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            timeline = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(self.events))
            writer.add_text(self.timeline_tag, timeline, global_step=trainer.global_step)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._forward("on_before_backward", trainer, pl_module, loss)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_end", trainer, pl_module)
        self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._forward("on_exception", trainer, pl_module, exception)
        self._release()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forward("teardown", trainer, pl_module, stage)
        self._release()
        super().teardown(trainer, pl_module, stage)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._forward("on_save_checkpoint", trainer, pl_module, checkpoint)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def children_state(self) -> dict[str, Any]:
        """Each child's ``state_dict()`` by name."""
        return {name: child.state_dict() for name, child in self.children.items()}

    def load_children_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`children_state`; a child missing from ``state`` starts fresh."""
        for name, child in self.children.items():
            child.load_state_dict(state.get(name, {}))
