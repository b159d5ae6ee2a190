"""Gradient-health rules on the device: vanishing, exploding, diverging and non-finite, every optimizer step.

Layer 1, plain PyTorch. :class:`GradientDiagnostician` is given each optimizer step's total and per-layer
gradient norms (:meth:`~GradientDiagnostician.observe`) and, where there is one, its training loss
(:meth:`~GradientDiagnostician.observe_loss`). It keeps its running statistics, flags and streak counters
as tensors on the device of the norms and reads nothing to the host: :meth:`~GradientDiagnostician.readout`
is one small tensor that a caller copies to the host with its own values when it logs, and
:meth:`~GradientDiagnostician.diagnosis` turns that copy into a
:class:`~stability_callbacks.diagnosis_record.Diagnosis` (re-exported here) with plain-words messages.
Every window counts optimizer steps, so the verdict at a step is the same whether it is read on every
step or every fifty.

The rules (``k`` = ``patience``, ``m`` = ``recovery``, both in optimizer steps):

- **vanishing** turns on after ``k`` consecutive steps where the depth ratio (first layer's gradient
  norm over the last layer's) is below ``vanishing_ratio`` or a layer is tiny (norm below
  ``vanishing_norm`` and below ``vanishing_ratio`` times the total norm, so a run converging to zero
  loss does not count); it turns off after ``m`` steps with the ratio at least twice ``vanishing_ratio``
  and no tiny layer (Glorot & Bengio 2010; Hochreiter 1991).
- **exploding** compares the total norm with the run's own level: the highest running median of the
  last ``window`` accepted norms (after ``min_history`` of them). It turns on after ``k`` consecutive
  steps above ``spike_factor`` times that level (or above ``exploding_norm``, off by default) while the
  training loss is not falling, and off after ``m`` steps below half the on-threshold. A norm is
  accepted into the window unless it is over the threshold (half of it while the flag is on) with a
  loss that does not fall, so an explosion does not raise its own reference, while a rise that comes
  with a falling loss (a network breaking off a plateau) becomes the new level.
- **diverging** watches the training loss with :class:`~stability_callbacks.spikes.LossSpikeDetector`
  in ``"ratio"`` mode: a loss above ``diverging_factor`` times the median of the last ``window``
  accepted losses, by more than ``diverging_rise`` times the run's loss scale (the highest such median
  so far), or a non-finite loss. It turns on after ``k`` consecutive such steps and off after ``m``
  steps with no spike and a rise of at most half that margin.
- **non-finite**: the step's gradients hold a NaN or an inf (no hysteresis; every such step is
  counted, with its first and last step).

The same loss statistics tell the exploding rule whether the loss is falling: the step's loss is below
``0.75`` times the median of recent losses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from stability_callbacks._checks import check_int, check_number
from stability_callbacks.diagnosis_record import RULES, Diagnosis
from stability_callbacks.spikes import LossSpikeDetector
from stability_callbacks.stats import wide_dtype

__all__ = ["RULES", "Diagnosis", "GradientDiagnostician", "pick_endpoints"]

_RELEASE = 2.0  # an off-threshold is the on-threshold made this many times less extreme
_FALLING = 0.75  # a loss below this times the median of recent losses is falling

# columns of GradientDiagnostician.rules (one row per rule of RULES)
_FLAG, _ON_RUN, _OFF_RUN, _EPISODES, _SINCE, _UNTIL, _FIRST, _AT_VALUE, _AT_REF = range(9)
_RULE_FIELDS = 9
# slots of GradientDiagnostician.scalars
(
    _STEPS,
    _ADMITTED,
    _MEDIAN,
    _LEVEL,
    _TOTAL,
    _DEPTH,
    _NONFINITE,
    _NONFINITE_STEPS,
    _FIRST_NONFINITE,
    _LAST_NONFINITE,
    _LOSS,
    _LOSS_LEVEL,
    _LOSS_SCALE,
    _FALLING_NOW,
    _LOSS_STEPS,
) = range(15)
_SCALARS = 15


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else x


def _step(x: float) -> int | None:
    return None if x < 0 or math.isnan(x) else int(x)


def pick_endpoints(eligible: Sequence[bool] | None, present: Sequence[bool]) -> tuple[int, int] | None:
    """The first and last layer that may end the depth ratio and have a gradient (``None``: fewer than two).

    Args:
        eligible: per layer, whether it may be an end (``None``: every layer may).
        present: per layer, whether it has a gradient this step.
    """
    ends = [i for i, p in enumerate(present) if p and (eligible is None or eligible[i])]
    return (ends[0], ends[-1]) if len(ends) >= 2 else None


class GradientDiagnostician:
    """The diagnosis rules of :mod:`stability_callbacks.diagnosis`, with their state on the device.

    Call :meth:`observe` once per optimizer step with the step's norms and :meth:`observe_loss` with its
    loss; neither reads anything to the host. On the steps that log, copy :meth:`readout` to the host
    (with the other values of the step, in one transfer) and pass it to :meth:`diagnosis`. A loop that
    reads every step anyway can call :meth:`update` with Python floats instead.

    Args:
        vanishing_ratio: depth-ratio threshold (first/last layer norm).
        vanishing_norm: a layer below this norm (and below ``vanishing_ratio`` x the total) is tiny
            (0 turns that part off).
        exploding_norm: an absolute bound on the total norm, ``math.inf`` or ``None`` (the default) for
            none: it depends on the loss's reduction and scale, so the run's own level is the rule.
        spike_factor: the exploding on-threshold, a multiple of the run's own level (> 1).
        window: optimizer steps in the running medians of the total norm and of the loss.
        patience: consecutive optimizer steps a rule must hold before its flag turns on.
        min_history: accepted norms (losses) before the exploding (diverging) rule judges (>= 2).
        recovery: consecutive optimizer steps under the off-threshold before a flag turns off.
        diverging_factor: a loss this many times the median of recent losses is rising (> 1).
        diverging_rise: ... and must also rise by this fraction of the run's loss scale (>= 0).
        sample_every: optimizer steps each observation stands for (its loss: their mean). The windows,
            ``patience``, ``recovery`` and ``min_history`` stay in optimizer steps and are divided by it
            (rounded up; with ``patience >= 2`` a rule holds on at least two consecutive observations).
    """

    def __init__(
        self,
        vanishing_ratio: float = 1e-3,
        vanishing_norm: float = 1e-8,
        exploding_norm: float | None = None,
        spike_factor: float = 10.0,
        window: int = 50,
        patience: int = 3,
        min_history: int = 5,
        recovery: int = 10,
        diverging_factor: float = 2.0,
        diverging_rise: float = 0.05,
        sample_every: int = 1,
    ) -> None:
        if exploding_norm is None:
            exploding_norm = math.inf
        check_number("vanishing_ratio", vanishing_ratio, 0, low_open=True)
        check_number("vanishing_norm", vanishing_norm, 0)
        check_number("exploding_norm", exploding_norm, 0, low_open=True)
        check_number("spike_factor", spike_factor, 1, low_open=True)
        check_number("diverging_factor", diverging_factor, 1, low_open=True)
        check_number("diverging_rise", diverging_rise, 0)
        for name, value in (("window", window), ("patience", patience), ("recovery", recovery)):
            check_int(name, value)
        check_int("min_history", min_history, 2)
        check_int("sample_every", sample_every)
        self.vanishing_ratio = float(vanishing_ratio)
        self.vanishing_norm = float(vanishing_norm)
        self.exploding_norm = float(exploding_norm)
        self.spike_factor = float(spike_factor)
        self.window = window
        self.patience = patience
        self.min_history = min_history
        self.recovery = recovery
        self.sample_every = sample_every
        # the windows in observations: each observation stands for `sample_every` optimizer steps
        self._window = max(math.ceil(window / sample_every), 2)
        self._patience = max(math.ceil(patience / sample_every), min(patience, 2))
        self._recovery = math.ceil(recovery / sample_every)
        self._min_history = max(math.ceil(min_history / sample_every), 2)
        self.diverging_factor = float(diverging_factor)
        self.diverging_rise = float(diverging_rise)
        self.loss_detector = LossSpikeDetector(
            "ratio", threshold=diverging_factor, warmup=self._min_history, window=self._window
        )
        self.rules: Tensor | None = None  # (len(RULES), fields): flags, streaks, episodes, onset steps
        self.scalars: Tensor | None = None  # counters and the latest statistics
        self.ring: Tensor | None = None  # the last `window` accepted total norms, NaN = empty
        self._calls = 0  # steps given to `update` (its step numbers)
        self._present: tuple[tuple[bool, ...], Tensor] | None = None

    # -- device state ------------------------------------------------------------------------------

    def _ensure(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        dtype = wide_dtype(device)
        if self.rules is None or self.scalars is None or self.ring is None:
            self.rules = torch.zeros(len(RULES), _RULE_FIELDS, dtype=dtype, device=device)
            self.rules[:, [_SINCE, _UNTIL, _FIRST]] = -1.0
            self.rules[:, [_AT_VALUE, _AT_REF]] = math.nan
            self.scalars = torch.full((_SCALARS,), math.nan, dtype=dtype, device=device)
            zero = [_STEPS, _ADMITTED, _NONFINITE, _NONFINITE_STEPS, _FALLING_NOW, _LOSS_STEPS]
            self.scalars[zero] = 0.0
            self.scalars[[_FIRST_NONFINITE, _LAST_NONFINITE]] = -1.0
            self.ring = torch.full((self._window,), math.nan, dtype=dtype, device=device)
        elif self.rules.device != device or self.rules.dtype != dtype:
            self.rules, self.scalars = self.rules.to(device, dtype), self.scalars.to(device, dtype)
            self.ring = self.ring.to(device, dtype)
        return self.rules, self.scalars, self.ring

    def _present_mask(self, present: Sequence[bool], device: torch.device) -> Tensor:
        key = tuple(bool(p) for p in present)
        if self._present is None or self._present[0] != key or self._present[1].device != device:
            # built once per set of layers with gradients, asynchronously: not a sync on later steps
            mask = torch.tensor(key, dtype=torch.bool).to(device, non_blocking=True)
            self._present = (key, mask)
        return self._present[1]

    def _advance(self, rows: slice, on: Tensor, off: Tensor, value: Tensor, ref: Tensor, step: int) -> None:
        """Hysteresis of the rules in ``rows``: streaks, flags, episodes and onset numbers."""
        assert self.rules is not None
        r = self.rules[rows]
        flag = r[:, _FLAG] > 0
        on_run = torch.where(on, r[:, _ON_RUN] + 1, 0.0)
        off_run = torch.where(off, r[:, _OFF_RUN] + 1, 0.0)
        turn_on = ~flag & (on_run >= self._patience)
        turn_off = flag & (off_run >= self._recovery)
        now = (flag | turn_on) & ~turn_off
        new = torch.stack(
            [
                now.to(r.dtype),
                on_run,
                off_run,
                r[:, _EPISODES] + turn_on.to(r.dtype),
                torch.where(turn_on, float(step), r[:, _SINCE]),
                torch.where(turn_off, float(step), r[:, _UNTIL]),
                torch.where(turn_on & (r[:, _FIRST] < 0), float(step), r[:, _FIRST]),
                torch.where(turn_on, value.to(r.dtype), r[:, _AT_VALUE]),
                torch.where(turn_on, ref.to(r.dtype), r[:, _AT_REF]),
            ],
            dim=1,
        )
        r.copy_(new)

    def observe(
        self,
        total: Tensor,
        per_layer: Tensor,
        present: Sequence[bool],
        endpoints: tuple[int, int] | None,
        step: int | None = None,
    ) -> None:
        """Update the gradient rules with one optimizer step (no host sync).

        Args:
            total: the total gradient norm (0-d tensor).
            per_layer: per-layer norms in forward order (1-d tensor, one per layer).
            present: per layer, whether it has a gradient this step (host booleans).
            endpoints: positions of the first and last layer of the depth ratio (:func:`pick_endpoints`).
            step: the optimizer step, for the onset steps; the number of steps observed if ``None``.
        """
        rules, s, ring = self._ensure(total.device)
        if step is None:
            step = self._calls
        dt = s.dtype
        g = total.detach().reshape(()).to(dt)
        layers = per_layer.detach().to(dt)
        mask = self._present_mask(present, layers.device)
        finite = torch.isfinite(g) & (torch.isfinite(layers) | ~mask).all()
        nan = g.new_full((), math.nan)

        if endpoints is not None:
            first, last = layers[endpoints[0]], layers[endpoints[1]]
            depth = torch.where(last > 0, first / last, nan)
        else:
            depth = nan
        tiny = (layers < self.vanishing_norm) & (layers < self.vanishing_ratio * g)
        small = (mask & tiny).any()
        van_on = finite & ((depth < self.vanishing_ratio) | small)
        van_off = finite & ~(depth < _RELEASE * self.vanishing_ratio) & ~small

        level, falling = s[_LEVEL], s[_FALLING_NOW] > 0
        ready = s[_ADMITTED] >= self._min_history
        bound = g > self.exploding_norm
        over = finite & ((ready & (level > 0) & (g > self.spike_factor * level)) | bound)
        exp_on = over & ~falling
        exp_off = finite & ~(g > (self.spike_factor / _RELEASE) * level) & ~bound
        exploding = rules[1, _FLAG] > 0
        limit = torch.where(exploding, self.spike_factor / _RELEASE, self.spike_factor)
        held_out = (ready & (level > 0) & (g > limit * level)) | bound
        admit = finite & (falling | ~held_out)

        slot = torch.remainder(s[_ADMITTED], self._window).long()
        onehot = torch.arange(self._window, device=ring.device) == slot
        ring.copy_(torch.where(onehot & admit, g, ring))
        admitted = s[_ADMITTED] + admit.to(dt)
        median = torch.nanmedian(ring)
        new_level = torch.where(admitted >= self._min_history, torch.fmax(level, median), level)

        self._advance(
            slice(0, 2),
            torch.stack([van_on, exp_on]),
            torch.stack([van_off, exp_off]),
            torch.stack([depth, g]),
            torch.stack([depth.new_tensor(self.vanishing_ratio), level]),
            step,
        )
        bad = ~finite
        s.copy_(
            torch.stack(
                [
                    s[_STEPS] + 1,
                    admitted,
                    median,
                    new_level,
                    g,
                    depth,
                    bad.to(dt),
                    s[_NONFINITE_STEPS] + bad.to(dt),
                    torch.where(bad & (s[_FIRST_NONFINITE] < 0), float(step), s[_FIRST_NONFINITE]),
                    torch.where(bad, float(step), s[_LAST_NONFINITE]),
                    s[_LOSS],
                    s[_LOSS_LEVEL],
                    s[_LOSS_SCALE],
                    s[_FALLING_NOW],
                    s[_LOSS_STEPS],
                ]
            )
        )
        self._calls += 1

    def observe_loss(self, loss: Tensor, step: int | None = None) -> None:
        """Update the diverging rule and the falling-loss veto with one optimizer step's loss (no sync).

        Args:
            loss: the step's training loss (0-d tensor; the mean over its micro-batches).
            step: the optimizer step, for the onset steps; the number of steps observed if ``None``.
        """
        _, s, _ = self._ensure(loss.device)
        if step is None:
            step = max(self._calls - 1, 0)
        dt = s.dtype
        x = loss.detach().reshape(()).to(dt)
        history = self.loss_detector.history
        before = torch.nanmedian(history).to(dt) if history is not None else x.new_full((), math.nan)
        spike = self.loss_detector.observe(x)
        assert self.loss_detector.history is not None
        finite = torch.isfinite(x)
        scale = s[_LOSS_SCALE]
        rise = x - before
        margin = self.diverging_rise * scale
        div_on = ~finite | (spike & ~(rise <= margin))
        div_off = finite & ~spike & ~(rise > margin / _RELEASE)
        falling = finite & (x < _FALLING * before)
        after = torch.nanmedian(self.loss_detector.history).to(dt)
        warm = (~torch.isnan(self.loss_detector.history)).sum() >= self._min_history
        self._advance(
            slice(2, 3), div_on.reshape(1), div_off.reshape(1), x.reshape(1), before.reshape(1), step
        )
        s[_LOSS:] = torch.stack(
            [
                x,
                after,
                torch.where(warm, torch.fmax(scale, after), scale),
                falling.to(dt),
                s[_LOSS_STEPS] + 1,
            ]
        )

    # -- reading -----------------------------------------------------------------------------------

    @property
    def steps_observed(self) -> int:
        """Optimizer steps given to :meth:`observe` so far."""
        return self._calls

    def flag(self, rule: str) -> Tensor:
        """Whether ``rule`` (one of :data:`RULES`) is on: a 0-d bool tensor on the device (no host sync;
        ``False`` on the CPU before the first step)."""
        if rule not in RULES:
            raise ValueError(f"`rule` must be one of {RULES}, got {rule!r}")
        if self.rules is None:
            return torch.zeros((), dtype=torch.bool)
        return self.rules[RULES.index(rule), _FLAG] > 0

    def readout(self) -> Tensor:
        """The rules and statistics as one 1-d tensor on the device, for one host copy (empty before
        the first step)."""
        if self.rules is None or self.scalars is None:
            return torch.zeros(0)
        return torch.cat([self.rules.flatten(), self.scalars])

    def diagnosis(
        self,
        values: Sequence[float],
        total: float,
        norms: Sequence[float | None],
        names: Sequence[str],
        endpoints: tuple[int, int] | None,
        step: int | None = None,
    ) -> Diagnosis:
        """The :class:`Diagnosis` of a step from the host copy of :meth:`readout` and the step's norms.

        Args:
            values: ``readout().tolist()`` (or a slice of a larger host copy).
            total: the step's total norm.
            norms: its per-layer norms (``None``: no gradient), in the order of ``names``.
            names: the layer names.
            endpoints: the depth ratio's layers, as given to :meth:`observe`.
            step: the step diagnosed.
        """
        d = Diagnosis(
            total_norm=total,
            step=step,
            patience=self._patience,
            sample_every=self.sample_every,
            exploding_norm=self.exploding_norm,
            spike_factor=self.spike_factor,
            diverging_factor=self.diverging_factor,
        )
        present = [(n, v) for n, v in zip(names, norms, strict=True) if v is not None]
        d.nonfinite_layers = [n for n, v in present if not math.isfinite(v)]
        d.small_layers = [
            n
            for n, v in present
            if math.isfinite(v) and v < self.vanishing_norm and v < self.vanishing_ratio * total
        ]
        if endpoints is not None:
            d.first_layer, d.last_layer = names[endpoints[0]], names[endpoints[1]]
            first, last = norms[endpoints[0]], norms[endpoints[1]]
            if (
                first is not None
                and last is not None
                and math.isfinite(first)
                and math.isfinite(last)
                and last > 0
            ):
                d.depth_ratio = first / last
        d.nonfinite = bool(d.nonfinite_layers) or not math.isfinite(total)  # a fact of this step
        if not values:
            return d
        n = len(RULES) * _RULE_FIELDS
        rows = [values[i * _RULE_FIELDS : (i + 1) * _RULE_FIELDS] for i in range(len(RULES))]
        s = values[n : n + _SCALARS]
        for kind, row in zip(RULES, rows, strict=True):
            setattr(d, kind, row[_FLAG] > 0)
            d.episodes[kind] = int(row[_EPISODES])
            for target, col in ((d.first_flagged, _FIRST), (d.last_cleared, _UNTIL)):
                if (at := _step(row[col])) is not None:
                    target[kind] = at
            if (at := _step(row[_SINCE])) is not None:
                d.since[kind] = at
            if row[_EPISODES] > 0:
                d.onset_value[kind] = row[_AT_VALUE]
                d.onset_reference[kind] = row[_AT_REF]
        d.median = _opt(s[_MEDIAN])
        d.norm_level = _opt(s[_LEVEL]) if s[_ADMITTED] >= self._min_history else None
        d.nonfinite_steps = int(s[_NONFINITE_STEPS])
        d.first_nonfinite_step = _step(s[_FIRST_NONFINITE])
        d.last_nonfinite_step = _step(s[_LAST_NONFINITE])
        if s[_LOSS_STEPS] > 0:
            d.loss = s[_LOSS]
            d.loss_level = _opt(s[_LOSS_LEVEL])
            d.loss_scale = _opt(s[_LOSS_SCALE])
            d.loss_falling = s[_FALLING_NOW] > 0
        return d

    def update(
        self, total: float, norms: Sequence[float | None], names: Sequence[str], loss: float | None = None
    ) -> Diagnosis:
        """Observe one step given as Python floats and read its diagnosis (for loops that read every step).

        Args:
            total: the total gradient norm.
            norms: per-layer norms in forward order (``None``: no gradient).
            names: the layer names.
            loss: the step's training loss, if any.
        """
        present = [v is not None for v in norms]
        endpoints = pick_endpoints(None, present)
        dtype = self.scalars.dtype if self.scalars is not None else torch.float64
        device = self.scalars.device if self.scalars is not None else torch.device("cpu")
        per_layer = torch.tensor([0.0 if v is None else v for v in norms], dtype=dtype, device=device)
        step = self._calls
        self.observe(torch.tensor(total, dtype=dtype, device=device), per_layer, present, endpoints, step)
        if loss is not None:
            self.observe_loss(torch.tensor(loss, dtype=dtype, device=device), step)
        return self.diagnosis(self.readout().tolist(), total, norms, names, endpoints, step)

    # -- state -------------------------------------------------------------------------------------

    @property
    def history(self) -> list[float]:
        """The accepted total norms in the window, oldest first (a host copy: for tests and checkpoints)."""
        if self.ring is None or self.scalars is None:
            return []
        admitted = int(self.scalars[_ADMITTED].item())
        ring = self.ring.tolist()
        if admitted <= self._window:
            return ring[:admitted]
        start = admitted % self._window
        return ring[start:] + ring[:start]

    def state_dict(self) -> dict[str, Any]:
        """The state as plain numbers and CPU tensors (``history``: the window's norms, oldest first)."""
        state: dict[str, Any] = {"history": self.history, "calls": self._calls}
        if self.rules is not None and self.scalars is not None:
            state["rules"] = self.rules.detach().cpu().clone()
            state["scalars"] = self.scalars.detach().cpu().clone()
        state["loss"] = self.loss_detector.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a missing or older state starts the missing parts afresh."""
        device = self.scalars.device if self.scalars is not None else torch.device("cpu")
        self.rules = self.scalars = self.ring = None
        self._present = None
        self._calls = int(state.get("calls", 0))
        self.loss_detector.load_state_dict(state.get("loss", {}))
        saved_rules, saved_scalars = state.get("rules"), state.get("scalars")
        if saved_rules is None and saved_scalars is None and not state.get("history"):
            return  # nothing observed yet: the tensors are made at the first step, as in a fresh start
        rules, scalars, ring = self._ensure(device)
        if isinstance(saved_rules, Tensor) and saved_rules.shape == rules.shape:
            rules.copy_(saved_rules)
        if isinstance(saved_scalars, Tensor) and saved_scalars.shape == scalars.shape:
            scalars.copy_(saved_scalars)
        history = [float(v) for v in state.get("history", [])][-self._window :]
        admitted = max(int(scalars[_ADMITTED].item()), len(history))
        scalars[_ADMITTED] = float(admitted)
        for k, v in enumerate(history):  # the oldest value sits where the next one will be written
            ring[(admitted - len(history) + k) % self._window] = v
        if history:
            scalars[_MEDIAN] = torch.nanmedian(ring)
            if admitted >= self._min_history and math.isnan(float(scalars[_LEVEL])):
                scalars[_LEVEL] = scalars[_MEDIAN]
