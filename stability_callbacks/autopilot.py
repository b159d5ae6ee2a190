"""StabilityAutopilot: detect, remedy and recover from unstable training in one callback.

The autopilot composes the library's own remedies and adds the one thing none of them does: recovery.

- at the start, re-initialise once if gradients vanish (:class:`~stability_callbacks.init.InitSwap`,
  ``when="on_vanishing"``);
- always clip exploding gradients adaptively (:class:`~stability_callbacks.clipping.ZClip` by default,
  :class:`~stability_callbacks.clipping.AutoClip` or :class:`~stability_callbacks.clipping.AGC`);
- skip optimizer steps with non-finite gradients (:class:`~stability_callbacks.guard.NonFiniteGuard`);
- and, when a loss spike or a burst of skipped steps gets through, roll back to an in-memory snapshot of
  the model and optimizer, lower the learning rate for a while, skip the batches that caused it, and
  carry on; after ``max_rollbacks`` rollbacks it stops with :class:`RollbackLimitError`.

Its layer-1 parts, usable from a plain PyTorch loop, live in their own modules and are re-exported here:
:class:`~stability_callbacks.spikes.LossSpikeDetector` (running loss statistics on the device) and
:class:`~stability_callbacks.snapshots.SnapshotRing` (in-memory snapshots of model and optimizer state).
The autopilot drives its children only through their public per-step calls
(:meth:`NonFiniteGuard.guard`, :meth:`ClippingCallback.clip`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from stability_callbacks._checks import check_bool, check_int, check_number
from stability_callbacks._trainer import (
    StabilityCallback,
    check_one_clipper,
    is_logging_step,
    log_every,
    log_scalars,
    optimizer_grads,
    refuse_sharded,
    tensorboard_writer,
)
from stability_callbacks.clipping import AGC, AutoClip, ClippingCallback, ZClip
from stability_callbacks.guard import NonFiniteGuard
from stability_callbacks.init import InitSwap
from stability_callbacks.snapshots import Snapshot, SnapshotRing
from stability_callbacks.spikes import LossSpikeDetector
from stability_callbacks.stats import total_norm

__all__ = ["LossSpikeDetector", "RollbackLimitError", "Snapshot", "SnapshotRing", "StabilityAutopilot"]

_CLIPPERS = ("zclip", "autoclip", "agc")


class RollbackLimitError(RuntimeError):
    """Raised by :class:`StabilityAutopilot` when training needs more than ``max_rollbacks`` rollbacks."""


class StabilityAutopilot(StabilityCallback):
    """Detects, remedies and recovers from unstable training; explains every action it takes.

    It changes gradients (it clips and skips), so a :class:`~stability_callbacks.GradientMonitor` goes
    before it in ``Trainer(callbacks=[...])``.

    It owns and drives these callbacks (do not add them to the trainer as well):

    - ``reinit``: :class:`~stability_callbacks.init.InitSwap` with ``when="on_vanishing"`` (watches the
      first ``reinit_watch_steps`` steps, one host read a step while watching);
    - ``guard``: :class:`~stability_callbacks.guard.NonFiniteGuard` with ``action="skip"`` (one host read a
      step);
    - ``clipper``: ``"zclip"`` (:class:`~stability_callbacks.clipping.ZClip`), ``"autoclip"``, ``"agc"``, a
      clipping callback instance, or ``None``.

    With ``rollback=True`` the training loss of every optimizer step (``outputs["loss"]`` of
    ``training_step``; the mean over micro-batches under gradient accumulation) goes to a
    :class:`LossSpikeDetector` (one host read a step, the flag agreed across ranks), and a
    :class:`SnapshotRing` keeps model and optimizer state every ``snapshot_every_n_steps`` steps. On a
    loss spike, or after ``max_consecutive_skips`` skipped steps in a row, the autopilot

    1. restores the newest snapshot taken before the trouble (weights, optimizer state, loss statistics;
       the trainer's step counter and the data stream go on),
    2. multiplies every optimizer's learning rate by ``lr_factor`` for ``cooldown_steps`` optimizer
       steps (compounded if trouble comes again during a cooldown). The factor is applied around each
       ``optimizer.step()`` only, so learning-rate schedulers (and ``LearningRateMonitor``) see the
       unscaled rates and schedules go on unchanged; ``autopilot/lr_scale`` shows the factor,
    3. remembers the ``(epoch, batch_idx)`` of the batches that triggered it: if one comes again (a
       resumed run replaying them), its optimizer step is skipped,
    4. raises :class:`RollbackLimitError` instead of rolling back more than ``max_rollbacks`` times.

    Every action is explained once on rank zero (a warning) and added to the TensorBoard text
    ``autopilot/timeline``. Counters, the cooldown, the learning-rate factor, the remembered batches and
    the loss statistics are in the callback state; snapshots only with ``checkpoint_snapshots=True``.
    Automatic optimization only.

    Args:
        clipper: ``"zclip"``, ``"autoclip"``, ``"agc"``, a clipping callback, or ``None``.
        reinit: re-initialise once if gradients vanish in the first steps.
        reinit_scheme: the :class:`~stability_callbacks.init.InitSwap` scheme.
        reinit_watch_steps: optimizer steps watched for vanishing gradients.
        guard: skip optimizer steps with non-finite gradients.
        rollback: watch the loss and roll back on trouble.
        snapshot_every_n_steps, max_snapshots, snapshot_device: see :class:`SnapshotRing`.
        spike_mode, spike_threshold, spike_warmup, spike_atol: see :class:`LossSpikeDetector`
            (``mode``, ``threshold``, ``warmup``, ``atol``); set ``spike_atol`` when the loss can come
            close to zero.
        max_consecutive_skips: skipped steps in a row that trigger a rollback.
        lr_factor: learning-rate factor after a rollback, in (0, 1].
        cooldown_steps: optimizer steps the factor holds (>= 0).
        max_rollbacks: rollbacks allowed before :class:`RollbackLimitError` (>= 0).
        checkpoint_snapshots: write the snapshots into checkpoints too.
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
        verbose: warn on rank zero for each action.

    Logged every ``log_every_n_steps`` optimizer steps and at every action (no extra host read):

    =======================  ==============================================================
    key                      value
    =======================  ==============================================================
    ``autopilot/rollback``   rollbacks so far
    ``autopilot/skipped``    optimizer steps skipped so far (non-finite, or a known-bad batch)
    ``autopilot/lr_scale``   learning-rate factor now in force (1.0 outside a cooldown)
    ``autopilot/reinit``     1.0 once the model was re-initialised
    ``autopilot/timeline``   TensorBoard text: every action, its step and why
    =======================  ==============================================================

    The children log their own keys too (``clip/*``, ``guard/*``, ``init/*``).
    """

    modifies_gradients = True
    clips_gradients = True  # per instance: False with clipper=None

    def __init__(
        self,
        clipper: str | StabilityCallback | None = "zclip",
        reinit: bool = True,
        reinit_scheme: str = "auto",
        reinit_watch_steps: int = 50,
        guard: bool = True,
        rollback: bool = True,
        snapshot_every_n_steps: int = 100,
        max_snapshots: int = 2,
        snapshot_device: str = "host",
        spike_mode: str = "zscore",
        spike_threshold: float | None = None,
        spike_warmup: int = 20,
        spike_atol: float = 0.0,
        max_consecutive_skips: int = 3,
        lr_factor: float = 0.5,
        cooldown_steps: int = 100,
        max_rollbacks: int = 3,
        checkpoint_snapshots: bool = False,
        log_every_n_steps: int | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(clipper, str):
            if clipper not in _CLIPPERS:
                raise ValueError(f"`clipper` must be one of {_CLIPPERS}, a callback or None, got {clipper!r}")
        elif clipper is not None and not (
            isinstance(clipper, StabilityCallback) and clipper.modifies_gradients
        ):
            raise ValueError(
                f"`clipper` must be one of {_CLIPPERS}, a clipping callback or None, got {clipper!r}"
            )
        for name, flag in (
            ("reinit", reinit),
            ("guard", guard),
            ("rollback", rollback),
            ("checkpoint_snapshots", checkpoint_snapshots),
            ("verbose", verbose),
        ):
            check_bool(name, flag)
        check_int("max_consecutive_skips", max_consecutive_skips)
        check_int("cooldown_steps", cooldown_steps, 0)
        check_int("max_rollbacks", max_rollbacks, 0)
        check_number("lr_factor", lr_factor, 0, 1, low_open=True)
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.ring = SnapshotRing(snapshot_every_n_steps, max_snapshots, snapshot_device)
        self.detector = LossSpikeDetector(spike_mode, spike_threshold, warmup=spike_warmup, atol=spike_atol)
        self.clipper_name = clipper if isinstance(clipper, str) or clipper is None else type(clipper).__name__
        self.children: dict[str, StabilityCallback] = {}
        if reinit:
            self.children["reinit"] = InitSwap(
                scheme=reinit_scheme, when="on_vanishing", watch_steps=reinit_watch_steps, verbose=verbose
            )
        if guard:
            self.children["guard"] = NonFiniteGuard(
                action="skip", max_consecutive=None, log_every_n_steps=None
            )
        if clipper is not None:
            self.children["clipper"] = (
                {"zclip": ZClip, "autoclip": AutoClip, "agc": AGC}[clipper]()
                if isinstance(clipper, str)
                else clipper
            )
        self.clips_gradients = "clipper" in self.children
        self.rollback = rollback
        self.max_consecutive_skips = max_consecutive_skips
        self.lr_factor = float(lr_factor)
        self.cooldown_steps = cooldown_steps
        self.max_rollbacks = max_rollbacks
        self.checkpoint_snapshots = checkpoint_snapshots
        self.log_every_n_steps = log_every_n_steps
        self.verbose = verbose
        # state
        self.rollbacks = 0
        self.bad_batch_skips = 0  # steps skipped because a known-bad batch came again
        self.lr_scale = 1.0
        self.cooldown_until = -1  # the factor holds while global_step < cooldown_until
        self.bad_batches: set[tuple[int, int]] = set()
        self.events: list[str] = []
        self.reinit_done = False
        self.last_rollback_step = -1
        # per-run
        self._trainer: pl.Trainer | None = None
        self._hooks: list[Any] = []
        self._saved_lrs: dict[int, list[float]] = {}
        self._step_depth: dict[int, int] = {}
        self._window_open = False
        self._window_batches: list[int] = []
        self._window_loss: Tensor | None = None  # summed over the micro-batches of a step
        self._stepped = False
        self._skip_window = False
        self._trouble_batches: list[tuple[int, int]] = []
        self._trouble_start = -1
        self._force_snapshot = True
        self._warned_no_loss = False
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
        state["_trainer"] = None
        state["_hooks"] = []
        return state

    # -- properties users read ------------------------------------------------------------------------

    @property
    def skipped(self) -> int:
        """Optimizer steps skipped so far (non-finite gradients or a known-bad batch)."""
        guard = self.children.get("guard")
        return self.bad_batch_skips + (
            guard.skipped + guard.scaler_skipped if isinstance(guard, NonFiniteGuard) else 0
        )

    @property
    def cooldown_remaining(self) -> int:
        """Optimizer steps the learning-rate factor still holds."""
        return max(0, self.cooldown_until - self._global_step) if self.lr_scale != 1.0 else 0

    # -- forwarding -----------------------------------------------------------------------------------

    def _forward(self, hook: str, *args: Any) -> None:
        for child in self.children.values():
            getattr(child, hook)(*args)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.rollback:
            refuse_sharded(
                trainer,
                type(self).__name__,
                "its rollback snapshots do not hold DTensor shards yet",
                "Use StabilityAutopilot(rollback=False, reinit=False): the guard and the clipper work there.",
            )
        if stage == "fit":
            check_one_clipper(trainer, self)
        self._forward("setup", trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_fit_start", trainer, pl_module)
        if self.rollback and not pl_module.automatic_optimization:
            raise ValueError("StabilityAutopilot(rollback=True) needs automatic optimization")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_start", trainer, pl_module)
        self._trainer = trainer
        self._remove_hooks()
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._pre_step))
            self._hooks.append(opt.register_step_post_hook(self._post_step))
        self._window_open = False
        self._force_snapshot = self._force_snapshot or not len(self.ring)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_end", trainer, pl_module)
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._forward("on_exception", trainer, pl_module, exception)
        self._remove_hooks()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._forward("teardown", trainer, pl_module, stage)
        self._remove_hooks()
        self._trainer = None
        super().teardown(trainer, pl_module, stage)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._forward("on_save_checkpoint", trainer, pl_module, checkpoint)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._step_depth.clear()
        self._saved_lrs.clear()

    # -- learning-rate factor around optimizer.step() -------------------------------------------------

    def _scale_now(self) -> float:
        if self.lr_scale == 1.0 or self._trainer is None:
            return 1.0
        if self._trainer.global_step >= self.cooldown_until:
            return 1.0
        return self.lr_scale

    def _pre_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # an optimizer subclass whose step() calls super().step() runs the hooks once per level: only the
        # outermost call scales and restores
        depth = self._step_depth.get(id(optimizer), 0)
        self._step_depth[id(optimizer)] = depth + 1
        scale = self._scale_now()
        if depth == 0 and scale != 1.0:
            self._saved_lrs[id(optimizer)] = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * scale

    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        depth = self._step_depth.get(id(optimizer), 1) - 1
        self._step_depth[id(optimizer)] = depth
        if depth > 0:
            return
        saved = self._saved_lrs.pop(id(optimizer), None)
        if saved is not None:
            for g, lr in zip(optimizer.param_groups, saved, strict=True):
                g["lr"] = lr

    # -- the step -------------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._global_step = trainer.global_step
        if self.lr_scale != 1.0 and trainer.global_step >= self.cooldown_until:
            self.lr_scale = 1.0
            self._explain(
                trainer, f"step {trainer.global_step}: cooldown over, learning rates back to their schedule."
            )
        if not self._window_open:  # first micro-batch of an optimizer step
            self._window_open = True
            self._window_batches = []
            self._window_loss = None
            self._skip_window = False
            if self.rollback and (self._force_snapshot or self.ring.due(trainer.global_step)):
                self.ring.take(
                    trainer.global_step,
                    pl_module,
                    trainer.optimizers,
                    {"detector": self.detector.state_dict()},
                )
                self._force_snapshot = False
        self._window_batches.append(batch_idx)
        if (trainer.current_epoch, batch_idx) in self.bad_batches:
            self._skip_window = True
        self._forward("on_train_batch_start", trainer, pl_module, batch, batch_idx)

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
                    f"step {trainer.global_step}: skipped the optimizer step of batch(es) "
                    f"{self._window_batches} of epoch {trainer.current_epoch}, which caused an earlier "
                    "rollback.",
                )
        self._step_children(trainer, pl_module, optimizer)
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
            self._log(trainer)

    def _step_children(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """The children's step: the guard and a library clipper share one gathering of the gradients and
        one total norm; any other child gets the hook as it is."""
        guard, clipper = self.children.get("guard"), self.children.get("clipper")
        shared = [c for c in (guard, clipper) if isinstance(c, (NonFiniteGuard, ClippingCallback))]
        for child in self.children.values():  # in order: re-initialisation, guard, clipper
            if child is (shared[0] if shared else None):
                self._shared_step(trainer, pl_module, optimizer, guard, clipper)
            elif child not in shared:
                child.on_before_optimizer_step(trainer, pl_module, optimizer)

    @staticmethod
    def _shared_step(
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
        guard: StabilityCallback | None,
        clipper: StabilityCallback | None,
    ) -> None:
        params, grads = optimizer_grads(optimizer)
        if not grads:
            return
        norm = None
        if isinstance(guard, NonFiniteGuard):
            norm = total_norm(grads)
            if guard.guard(trainer, pl_module, params, norm).skipped:
                return  # the gradients were dropped: nothing to clip
        if isinstance(clipper, ClippingCallback):
            clipper.clip(trainer, pl_module, params, grads, norm)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._forward("on_before_backward", trainer, pl_module, loss)  # the forward pass is over

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._forward("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx)
        self._global_step = trainer.global_step
        if self.rollback:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, Tensor):
                value = loss.detach().reshape(()).float()
                self._window_loss = value if self._window_loss is None else self._window_loss + value
            elif not self._warned_no_loss:
                self._warned_no_loss = True
                rank_zero_warn(
                    "StabilityAutopilot: training_step returned no loss; the loss-spike check is off."
                )
        if not self._stepped:
            return
        # an optimizer step has just ended (trainer.global_step counts it already)
        self._stepped = False
        self._window_open = False
        step = trainer.global_step - 1
        window = [(trainer.current_epoch, b) for b in self._window_batches]
        if not self.rollback:
            return
        spike = False
        if self._window_loss is not None and not self._skip_window:  # a skipped known-bad batch is not judged
            flag = self.detector.observe(self._window_loss / len(self._window_batches)).float()
            spike = bool(trainer.strategy.reduce(flag, reduce_op="sum").item() > 0)  # every rank's
        guard = self.children.get("guard")
        consecutive = guard.consecutive if isinstance(guard, NonFiniteGuard) else 0
        if consecutive:
            if consecutive == 1:
                self._trouble_batches = []
                self._trouble_start = step
            self._trouble_batches += window
        if spike:
            why = f"the training loss spiked at step {step} (batches {self._window_batches})"
            self._roll_back(trainer, pl_module, step, window, why)
        elif consecutive >= self.max_consecutive_skips:
            why = (
                f"{consecutive} optimizer steps in a row had non-finite gradients (steps "
                f"{self._trouble_start}-{step})"
            )
            self._roll_back(trainer, pl_module, self._trouble_start, self._trouble_batches, why)

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
        snap = self.ring.newest_before(trouble_step)
        if snap is None:
            snap = self.ring.newest_before(None)
        if snap is None:
            raise RollbackLimitError(f"StabilityAutopilot: {why}, and there is no snapshot to roll back to.")
        self.ring.restore(pl_module, trainer.optimizers, snapshot=snap)
        self.detector.load_state_dict(snap.extra.get("detector", {}))
        self.ring.drop_after(snap.step)
        for p in pl_module.parameters():
            p.grad = None
        self.rollbacks += 1
        self.last_rollback_step = trainer.global_step
        in_cooldown = self.lr_scale != 1.0 and trainer.global_step < self.cooldown_until
        self.lr_scale = (self.lr_scale if in_cooldown else 1.0) * self.lr_factor
        self.cooldown_until = trainer.global_step + self.cooldown_steps
        if self.cooldown_steps == 0:
            self.lr_scale = 1.0
        self.bad_batches.update(batches)
        guard = self.children.get("guard")
        if isinstance(guard, NonFiniteGuard):
            guard.reset_consecutive()
        self._trouble_batches = []
        epochs = sorted({e for e, _ in batches})
        self._explain(
            trainer,
            f"step {trainer.global_step}: {why}; rolled back to the snapshot taken before step {snap.step}, "
            f"learning rate x{self.lr_scale:g} for the next {self.cooldown_steps} steps, and these batches "
            f"(epoch {epochs}: {[b for _, b in batches]}) will be skipped if they come again "
            f"(rollback {self.rollbacks} of at most {self.max_rollbacks}).",
        )
        self._log(trainer)

    # -- logging --------------------------------------------------------------------------------------

    def _explain(self, trainer: pl.Trainer, message: str) -> None:
        self.events.append(message)
        if self.verbose:
            rank_zero_warn(f"StabilityAutopilot: {message}", category=UserWarning)
        writer = tensorboard_writer(trainer)
        if writer is not None:
            timeline = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(self.events))
            writer.add_text("autopilot/timeline", timeline, global_step=trainer.global_step)

    def _log(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:
            return
        log_scalars(
            trainer,
            {
                "autopilot/rollback": float(self.rollbacks),
                "autopilot/skipped": float(self.skipped),
                "autopilot/lr_scale": self._scale_now(),
                "autopilot/reinit": float(self.reinit_done),
            },
        )

    # -- state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "rollbacks": self.rollbacks,
            "bad_batch_skips": self.bad_batch_skips,
            "lr_scale": self.lr_scale,
            "cooldown_until": self.cooldown_until,
            "bad_batches": sorted([e, b] for e, b in self.bad_batches),
            "events": list(self.events),
            "reinit_done": self.reinit_done,
            "last_rollback_step": self.last_rollback_step,
            "detector": self.detector.state_dict(),
            "children": {name: child.state_dict() for name, child in self.children.items()},
        }
        if self.checkpoint_snapshots:
            state["snapshots"] = self.ring.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.bad_batch_skips = int(state_dict.get("bad_batch_skips", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.cooldown_until = int(state_dict.get("cooldown_until", -1))
        self.bad_batches = {(int(e), int(b)) for e, b in state_dict.get("bad_batches", [])}
        self.events = [str(e) for e in state_dict.get("events", [])]
        self.reinit_done = bool(state_dict.get("reinit_done", False))
        self.last_rollback_step = int(state_dict.get("last_rollback_step", -1))
        self.detector.load_state_dict(state_dict.get("detector", {}))
        children = state_dict.get("children", {})
        for name, child in self.children.items():
            child.load_state_dict(children.get(name, {}))
        if self.checkpoint_snapshots and "snapshots" in state_dict:
            self.ring.load_state_dict(state_dict["snapshots"])
        self._force_snapshot = not len(self.ring)
