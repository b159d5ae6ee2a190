"""StabilityAutopilot: detect, remedy and recover from unstable training in one callback.

It escalates, cheapest remedy first: skip an outlier step before its update
(:mod:`~stability_callbacks.skip_step`; non-finite ones through
:class:`~stability_callbacks.guard.NonFiniteGuard`), clip every step adaptively (``ZClip``, or AdaGC per
tensor), reset Adam's moments when skips persist (SPAM), and roll back to an in-memory snapshot
(:class:`~stability_callbacks.snapshots.SnapshotRing`) with a learning-rate cooldown
(:class:`~stability_callbacks.cooldown.LearningRateCooldown`) when damage has reached the weights; which
rung acts is :class:`~stability_callbacks.escalation.EscalationLadder`'s call. Children are driven
through their public per-step calls only (:meth:`NonFiniteGuard.guard`, :meth:`ClippingCallback.clip`,
:attr:`UpdateMonitor.last_result`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.optim import Optimizer

from stability_callbacks._checks import check_bool, check_int, check_number
from stability_callbacks._trainer import (
    StabilityCallback,
    UnsupportedStrategyError,
    check_one_clipper,
    is_logging_step,
    log_every,
    log_scalars,
    optimizer_grads,
    refuse_sharded,
)
from stability_callbacks.adagc import AdaGC
from stability_callbacks.clipping import AGC, AutoClip, ClippingCallback, ZClip
from stability_callbacks.composite import CompositeCallback
from stability_callbacks.cooldown import LearningRateCooldown
from stability_callbacks.escalation import EscalationLadder
from stability_callbacks.guard import NonFiniteGuard
from stability_callbacks.init import InitSwap
from stability_callbacks.moment_reset import has_adam_moments, reset_adam_moments_
from stability_callbacks.skip_step import OutlierStepTest, SkipDecision, StepUndo
from stability_callbacks.snapshots import Snapshot, SnapshotRing
from stability_callbacks.spikes import LossSpikeDetector
from stability_callbacks.stats import total_norm
from stability_callbacks.step_flags import StepFlags, read_step_flags
from stability_callbacks.update_monitor import UpdateMonitor

__all__ = ["LossSpikeDetector", "RollbackLimitError", "Snapshot", "SnapshotRing", "StabilityAutopilot"]

_CLIPPERS = {"zclip": ZClip, "autoclip": AutoClip, "agc": AGC, "adagc": AdaGC}


class RollbackLimitError(RuntimeError):
    """Raised by :class:`StabilityAutopilot` when training needs more than ``max_rollbacks`` rollbacks."""


class StabilityAutopilot(CompositeCallback):
    """Detects, remedies and recovers from unstable training; explains every action it takes.

    It changes gradients (it clips and skips), so a :class:`~stability_callbacks.GradientMonitor` goes
    before it in ``Trainer(callbacks=[...])``. It owns these callbacks (do not add them as well):
    ``reinit`` (:class:`~stability_callbacks.init.InitSwap`, ``when="on_vanishing"``, watching the first
    ``reinit_watch_steps`` steps), ``guard`` (:class:`~stability_callbacks.guard.NonFiniteGuard`),
    ``clipper`` (``"zclip"``, ``"autoclip"``, ``"agc"``, ``"adagc"``, a clipping callback, or ``None``)
    and, with ``watch_updates=True``, ``updates``
    (:class:`~stability_callbacks.update_monitor.UpdateMonitor`). Their verdicts are read to the host
    together, once a step, before the optimizer step
    (:func:`~stability_callbacks.step_flags.read_step_flags`; not at all without ``guard``, ``reinit``
    and ``rollback``).

    **Skip** (``skip_outliers``): before each optimizer step the step's loss (the sum of the
    micro-batch losses given to ``backward``, averaged over ranks) and its total gradient norm are
    judged by an :class:`~stability_callbacks.skip_step.OutlierStepTest` (median and MAD of the log
    values of the last ``skip_window`` accepted steps; ``skip_threshold`` robust standard deviations),
    and a :class:`~stability_callbacks.skip_step.StepUndo` makes an outlier step leave weights and
    optimizer state exactly as they were. No host read: the decision stays a device tensor. Costs a copy
    of the parameters and their optimizer state each step (memory and one pass).

    **Rollback** (``rollback=True``): a :class:`SnapshotRing` keeps model and optimizer state every
    ``snapshot_every_n_steps`` steps, recent ones dense and older ones sparse, within ``max_snapshots``
    and ``snapshot_budget_bytes``. The step's flags, read before it (agreed across ranks), drive the
    ladder after it: ``reset_moments_after`` skipped steps in a row reset Adam's moments; a loss spike
    on an accepted step (:class:`LossSpikeDetector`) or ``max_consecutive_skips`` skipped steps in a row
    restore the newest snapshot taken before the trouble (weights, optimizer state, statistics; the
    step counter and the data stream go on), multiply the learning rate by ``lr_factor`` for
    ``cooldown_steps`` steps (around ``optimizer.step()`` only: schedulers see the unscaled rates), and
    remember the ``(epoch, batch_idx)`` of the batches involved, whose steps are skipped if they come
    again. A sustained jump of the update-to-weight ratio (``watch_updates``: above ``update_factor``
    times its running median three sampled steps in a row, read with the next step's flags) is an early
    warning: it resets the moments and starts a cooldown, compounded with one in force, so a learning
    rate that drifts upwards is pulled back each time the ratio runs away again. Under
    ``ModelParallelStrategy`` (FSDP2, tensor parallel) snapshots hold each rank's shards and restore
    them exactly. Without ``rollback`` only the skip and the clipper act, and
    skips are reported on logging steps.

    Every action is explained once on rank zero (a warning) and added to the TensorBoard text
    ``autopilot/timeline``. Counters, the cooldown, the remembered batches and the statistics are in the
    callback state; snapshots only with ``checkpoint_snapshots=True``. Automatic optimization only.

    Args:
        clipper: ``"zclip"``, ``"autoclip"``, ``"agc"``, ``"adagc"``, a clipping callback, or ``None``.
        reinit, reinit_scheme, reinit_watch_steps: re-initialise once if gradients vanish in the first
            ``reinit_watch_steps`` steps, with this :class:`~stability_callbacks.init.InitSwap` scheme.
        guard: skip optimizer steps with non-finite gradients.
        skip_outliers: skip outlier steps before the update.
        skip_threshold, skip_window, skip_warmup: see :class:`~stability_callbacks.skip_step.OutlierStepTest`
            (``threshold``, ``window``, ``warmup``).
        rollback: watch the loss and roll back on trouble.
        snapshot_every_n_steps, max_snapshots, snapshot_device: see :class:`SnapshotRing`.
        snapshot_budget_bytes: most bytes the snapshots may hold (``None``: ``max_snapshots`` only).
        spike_mode, spike_threshold, spike_warmup, spike_atol: see :class:`LossSpikeDetector`.
        max_consecutive_skips: skipped steps in a row that trigger a rollback (a shorter burst of bad
            batches is skipped and nothing more).
        reset_moments_after: skipped steps in a row that reset Adam's moments (``None``: never).
        watch_updates: watch the update-to-weight ratio and act on a sustained jump.
        update_factor: how many times its running median the ratio must exceed, three sampled steps in a
            row, to be a jump (> 1; :class:`~stability_callbacks.update_monitor.UpdateMonitor`'s ``factor``).
        lr_factor: learning-rate factor after a rollback, in (0, 1].
        cooldown_steps: optimizer steps the factor holds (>= 0).
        max_rollbacks: rollbacks allowed before :class:`RollbackLimitError` (>= 0).
        checkpoint_snapshots: write the snapshots into checkpoints too (not under sharding).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
        verbose: warn on rank zero for each action.

    Logged every ``log_every_n_steps`` optimizer steps and at every action (one host transfer):

    ============================  ==============================================================
    key                           value
    ============================  ==============================================================
    ``autopilot/rollback``        rollbacks so far
    ``autopilot/skipped``         optimizer steps skipped so far (outliers, non-finite, known-bad)
    ``autopilot/outliers``        outlier steps skipped so far (the skip rung)
    ``autopilot/moment_resets``   resets of Adam's moments so far
    ``autopilot/lr_scale``        learning-rate factor now in force (1.0 outside a cooldown)
    ``autopilot/reinit``          1.0 once the model was re-initialised
    ``autopilot/snapshot_bytes``  bytes held by the snapshots (0 without ``rollback``)
    ``autopilot/snapshots``       snapshots held
    ``autopilot/timeline``        TensorBoard text: every action, its step, its rung and why
    ============================  ==============================================================

    The children log their own keys too (``clip/*``, ``guard/*``, ``init/*``, ``update/*``).
    """

    modifies_gradients = True
    clips_gradients = True  # per instance: False with clipper=None
    timeline_tag = "autopilot/timeline"

    def __init__(
        self,
        clipper: str | StabilityCallback | None = "zclip",
        reinit: bool = True,
        reinit_scheme: str = "auto",
        reinit_watch_steps: int = 50,
        guard: bool = True,
        skip_outliers: bool = True,
        skip_threshold: float = 6.0,
        skip_window: int = 64,
        skip_warmup: int = 16,
        rollback: bool = True,
        snapshot_every_n_steps: int = 10,
        max_snapshots: int = 8,
        snapshot_device: str = "host",
        snapshot_budget_bytes: int | None = None,
        spike_mode: str = "zscore",
        spike_threshold: float | None = None,
        spike_warmup: int = 20,
        spike_atol: float = 0.0,
        max_consecutive_skips: int = 8,
        reset_moments_after: int | None = 4,
        watch_updates: bool = False,
        update_factor: float = 1.5,
        lr_factor: float = 0.5,
        cooldown_steps: int = 100,
        max_rollbacks: int = 3,
        checkpoint_snapshots: bool = False,
        log_every_n_steps: int | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(verbose)
        known = (
            clipper in _CLIPPERS
            if isinstance(clipper, str)
            else clipper is None or (isinstance(clipper, StabilityCallback) and clipper.modifies_gradients)
        )
        if not known:
            raise ValueError(
                f"`clipper` must be one of {tuple(_CLIPPERS)}, a clipping callback or None, got {clipper!r}"
            )
        flags = dict(reinit=reinit, guard=guard, skip_outliers=skip_outliers, rollback=rollback)
        flags.update(watch_updates=watch_updates, checkpoint_snapshots=checkpoint_snapshots, verbose=verbose)
        for name, flag in flags.items():
            check_bool(name, flag)
        check_int("cooldown_steps", cooldown_steps, 0)
        check_int("max_rollbacks", max_rollbacks, 0)
        check_number("lr_factor", lr_factor, 0, 1, low_open=True)
        check_number("update_factor", update_factor, 1, low_open=True)
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.ring = SnapshotRing(
            snapshot_every_n_steps, max_snapshots, snapshot_device, snapshot_budget_bytes
        )
        self.detector = LossSpikeDetector(spike_mode, spike_threshold, warmup=spike_warmup, atol=spike_atol)
        self.skip_test = OutlierStepTest(skip_window, skip_threshold, min(skip_warmup, skip_window))
        self.undo = StepUndo()
        self.cooldown = LearningRateCooldown()
        self.clipper_name = clipper if isinstance(clipper, str) or clipper is None else type(clipper).__name__
        if reinit:
            self.children["reinit"] = InitSwap(
                scheme=reinit_scheme, when="on_vanishing", watch_steps=reinit_watch_steps, verbose=verbose
            )
        if guard:
            self.children["guard"] = NonFiniteGuard(
                action="skip", max_consecutive=None, log_every_n_steps=None
            )
        if clipper is not None:
            self.children["clipper"] = _CLIPPERS[clipper]() if isinstance(clipper, str) else clipper
        if watch_updates:
            self.children["updates"] = UpdateMonitor(
                log_every_n_steps=log_every_n_steps, per_layer=False, factor=update_factor
            )
        self.clips_gradients = "clipper" in self.children
        self.skip_outliers = skip_outliers
        self.rollback = rollback
        self.ladder = EscalationLadder(max_consecutive_skips, reset_moments_after)
        self.lr_factor = float(lr_factor)
        self.cooldown_steps = cooldown_steps
        self.max_rollbacks = max_rollbacks
        self.checkpoint_snapshots = checkpoint_snapshots
        self.log_every_n_steps = log_every_n_steps
        # state
        self.rollbacks = 0
        self.bad_batch_skips = 0  # steps skipped because a known-bad batch came again
        self.moment_resets = 0
        self.outlier_count = torch.zeros((), dtype=torch.float64)  # outlier steps skipped (device)
        self.bad_batches: set[tuple[int, int]] = set()
        self.reinit_done = False
        self.last_rollback_step = -1
        # per-run
        self._window_open = False
        self._window_batches: list[int] = []
        self._step_loss: Tensor | None = None  # the losses given to backward, summed
        self._flags: StepFlags | None = None  # the step's flags, read before it, acted on after it
        self._jump_step = -1  # the last measured step whose update-ratio jump was read
        self._guard_skipped = False
        self._stepped = False
        self._skip_window = False
        self._force_snapshot = True
        self._reported_outliers = 0.0
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
        state.update(undo=StepUndo())
        return state

    # -- properties users read ------------------------------------------------------------------------

    @property
    def outlier_skips(self) -> int:
        """Outlier steps skipped so far (reads the device counter)."""
        return int(self.outlier_count.item())

    @property
    def skipped(self) -> int:
        """Optimizer steps skipped so far (outliers, non-finite gradients, known-bad batches)."""
        guard = self.children.get("guard")
        by_guard = guard.skipped + guard.scaler_skipped if isinstance(guard, NonFiniteGuard) else 0
        return self.bad_batch_skips + by_guard + self.outlier_skips

    @property
    def lr_scale(self) -> float:
        """The learning-rate factor of the current (or last) cooldown."""
        return self.cooldown.scale

    @property
    def cooldown_until(self) -> int:
        """The factor holds while ``trainer.global_step`` is below this."""
        return self.cooldown.until

    @property
    def cooldown_remaining(self) -> int:
        """Optimizer steps the learning-rate factor still holds."""
        return self.cooldown.remaining(self._global_step)

    # -- forwarding -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and (self.rollback or self.skip_outliers):
            refuse_sharded(
                trainer,
                type(self).__name__,
                "its snapshots and skipped steps need DTensor shards, and each rank here holds a flat shard",
                "Use ModelParallelStrategy (FSDP2, tensor parallel), or StabilityAutopilot(rollback=False, "
                "skip_outliers=False, reinit=False).",
                dtensor_ok=True,
            )
            if self.checkpoint_snapshots and isinstance(
                getattr(trainer, "strategy", None), ModelParallelStrategy
            ):
                raise UnsupportedStrategyError(
                    "StabilityAutopilot(checkpoint_snapshots=True) does not support ModelParallelStrategy: "
                    "each rank's snapshots hold its own shards. Leave checkpoint_snapshots=False."
                )
        if stage == "fit":
            check_one_clipper(trainer, self)
        self._forward("setup", trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.rollback or self.skip_outliers) and not pl_module.automatic_optimization:
            raise ValueError(
                "StabilityAutopilot(rollback=True or skip_outliers=True) needs automatic optimization"
            )
        # a private copy: under ddp_spawn the callback's tensors arrive in shared memory, one for all ranks
        self.outlier_count = self.outlier_count.detach().clone()
        # attached before the children's hooks, so a skipped step is undone before anyone measures it
        self.cooldown.attach(trainer.optimizers, lambda: self._global_step, self._after_step)
        self._forward("on_fit_start", trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_start", trainer, pl_module)
        self._window_open = False
        self._force_snapshot = self._force_snapshot or not len(self.ring)

    def _release(self) -> None:
        self.cooldown.detach()
        self.undo.release()

    def _after_step(self, optimizer: Optimizer) -> None:
        self.undo.after_step()  # a no-op unless a decision is pending

    # -- the step -------------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._global_step = step = trainer.global_step
        if self.cooldown.end_if_over(step):
            self._explain(trainer, f"step {step}: cooldown over, learning rates back to their schedule.")
        if not self._window_open:  # first micro-batch of an optimizer step
            self._window_open = True
            self._window_batches = []
            self._step_loss = None
            self._skip_window = False
            due = self._force_snapshot or self.ring.due(step)
            if self.rollback and due and self.ladder.consecutive == 0:  # no snapshot of a run in trouble
                extra = {"detector": self.detector.state_dict(), "skip_test": self.skip_test.state_dict()}
                self.ring.take(step, pl_module, trainer.optimizers, extra)
                self._force_snapshot = False
                if self.ring.over_budget and not any("snapshot_budget_bytes" in e for e in self.events):
                    size = f"{self.ring.nbytes} bytes exceeds snapshot_budget_bytes={self.ring.budget_bytes}"
                    self._explain(trainer, f"step {step}: one snapshot of {size}; only the newest is kept.")
        self._window_batches.append(batch_idx)
        if (trainer.current_epoch, batch_idx) in self.bad_batches:
            self._skip_window = True
        self._forward("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)  # the forward pass is over
        value = loss.detach().reshape(()).float()  # already divided by the accumulation steps
        self._step_loss = value if self._step_loss is None else self._step_loss + value

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
                    f"step {trainer.global_step}: [skip] skipped the optimizer step of batch(es) "
                    f"{self._window_batches} of epoch {trainer.current_epoch}, which caused an earlier "
                    "rollback.",
                )
        self._flags = self._step_children(trainer, pl_module, optimizer)
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
        if (
            trainer.loggers
            and is_logging_step(trainer, log_every(trainer, self.log_every_n_steps))
            and optimizer is trainer.optimizers[-1]
        ):
            self._log(trainer, report=True)

    def _step_children(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> StepFlags | None:
        """The children's step around the step's one host read.

        The re-initialisation watch, the guard's non-finite check, the outlier test and the loss-spike
        detector leave their verdicts on the device; :func:`read_step_flags` reads them together (agreed
        across ranks). Then the re-initialisation or the guard acts, a library clipper clips with the
        same total norm (taken before clipping), and an outlier step is set to be undone; any other
        child gets the hook as it is. Returns the flags, or ``None`` when there was nothing to judge.
        """
        reinit, guard, clipper = (self.children.get(k) for k in ("reinit", "guard", "clipper"))
        vanishing = reinit.watch(trainer, pl_module, optimizer) if isinstance(reinit, InitSwap) else None
        params, grads = optimizer_grads(optimizer)
        shared = [
            c for c in (reinit, guard, clipper) if isinstance(c, (InitSwap, NonFiniteGuard, ClippingCallback))
        ]
        self._guard_skipped = False
        flags: StepFlags | None = None
        decision: SkipDecision | None = None
        if grads:
            norm = total_norm(grads)
            loss = self._step_loss if self._step_loss is not None else norm.new_ones(())
            if self.skip_outliers or self.rollback:  # a collective only for the rungs that judge the loss
                loss = trainer.strategy.reduce(loss.to(norm.device), reduce_op="mean")  # every rank's loss
            decision = self.skip_test.judge(loss, norm) if self.skip_outliers else None
            outlier = decision.skip & ~decision.nonfinite if decision is not None else None
            spike = None
            if self.rollback and self._step_loss is not None and not self._skip_window:
                spike = self.detector.observe(loss)  # a skipped step is not judged
                spike = spike & ~outlier if outlier is not None else spike  # an outlier leaves no damage
            if isinstance(guard, NonFiniteGuard) or vanishing is not None or self.rollback:
                flags = read_step_flags(
                    trainer.strategy,
                    norm.device,
                    nonfinite=~torch.isfinite(norm),
                    vanishing=vanishing,
                    outlier=outlier,
                    spiked=spike,
                    jumped=self._new_jump(),
                    loss_score=decision.loss_score if decision is not None else None,
                    norm_score=decision.norm_score if decision is not None else None,
                )
            if isinstance(reinit, InitSwap) and flags is not None and flags.vanishing:
                reinit.reinitialise(trainer, pl_module)  # drops this step's gradients
                return flags
            if isinstance(guard, NonFiniteGuard) and flags is not None:
                self._guard_skipped = guard.act(trainer, pl_module, params, flags.nonfinite).skipped
            if isinstance(clipper, ClippingCallback) and not self._guard_skipped:
                clipper.clip(trainer, pl_module, params, grads, norm)
        for child in self.children.values():  # in order: re-initialisation, guard, clipper, updates
            if child not in shared:
                child.on_before_optimizer_step(trainer, pl_module, optimizer)
        if decision is not None and not self._guard_skipped:
            self.undo.before_step(optimizer, decision.skip)
            self.outlier_count = self.outlier_count.to(decision.skip.device)
            self.outlier_count.add_((decision.skip & ~decision.nonfinite).double())
        return flags

    def _new_jump(self) -> Tensor | None:
        """The update monitor's jump flag, once per measured step (it is measured after the step, so the
        ladder sees it with the next step's flags)."""
        updates = self.children.get("updates")
        result = updates.last_result if isinstance(updates, UpdateMonitor) else None
        if result is None or result.step <= self._jump_step:
            return None
        self._jump_step = result.step
        return result.jump

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._forward("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)
        self._global_step = trainer.global_step
        if not self._stepped:
            return
        # an optimizer step has just ended (trainer.global_step counts it already)
        self._stepped = False
        self._window_open = False
        flags, self._flags = self._flags, None
        if self.rollback and flags is not None:
            self._escalate(trainer, pl_module, flags)

    def _escalate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, flags: StepFlags) -> None:
        """The ladder after a step, from the flags read before it."""
        step = trainer.global_step - 1
        window = [(trainer.current_epoch, b) for b in self._window_batches]
        if flags.outlier:
            self._explain(
                trainer,
                f"step {trainer.global_step}: [skip] step {step} was an outlier (loss "
                f"{flags.loss_score:.1f}, gradient norm {flags.norm_score:.1f} robust standard deviations "
                "above the median of the recent steps): skipped before the update, weights and optimizer "
                "state untouched.",
            )
        skipped = flags.outlier or self._guard_skipped or (flags.nonfinite and self.skip_outliers)
        action = self.ladder.observe(step, window, skipped, flags.spiked, flags.jumped)
        if action is None:
            return
        if action.rung == "rollback":
            self._roll_back(trainer, pl_module, action.since, action.batches, action.why)
        elif action.rung == "moment_reset":
            self._reset_moments(trainer, action.why)
        else:
            reset = self._reset_moments(trainer, action.why, quiet=True)
            scale = self.cooldown.start(trainer.global_step, self.lr_factor, self.cooldown_steps)
            self._explain(
                trainer,
                f"step {trainer.global_step}: [early warning] {action.why}: "
                f"{'Adam moments reset, ' if reset else ''}learning rate x{scale:g} for the next "
                f"{self.cooldown_steps} steps.",
            )

    def _reset_moments(self, trainer: pl.Trainer, why: str, quiet: bool = False) -> bool:
        adam = [opt for opt in trainer.optimizers if has_adam_moments(opt)]
        for opt in adam:
            reset_adam_moments_(opt)
        if adam:
            self.moment_resets += 1
            if not quiet:
                self._explain(
                    trainer,
                    f"step {trainer.global_step}: [moment reset] {why}: Adam's moments were reset (SPAM), "
                    "so the gradients that led here stop steering the updates.",
                )
        return bool(adam)

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
        snap = self.ring.newest_before(trouble_step) or self.ring.newest_before(None)
        if snap is None:
            raise RollbackLimitError(f"StabilityAutopilot: {why}, and there is no snapshot to roll back to.")
        self.ring.restore(pl_module, trainer.optimizers, snapshot=snap)
        self.detector.load_state_dict(snap.extra.get("detector", {}))
        self.skip_test.load_state_dict(snap.extra.get("skip_test", {}))
        self.ring.drop_after(snap.step)
        for p in pl_module.parameters():
            p.grad = None
        self.rollbacks += 1
        self.last_rollback_step = trainer.global_step
        scale = self.cooldown.start(trainer.global_step, self.lr_factor, self.cooldown_steps)
        self.bad_batches.update(batches)
        guard = self.children.get("guard")
        if isinstance(guard, NonFiniteGuard):
            guard.reset_consecutive()
        self.ladder.reset()
        epochs = sorted({e for e, _ in batches})
        self._explain(
            trainer,
            f"step {trainer.global_step}: [rollback] {why}; rolled back to the snapshot taken before step "
            f"{snap.step}, learning rate x{scale:g} for the next {self.cooldown_steps} steps, and these "
            f"batches (epoch {epochs}: {[b for _, b in batches]}) will be skipped if they come again "
            f"(rollback {self.rollbacks} of at most {self.max_rollbacks}).",
        )
        self._log(trainer)

    # -- logging --------------------------------------------------------------------------------------

    def _log(self, trainer: pl.Trainer, report: bool = False) -> None:
        if not trainer.loggers:
            return
        guard = self.children.get("guard")
        by_guard = guard.skipped + guard.scaler_skipped if isinstance(guard, NonFiniteGuard) else 0
        values = log_scalars(
            trainer,
            {
                "autopilot/rollback": float(self.rollbacks),
                "autopilot/skipped": self.outlier_count + float(self.bad_batch_skips + by_guard),
                "autopilot/outliers": self.outlier_count,
                "autopilot/moment_resets": float(self.moment_resets),
                "autopilot/lr_scale": self.cooldown.factor_at(trainer.global_step),
                "autopilot/reinit": float(self.reinit_done),
                "autopilot/snapshot_bytes": float(self.ring.nbytes),
                "autopilot/snapshots": float(len(self.ring)),
            },
        )
        outliers = values.get("autopilot/outliers", self._reported_outliers)
        if report and not self.rollback and outliers > self._reported_outliers:  # rollback explains each one
            self._explain(
                trainer,
                f"step {trainer.global_step}: [skip] {outliers - self._reported_outliers:g} outlier "
                "step(s) skipped since the last report, before their updates.",
            )
        self._reported_outliers = outliers

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "rollbacks": self.rollbacks,
            "bad_batch_skips": self.bad_batch_skips,
            "moment_resets": self.moment_resets,
            "outlier_skips": self.outlier_count.detach().cpu().clone(),
            "ladder": self.ladder.state_dict(),
            **self.cooldown.state_dict(),
            "bad_batches": sorted([e, b] for e, b in self.bad_batches),
            "events": list(self.events),
            "reinit_done": self.reinit_done,
            "last_rollback_step": self.last_rollback_step,
            "detector": self.detector.state_dict(),
            "skip_test": self.skip_test.state_dict(),
            "children": self.children_state(),
        }
        if self.checkpoint_snapshots:
            state["snapshots"] = self.ring.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.bad_batch_skips = int(state_dict.get("bad_batch_skips", 0))
        self.moment_resets = int(state_dict.get("moment_resets", 0))
        self.outlier_count = torch.as_tensor(
            state_dict.get("outlier_skips", 0.0), dtype=torch.float64
        ).clone()
        self.ladder.load_state_dict(state_dict.get("ladder", {}))
        self.cooldown.load_state_dict(state_dict)
        self.bad_batches = {(int(e), int(b)) for e, b in state_dict.get("bad_batches", [])}
        self.events = [str(e) for e in state_dict.get("events", [])]
        self.reinit_done = bool(state_dict.get("reinit_done", False))
        self.last_rollback_step = int(state_dict.get("last_rollback_step", -1))
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self.skip_test.load_state_dict(state_dict.get("skip_test", {}))
        self.load_children_state(state_dict.get("children", {}))
        if self.checkpoint_snapshots and "snapshots" in state_dict:
            self.ring.load_state_dict(state_dict["snapshots"])
        self._force_snapshot = not len(self.ring)
