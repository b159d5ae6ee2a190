"""The autopilot's one host read a step: its device flags, agreed across ranks in one collective.

Each rule of :class:`~stability_callbacks.autopilot.StabilityAutopilot` (the guard's non-finite check,
the re-initialisation watch, the outlier test, the loss-spike detector, the update-ratio jump) leaves
its verdict on the device; :func:`read_step_flags` stacks them, averages them over the ranks (a flag is
set when it is set on any rank) and copies them to the host once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

__all__ = ["StepFlags", "read_step_flags"]

_FIELDS = ("nonfinite", "vanishing", "outlier", "spiked", "jumped", "loss_score", "norm_score")


@dataclass(frozen=True)
class StepFlags:
    """One optimizer step's verdicts, on the host and the same on every rank.

    Attributes:
        nonfinite: some rank's gradients held a NaN or an infinity.
        vanishing: the re-initialisation watch found gradients vanishing.
        outlier: the step was a (finite) outlier, skipped before its update.
        spiked: the training loss spiked on an accepted step.
        jumped: the update-to-weight ratio jumped (sustained), as of the last measured step.
        loss_score, norm_score: the outlier test's robust scores of the loss and the gradient norm.
    """

    nonfinite: bool = False
    vanishing: bool = False
    outlier: bool = False
    spiked: bool = False
    jumped: bool = False
    loss_score: float = 0.0
    norm_score: float = 0.0


def read_step_flags(strategy: Strategy, device: torch.device, **flags: Tensor | None) -> StepFlags:
    """Average the given 0-d tensors over the ranks in one collective and read them in one host copy.

    Args:
        strategy: the trainer's strategy (its ``reduce`` is the collective).
        device: where to stack them (the gradients' device).
        flags: tensors named as the fields of :class:`StepFlags`; ``None`` or absent: not set (0).
    """
    unknown = set(flags) - set(_FIELDS)
    if unknown:
        raise TypeError(f"read_step_flags: unknown flags {sorted(unknown)}")
    zero = torch.zeros((), device=device)
    given = [flags.get(name) for name in _FIELDS]
    stacked = torch.stack([zero if t is None else t.detach().reshape(()).float().to(device) for t in given])
    nonfinite, vanishing, outlier, spiked, jumped, loss_score, norm_score = strategy.reduce(
        stacked, reduce_op="mean"
    ).tolist()  # the step's one host read
    return StepFlags(
        nonfinite > 0, vanishing > 0, outlier > 0, spiked > 0, jumped > 0, loss_score, norm_score
    )
