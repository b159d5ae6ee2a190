"""Which remedy acts after a step: the autopilot's escalation ladder, as plain host-side logic.

:class:`EscalationLadder` turns a step's flags (skipped, loss spike after an accepted step, sustained
jump of the update-to-weight ratio), read once on the host, into at most one action, cheapest first:
a skipped step alone needs nothing more; ``reset_moments_after`` skipped steps in a row reset Adam's
moments; a loss spike, or ``max_consecutive_skips`` skipped steps in a row (the damage is in the
weights, not in a batch), roll back to before the trouble began; a jump of the update ratio is an early
warning. No tensors, no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stability_callbacks._checks import check_int

__all__ = ["Action", "EscalationLadder"]


@dataclass(frozen=True)
class Action:
    """What the ladder asks for after a step.

    Attributes:
        rung: ``"moment_reset"``, ``"rollback"`` or ``"early_warning"``.
        why: the reason, in words.
        since: the first step of the trouble (a rollback returns to a snapshot taken before it).
        batches: ``(epoch, batch_idx)`` of the steps involved.
    """

    rung: str
    why: str
    since: int
    batches: list[tuple[int, int]] = field(default_factory=list)


class EscalationLadder:
    """Counts skipped steps in a row and picks the rung that acts after each step.

    Args:
        max_consecutive_skips: skipped steps in a row that call for a rollback (>= 1).
        reset_moments_after: skipped steps in a row that call for a moment reset (``None``: never).
    """

    def __init__(self, max_consecutive_skips: int = 8, reset_moments_after: int | None = 4) -> None:
        check_int("max_consecutive_skips", max_consecutive_skips)
        check_int("reset_moments_after", reset_moments_after, allow_none=True)
        self.max_consecutive_skips = max_consecutive_skips
        self.reset_moments_after = reset_moments_after
        self.consecutive = 0
        self.since = -1
        self.batches: list[tuple[int, int]] = []

    def observe(
        self, step: int, batches: list[tuple[int, int]], skipped: bool, spiked: bool, jumped: bool
    ) -> Action | None:
        """Account for optimizer step ``step`` (its ``batches``) and return the action it calls for."""
        if skipped:
            if self.consecutive == 0:
                self.since, self.batches = step, []
            self.consecutive += 1
            self.batches = [*self.batches, *batches]
        else:
            self.consecutive = 0
        if spiked:
            return Action("rollback", f"the training loss spiked at step {step}", step, list(batches))
        if self.consecutive >= self.max_consecutive_skips:
            why = f"{self.consecutive} optimizer steps in a row were skipped (steps {self.since}-{step})"
            return Action("rollback", why, self.since, list(self.batches))
        if self.reset_moments_after is not None and self.consecutive == self.reset_moments_after:
            why = f"{self.consecutive} optimizer steps in a row were skipped (steps {self.since}-{step})"
            return Action("moment_reset", why, self.since, list(self.batches))
        if jumped:
            why = (
                f"the update-to-weight ratio stayed above its running median for several steps (step {step})"
            )
            return Action("early_warning", why, step, list(batches))
        return None

    def reset(self) -> None:
        """Forget the trouble counted so far (after a rollback)."""
        self.consecutive, self.since, self.batches = 0, -1, []

    def state_dict(self) -> dict[str, Any]:
        return {
            "consecutive": self.consecutive,
            "since": self.since,
            "batches": [list(b) for b in self.batches],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.since = int(state.get("since", -1))
        self.batches = [(int(e), int(b)) for e, b in state.get("batches", [])]
