"""Re-initialise a model during a fit: the :class:`InitSwap` callback, and the init functions in one place.

Layer 2 is :class:`InitSwap`, which applies :func:`init_swap` at the start of a fit, or once when the
gradients of the first steps are diagnosed as vanishing by
:class:`~stability_callbacks.monitor.GradientDiagnostician`.

Layer 1 lives beside it and is re-exported here for a plain loop: :func:`init_swap` and its report in
:mod:`stability_callbacks.model_init`; the schemes and tensor initialisers in
:mod:`stability_callbacks.init_schemes`; the rules per layer type in :mod:`stability_callbacks.layer_init`;
LSUV in :mod:`stability_callbacks.lsuv`; which activation follows each layer in
:mod:`stability_callbacks.activation_graph`.

Example, from a plain PyTorch loop::

    report = init_swap(model)                                 # activation-aware, data-free
    report = init_swap(model, "lsuv", sample_input=x_batch)   # data-driven
    print(report)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks._checks import check_bool, check_choice, check_int, check_number
from stability_callbacks._trainer import (
    ForwardOrder,
    StabilityCallback,
    log_scalars,
    refuse_sharded,
    tensorboard_writer,
)
from stability_callbacks.activation_graph import following_activations, registration_activations
from stability_callbacks.diagnosis import pick_endpoints
from stability_callbacks.forward_recorder import ForwardRecorder, eager_compiled
from stability_callbacks.init_report import InitRecord, InitReport
from stability_callbacks.init_schemes import NORMAL_STD, SCHEMES, Activation, activation_gain, init_tensor_
from stability_callbacks.lsuv import LSUVPass, LSUVResult, lsuv_
from stability_callbacks.model_init import (
    broadcast_module_,
    check_overrides,
    check_overrides_match,
    finish_lsuv,
    init_swap,
    lsuv_pass,
)
from stability_callbacks.monitor import GradientDiagnostician, OptimizerLayers, measure_gradients

__all__ = [
    "NORMAL_STD",
    "SCHEMES",
    "Activation",
    "InitRecord",
    "InitReport",
    "InitSwap",
    "LSUVPass",
    "LSUVResult",
    "activation_gain",
    "broadcast_module_",
    "check_overrides_match",
    "finish_lsuv",
    "following_activations",
    "init_swap",
    "init_tensor_",
    "lsuv_",
    "lsuv_pass",
]

# -- the callback -----------------------------------------------------------------------------------

_WHEN = ("fit_start", "on_vanishing")


def _concat(parts: list[Any]) -> Any:
    """Join the model inputs of several batches along dim 0 (tensors, and tuples/dicts of them)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple):
        return tuple(_concat(list(items)) for items in zip(*parts, strict=True))
    if isinstance(first, Mapping):
        return {k: _concat([p[k] for p in parts]) for k in first}
    return first


def _data_parallel_group(trainer: pl.Trainer) -> dist.ProcessGroup | None:
    """The process group over which ``ModelParallelStrategy`` splits each batch, so that LSUV measures the
    global batch; ``None`` elsewhere (under DDP rank zero's measurement is broadcast)."""
    strategy = getattr(trainer, "strategy", None)
    mesh = getattr(strategy, "device_mesh", None) if isinstance(strategy, ModelParallelStrategy) else None
    if mesh is None or "data_parallel" not in (mesh.mesh_dim_names or ()):
        return None
    data_parallel = mesh["data_parallel"]
    return data_parallel.get_group() if data_parallel.size() > 1 else None


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


class InitSwap(StabilityCallback):
    """Re-initialises the model for the activations it uses, at the start of a fit or once gradients vanish.

    What it needs to know about the model, it learns without guessing how to call it: which activation
    follows each layer comes from a ``torch.fx`` trace where the model traces, else from the first real
    training step (module hooks and a ``TorchFunctionMode`` from ``on_train_batch_start`` to
    ``on_before_backward``, :class:`~stability_callbacks.forward_recorder.ForwardRecorder`), so models
    whose ``forward`` takes several arguments, or that have no ``forward`` at all, work as they are.
    LSUV measures its layers inside a training step too (:class:`LSUVPass`): each layer is rescaled as
    the step's forward pass reaches it, and the step goes on with the corrected outputs, so its
    gradients are those of the re-initialised model. With ``get_input`` you name the model's input
    yourself: then the structure and LSUV's batch come from ``lsuv_batches`` batches of the train
    dataloader, before the first step. ``torch.compile``'d code runs eagerly while it is watched.

    With ``when="fit_start"`` the model is re-initialised once: in ``on_train_start`` (after the sanity
    check) where the model traces with ``torch.fx`` or ``get_input`` is given, else at the end of the
    first training step, whose gradients are then dropped (the step changes nothing; Adam's moments
    start after it). In place, so the optimizer keeps its parameters. Under ``"auto"`` it keeps what
    the model initialised on purpose (``keep_custom``; see :func:`init_swap`): a transformers or timm
    model, which initialises itself, is left as it is, so are torchvision's He fan-out convolutions,
    and only layers still at PyTorch's default change (measured by ``benchmarks/initswap_models.py``).
    Where nothing changed, the first step is not dropped. A fit that resumes from a checkpoint
    (``ckpt_path``) is never touched, and the callback remembers in its state that it has acted.

    With ``when="on_vanishing"`` it watches the first ``watch_steps`` optimizer steps: per-layer
    gradient norms, measured as :class:`~stability_callbacks.monitor.GradientMonitor` measures them
    (:func:`~stability_callbacks.monitor.measure_gradients`, layers in forward order), go to
    :class:`~stability_callbacks.monitor.GradientDiagnostician`, and when the gradients have been
    vanishing for ``patience`` consecutive steps the model is re-initialised once (every layer: the
    model's own scheme is what failed), the optimizer state is cleared (moments, step counts; the param
    groups and learning rates stay), the gradients of that step are dropped, and a message says so.
    The watch window copies the norms to the host once per step (one sync a step, for ``watch_steps``
    steps at most, and one all-reduce of the decision under DDP); after it, the callback costs nothing.

    Where it cannot tell (no layer ran in the watched step, a hook failed) it says so once, names what
    it skipped, and carries on. Under DDP every rank initialises and rank zero's parameters and buffers
    are then broadcast, so all ranks hold identical weights. Under ``ModelParallelStrategy`` (FSDP2,
    tensor parallel) the sharded parameters are initialised as the full model would be: each rank draws
    the full tensor of one parameter at a time and keeps its shard of rank zero's draw (orthogonal
    matrices included; the extra memory is one full parameter), the report's statistics are those of
    the full tensors, and LSUV sums its output statistics over the data-parallel group, so every rank
    applies the same scales and writes the same report. FSDP1 and DeepSpeed, whose parameters are flat
    shards, are refused at setup with :class:`~stability_callbacks._trainer.UnsupportedStrategyError`.
    The report (per parameter: old std, scheme and why, new std) is printed on rank zero and written to
    TensorBoard as text under ``init/report``.

    Args:
        scheme: one of :data:`SCHEMES` (see :func:`init_swap`).
        when: ``"fit_start"`` or ``"on_vanishing"``.
        overrides: ``{fnmatch pattern: scheme or "keep"}`` on parameter/module names; a pattern that
            matches nothing raises ``ValueError`` at setup.
        keep_custom: with ``"auto"``, keep the layers the model initialised itself; ``None`` (default)
            keeps them at fit start and re-initialises everything once gradients vanish.
        lsuv_batches: train batches joined into the LSUV batch (with ``get_input``).
        patience: consecutive vanishing steps before acting (``"on_vanishing"``).
        watch_steps: optimizer steps watched from the start (``"on_vanishing"``).
        vanishing_ratio, vanishing_norm: the vanishing rule of the diagnostician.
        lsuv_tol, lsuv_max_iters, lsuv_center: see :func:`lsuv_`.
        get_input: ``batch -> model input`` (``model(x)``; a tuple is unpacked, a mapping passed as
            keywords): measure on train batches before the first step instead of during it.
        verbose: say on rank zero what was changed and why (a warning when re-initialising mid-run,
            then the report); ``False`` leaves that to the ``init/report`` text and ``init/reinit``.

    Logged keys:

    ==================  ===================================================================
    key                 meaning
    ==================  ===================================================================
    ``init/reinit``     1.0 at the step the model was re-initialised (logged only then, and only
                        when some value changed)
    ``init/report``     TensorBoard text: the table of :class:`InitReport`
    ==================  ===================================================================
    """

    def __init__(
        self,
        scheme: str = "auto",
        when: str = "fit_start",
        overrides: Mapping[str, str] | None = None,
        keep_custom: bool | None = None,
        lsuv_batches: int = 1,
        patience: int = 3,
        watch_steps: int = 50,
        vanishing_ratio: float = 1e-3,
        vanishing_norm: float = 1e-8,
        lsuv_tol: float = 0.1,
        lsuv_max_iters: int = 10,
        lsuv_center: bool = True,
        get_input: Callable[[Any], Any] | None = None,
        verbose: bool = True,
    ) -> None:
        check_choice("scheme", scheme, SCHEMES)
        check_choice("when", when, _WHEN)
        self.overrides = check_overrides(overrides)
        if keep_custom is not None:
            check_bool("keep_custom", keep_custom)
        check_int("lsuv_batches", lsuv_batches)
        check_int("patience", patience)
        check_int("watch_steps", watch_steps)
        check_int("lsuv_max_iters", lsuv_max_iters)
        check_number("lsuv_tol", lsuv_tol, 0.0, low_open=True)
        check_bool("lsuv_center", lsuv_center)
        check_bool("verbose", verbose)
        if get_input is not None and not callable(get_input):
            raise ValueError(f"`get_input` must be callable or None, got {get_input!r}")
        self.scheme = scheme
        self.when = when
        self.keep_custom = keep_custom
        self.lsuv_batches = lsuv_batches
        self.patience = patience
        self.watch_steps = watch_steps
        self.lsuv_tol = lsuv_tol
        self.lsuv_max_iters = lsuv_max_iters
        self.lsuv_center = lsuv_center
        self.get_input = get_input
        self.verbose = verbose
        self.diagnostician = GradientDiagnostician(
            vanishing_ratio=vanishing_ratio, vanishing_norm=vanishing_norm, patience=patience
        )
        self.applied = False
        self.reinit_step = -1
        self.last_report: InitReport | None = None
        self._order = ForwardOrder()
        self._layers = OptimizerLayers()
        self._reset_run()

    def _reset_run(self) -> None:
        self._acts: tuple[dict[str, Activation | None], str] | None = None  # the structure, once known
        self._recorder: ForwardRecorder | None = None  # watching a training step for the structure
        self._step_end = False  # re-initialise at the end of the recorded step (fit start)
        self._lsuv: LSUVPass | None = None  # LSUV measuring during the next training step
        self._lsuv_report: InitReport | None = None
        self._lsuv_why = ""
        self._lsuv_ran = False
        # the watched step's layer names, norms and endpoints, kept for the report if it acts
        self._watched: tuple[list[str], Tensor, Tensor, list[bool], tuple[int, int] | None, int] | None = None
        self._eager: ExitStack | None = None
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.scheme, when=self.when)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_recorder=None, _lsuv=None, _eager=None, _lsuv_report=None)
        return state

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"InitSwap: {message}", category=UserWarning)

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(
            trainer,
            "InitSwap",
            why="it cannot re-initialise flat parameter shards",
            instead="Use ModelParallelStrategy (FSDP2, tensor parallel), whose DTensor parameters it "
            "initialises as the full model, or initialise the model before wrapping it, e.g. with "
            "init_swap(model).",
            dtensor_ok=True,
        )
        check_overrides_match(pl_module, self.overrides)
        self._order.reset()
        self._layers.clear()
        self._end_forward()
        self._reset_run()

    # -- what the model looks like ----------------------------------------------------------------

    def _sample_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any | None:
        """``get_input`` of the first ``lsuv_batches`` train batches, on the module's device."""
        assert self.get_input is not None  # only called with it
        loader = _first_loader(trainer.train_dataloader)
        datamodule = getattr(trainer, "datamodule", None)
        if loader is None and datamodule is not None:
            loader = _first_loader(datamodule.train_dataloader())
        if loader is None:
            return None
        parts = []
        for batch in loader:
            parts.append(self.get_input(batch))
            if len(parts) == self.lsuv_batches:
                break
        if not parts:
            return None
        return move_data_to_device(_concat(parts), pl_module.device)

    def _wants_lsuv(self) -> bool:
        return self.scheme == "lsuv" or "lsuv" in self.overrides.values()

    def _learnt(self, pl_module: nn.Module) -> tuple[dict[str, Activation | None], str]:
        """The structure: traced, or seen in the recorded step, or (saying so once) registration order."""
        if self._acts is not None:
            return self._acts
        rec = self._recorder
        if rec is not None and rec.error is None and any(kind == "layer" for kind, _ in rec.events):
            self._acts = (rec.following(), "training step")
            return self._acts
        why = (
            f"a hook failed ({rec.error})"
            if rec is not None and rec.error
            else "no layer ran under its hooks in the first training step"
            if rec is not None
            else "no training step was watched"
        )
        self._warn_once(
            "structure",
            f"could not see which activation follows each layer of {type(pl_module).__name__} ({why}); "
            "it takes them from the order in which the modules are registered.",
        )
        self._acts = (registration_activations(pl_module), "registration")
        return self._acts

    # -- acting -----------------------------------------------------------------------------------

    def _apply(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        why: str,
        activations: tuple[Mapping[str, Activation | None], str],
        sample: Any | None = None,
    ) -> InitReport:
        keep = self.keep_custom if self.keep_custom is not None else self.when == "fit_start"
        report = init_swap(
            pl_module,
            self.scheme,
            sample_input=sample,
            overrides=self.overrides,
            activations=activations,
            keep_custom=keep,
            defer_lsuv=sample is None,
            lsuv_tol=self.lsuv_tol,
            lsuv_max_iters=self.lsuv_max_iters,
            lsuv_center=self.lsuv_center,
            lsuv_group=_data_parallel_group(trainer),
        )
        broadcast_module_(pl_module)
        self.applied = True
        self.reinit_step = trainer.global_step
        if report.modified:
            log_scalars(trainer, {"init/reinit": 1.0})
        if report.lsuv_pending:
            self._lsuv = lsuv_pass(
                pl_module,
                report,
                self.lsuv_tol,
                self.lsuv_max_iters,
                self.lsuv_center,
                group=_data_parallel_group(trainer),
            )
            self._lsuv_report, self._lsuv_why, self._lsuv_ran = report, why, False
        else:
            self._publish(trainer, report, why)
        return report

    def _publish(self, trainer: pl.Trainer, report: InitReport, why: str) -> None:
        self.last_report = report
        if self.verbose:
            rank_zero_info(f"InitSwap: {why}\n{report.table()}")
        writer = tensorboard_writer(trainer)
        if writer is not None:
            writer.add_text("init/report", report.markdown(), global_step=trainer.global_step)

    def _finish_lsuv(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lsuv is None or self._lsuv_report is None:
            return
        lsuv, self._lsuv = self._lsuv, None
        results = lsuv.stop()
        if lsuv.error is not None:
            self._warn_once("lsuv", f"LSUV left a layer as it was, its hook failed ({lsuv.error}).")
        report = finish_lsuv(pl_module, self._lsuv_report, results)
        self._lsuv_report = None
        broadcast_module_(pl_module)
        self._publish(
            trainer, report, self._lsuv_why + " LSUV measured its layers in the next training step."
        )

    @staticmethod
    def _drop_step(trainer: pl.Trainer, pl_module: nn.Module) -> None:
        """Clear the optimizer state and this step's gradients: the step changes nothing."""
        for opt in trainer.optimizers:
            opt.state.clear()
        for p in pl_module.parameters():
            p.grad = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied:
            return
        if self.when == "fit_start" and trainer.ckpt_path is not None:
            self.applied = True
            if self.verbose:
                rank_zero_info(
                    "InitSwap: the fit resumes from a checkpoint; the weights are left as they are."
                )
            return
        traced, method = following_activations(pl_module)
        if method == "fx":
            self._acts = (traced, "fx")
        if self.when != "fit_start":
            return
        self.applied = True
        why = "re-initialised the model before the first step."
        if self.get_input is not None and (self._acts is None or self._wants_lsuv()):
            try:
                sample = self._sample_input(trainer, pl_module)
                acts = self._acts or following_activations(pl_module, sample)
            except Exception as error:  # the model does not run on get_input(batch): learn from a step
                self._warn_once(
                    "get_input",
                    f"the model did not run on `get_input(batch)` ({type(error).__name__}: {error}); it "
                    "learns from the first training step instead.",
                )
            else:
                self._apply(trainer, pl_module, why, acts, sample)
                return
        if self._acts is not None:
            self._apply(trainer, pl_module, why, self._acts)
        else:
            self._step_end = True  # learn from the first training step, act at its end

    # -- around the forward pass ------------------------------------------------------------------

    def _watching(self, trainer: pl.Trainer) -> bool:
        return self.when == "on_vanishing" and not self.applied and trainer.global_step < self.watch_steps

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._watching(trainer):
            self._order.start(pl_module)
        wants_structure = self._step_end or (self._watching(trainer) and self.get_input is None)
        if wants_structure and self._acts is None and self._recorder is None:
            self._recorder = ForwardRecorder().start(pl_module)
        if self._lsuv is not None and not self._lsuv_ran and self._eager is None:
            self._lsuv_ran = True  # the first micro-batch of the step measures
            self._eager = ExitStack()
            self._eager.enter_context(eager_compiled())
            self._lsuv.start()

    def _end_forward(self) -> None:
        """The forward pass is over: remove the recording hooks and LSUV's (the results stay)."""
        if self._recorder is not None:
            self._recorder.stop()
        if self._lsuv is not None:
            self._lsuv.remove()
        if self._eager is not None:
            self._eager.close()
            self._eager = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._end_forward()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_forward()

    # -- the optimizer step -----------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        vanishing = self.watch(trainer, pl_module, optimizer)
        if vanishing is not None and trainer.strategy.reduce(vanishing, reduce_op="sum").item() > 0:
            self.reinitialise(trainer, pl_module)  # the watch window's one host read a step is above

    def watch(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> Tensor | None:
        """The step of ``on_before_optimizer_step`` up to its decision, public so that a composing callback
        can read the decision together with its own flags.

        Completes a pending LSUV or first-step initialisation; while ``when="on_vanishing"`` watches,
        observes this step's gradient norms on the device and returns the vanishing flag (a 0-d float
        tensor, 1.0 once gradients vanished for ``patience`` steps; no host sync). Returns ``None`` when
        there is nothing to decide. When the flag is set on any rank, call :meth:`reinitialise`.
        """
        self._order.stop()
        self._end_forward()
        self._watched = None
        if self._lsuv is not None and self._lsuv_ran:
            self._finish_lsuv(trainer, pl_module)
            return None
        if self._step_end:
            self._step_end = False
            report = self._apply(
                trainer,
                pl_module,
                "re-initialised the model after its first training step, which showed the activations "
                "(that step's gradients were dropped).",
                self._learnt(pl_module),
            )
            if report.modified:
                self._drop_step(trainer, pl_module)
            return None
        if not self._watching(trainer):
            return None
        index = self._layers.index(pl_module, optimizer, self._order.order)
        grads = [p.grad for p in index.params]
        if not grads or all(g is None for g in grads):
            return None
        total, per_layer, has_grad = measure_gradients(index, grads)
        endpoints = pick_endpoints(None, has_grad)
        step = self.diagnostician.steps_observed
        self.diagnostician.observe(total, per_layer, has_grad, endpoints, step)
        self._watched = (index.layer_names, total, per_layer, has_grad, endpoints, step)
        return self.diagnostician.flag("vanishing").float()

    def reinitialise(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-initialise the model after :meth:`watch` found gradients vanishing, clear the optimizer
        state and drop this step's gradients (every rank calls it at the same step)."""
        ratio = "n/a"
        if self._watched is not None:  # the step's diagnosis, read once now that it acts
            names, total, per_layer, has_grad, endpoints, step = self._watched
            host = torch.cat([total.reshape(1), per_layer]).tolist()
            norms = [v if has_grad[i] else None for i, v in enumerate(host[1:])]
            diagnosis = self.diagnostician.diagnosis(
                self.diagnostician.readout().tolist(), host[0], norms, names, endpoints, step
            )
            ratio = "n/a" if diagnosis.depth_ratio is None else f"{diagnosis.depth_ratio:.3g}"
        what = (
            f"gradients vanished for {self.patience} consecutive steps (depth ratio {ratio} at step "
            f"{trainer.global_step}); re-initialised the model with scheme {self.scheme!r}, cleared the "
            "optimizer state and dropped this step's gradients."
        )
        if self.verbose:
            rank_zero_warn(f"InitSwap: {what}", category=UserWarning)
        sample = None
        if self.get_input is not None:
            sample = self._sample_input(trainer, pl_module)
        acts = self._acts or (
            following_activations(pl_module, sample) if sample is not None else self._learnt(pl_module)
        )
        self._apply(trainer, pl_module, what, acts, sample)
        self._drop_step(trainer, pl_module)

    # -- lifecycle and state ----------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._order.stop()
        self._end_forward()
        if self._lsuv is not None:  # the fit ended before LSUV's step: its layers keep the orthogonal start
            self._lsuv_ran = True
            self._finish_lsuv(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._end_forward()
        self._recorder, self._lsuv, self._lsuv_report = None, None, None
        super().teardown(trainer, pl_module, stage)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._order.stop()
        self._end_forward()
        super().on_exception(trainer, pl_module, exception)

    def state_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "reinit_step": self.reinit_step,
            "diagnostician": self.diagnostician.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
        self.reinit_step = int(state_dict.get("reinit_step", -1))
        self.diagnostician.load_state_dict(state_dict.get("diagnostician", {}))
