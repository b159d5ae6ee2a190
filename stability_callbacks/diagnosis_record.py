"""The :class:`Diagnosis` record: what the gradient-health rules concluded at one step, in numbers and words.

Plain Python. :class:`~stability_callbacks.diagnosis.GradientDiagnostician` (the rules, with their
statistics on the device) fills one from a host copy of its state on a logging step;
:meth:`Diagnosis.message` says which rule fired, with its numbers, and what to try.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["RULES", "Diagnosis"]

RULES = ("vanishing", "exploding", "diverging")
"""The rules with hysteresis, in the order of the rows of
:attr:`~stability_callbacks.diagnosis.GradientDiagnostician.rules`."""

_VANISHING_REMEDIES = (
    "InitSwap(scheme='auto') or InitSwap(scheme='lsuv') to re-initialise for the activations in use, "
    "ReLU-family activations instead of sigmoid/tanh, normalisation layers (BatchNorm/LayerNorm), "
    "or residual connections"
)
_EXPLODING_REMEDIES = (
    "ZClip() or AutoClip() for adaptive clipping, AGC() for unit-wise clipping, NormClip(max_norm), "
    "a lower learning rate or a warm-up, and InitSwap(scheme='auto') if it starts at initialisation"
)
_DIVERGING_REMEDIES = (
    "a learning-rate warm-up, a lower learning rate, ZClip() to cut the gradient spikes that start it, "
    "and StabilityAutopilot(), which rolls back to an in-memory snapshot and cools the learning rate"
)
_NONFINITE_REMEDIES = (
    "NonFiniteGuard(action='skip') to skip such steps, ZClip()/AutoClip() to stop the growth that "
    "precedes them, a lower learning rate, and bf16 instead of fp16 precision"
)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class Diagnosis:
    """What the gradients and the loss show at one optimizer step, and what the rules concluded.

    Attributes:
        total_norm: L2 norm of all gradients at this step.
        depth_ratio: first layer's norm over the last layer's (``None`` without two endpoint layers).
        vanishing, exploding, diverging: the flags of the rules (see :mod:`stability_callbacks.diagnosis`).
        nonfinite: some gradient of this step is NaN or infinite.
        first_layer, last_layer: the layers of the depth ratio.
        small_layers: tiny layers of this step (below ``vanishing_norm`` and ``vanishing_ratio`` x total).
        nonfinite_layers: layers with a non-finite norm at this step.
        median: running median of the last ``window`` accepted total norms (``None`` while empty).
        step: the optimizer step diagnosed (``None`` when not given).
        norm_level: the run's own level of the total norm, the highest running median so far
            (``None`` before ``min_history`` accepted norms).
        loss: the last training loss observed (``None`` without one).
        loss_level: median of the last ``window`` accepted losses.
        loss_scale: the run's loss scale, the highest such median so far.
        loss_falling: the last loss was below 0.75 times ``loss_level`` (it vetoes the exploding rule).
        since: for each rule that has been on, the step its latest episode began.
        first_flagged: for each rule that has ever been on, the first step its flag turned on.
        last_cleared: for each rule that has turned off, the last step it did.
        episodes: how many times each rule's flag has turned on.
        onset_value, onset_reference: per rule, the numbers at its latest turn-on: the depth ratio and
            ``vanishing_ratio``; the total norm and its level; the loss and its recent median.
        nonfinite_steps: steps so far whose gradients held NaN or inf.
        first_nonfinite_step, last_nonfinite_step: the first and the latest of them.
        patience, sample_every, exploding_norm, spike_factor, diverging_factor: the settings of the rules,
            quoted by :meth:`message` (``patience`` in observations, ``sample_every`` optimizer steps apart).
    """

    total_norm: float
    depth_ratio: float | None = None
    vanishing: bool = False
    exploding: bool = False
    nonfinite: bool = False
    first_layer: str | None = None
    last_layer: str | None = None
    small_layers: list[str] = field(default_factory=list)
    nonfinite_layers: list[str] = field(default_factory=list)
    median: float | None = None
    diverging: bool = False
    step: int | None = None
    norm_level: float | None = None
    loss: float | None = None
    loss_level: float | None = None
    loss_scale: float | None = None
    loss_falling: bool = False
    since: dict[str, int] = field(default_factory=dict)
    first_flagged: dict[str, int] = field(default_factory=dict)
    last_cleared: dict[str, int] = field(default_factory=dict)
    episodes: dict[str, int] = field(default_factory=dict)
    onset_value: dict[str, float] = field(default_factory=dict)
    onset_reference: dict[str, float] = field(default_factory=dict)
    nonfinite_steps: int = 0
    first_nonfinite_step: int | None = None
    last_nonfinite_step: int | None = None
    patience: int = 3
    sample_every: int = 1
    exploding_norm: float = math.inf
    spike_factor: float = 10.0
    diverging_factor: float = 2.0

    def flags(self) -> dict[str, bool]:
        """The four flags by name (``vanishing``, ``exploding``, ``diverging``, ``nonfinite``)."""
        return {k: bool(getattr(self, k)) for k in (*RULES, "nonfinite")}

    def _when(self, kind: str) -> str:
        start = self.since.get(kind)
        if getattr(self, kind) or kind not in self.last_cleared:
            return f"since step {start}"
        return f"from step {start} to step {self.last_cleared[kind]}"  # on and off again since the last read

    def message(self, kind: str) -> str:
        """Which rule fired, with its numbers, and what to try (``"vanishing"``, ``"exploding"``,
        ``"diverging"`` or ``"nonfinite"``)."""
        value = self.onset_value.get(kind)
        ref = self.onset_reference.get(kind)
        if self.sample_every == 1:
            held = f"for {self.patience} consecutive steps"
        else:
            held = f"on {self.patience} consecutive checks {self.sample_every} steps apart"
        at = self.since.get(kind)
        if kind == "vanishing":
            if value is not None and ref is not None and value < ref:
                why = (
                    f"{held} the depth ratio stayed under vanishing_ratio={_fmt(ref)} ({_fmt(value)} at "
                    f"step {at})"
                )
            else:
                why = (
                    f"{held} some layer had tiny gradients (below vanishing_norm and vanishing_ratio x total)"
                )
            now = []
            if self.depth_ratio is not None:
                now.append(
                    f"the gradient norm of the first layer '{self.first_layer}' is {_fmt(self.depth_ratio)} "
                    f"times that of the last layer '{self.last_layer}'"
                )
            if self.small_layers:
                now.append(
                    f"{len(self.small_layers)} layer(s) have tiny gradients: {_names(self.small_layers)}"
                )
            return (
                f"Gradients are vanishing toward the input ({self._when(kind)}): {why}"
                + "".join(f"; {part}" for part in now)
                + f". Early layers barely learn. Try: {_VANISHING_REMEDIES}."
            )
        if kind == "exploding":
            if value is not None and ref is not None and value > self.spike_factor * ref:
                why = (
                    f"{held} the total gradient norm was over spike_factor={_fmt(self.spike_factor)} times "
                    f"the run's own level {_fmt(ref)} (its highest running median): {_fmt(value)} at step "
                    f"{at}, {_fmt(value / ref)} times the level"
                )
            else:
                why = (
                    f"{held} the total gradient norm was over exploding_norm={_fmt(self.exploding_norm)}: "
                    f"{_fmt(value)} at step {at}"
                )
            if self.loss is None:
                loss = " (no training loss to compare with)"
            else:
                loss = (
                    f", while the loss did not fall (now {_fmt(self.loss)}, its recent median "
                    f"{_fmt(self.loss_level)})"
                )
            return (
                f"Gradients are exploding ({self._when(kind)}): {why}{loss}; the total norm is now "
                f"{_fmt(self.total_norm)}. Try: {_EXPLODING_REMEDIES}."
            )
        if kind == "diverging":
            if value is not None and not math.isfinite(value):
                why = f"{held} the training loss was not finite ({value} at step {at})"
            else:
                times = _fmt(value / ref) if value is not None and ref else "n/a"
                why = (
                    f"{held} the training loss was over diverging_factor={_fmt(self.diverging_factor)} times "
                    f"its recent median {_fmt(ref)}: {_fmt(value)} at step {at}, {times} times the median "
                    f"(the run's loss scale: {_fmt(self.loss_scale)})"
                )
            return (
                f"Training is diverging ({self._when(kind)}): {why}; the loss is now {_fmt(self.loss)}. "
                f"Try: {_DIVERGING_REMEDIES}."
            )
        if kind == "nonfinite":
            where = f" in {_names(self.nonfinite_layers)}" if self.nonfinite_layers else ""
            steps = (
                f" ({self.nonfinite_steps} step(s) so far, the first at step {self.first_nonfinite_step}, "
                f"the latest at step {self.last_nonfinite_step})"
                if self.nonfinite_steps
                else ""
            )
            return f"Gradients contain NaN or inf{where}{steps}. Try: {_NONFINITE_REMEDIES}."
        raise ValueError(f"unknown diagnosis kind {kind!r}")
