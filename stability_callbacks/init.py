"""Re-initialise a whole model for the activations it uses: ``init_swap``, its report, and ``InitSwap``.

Layer 1 is :func:`init_swap` (plain PyTorch): every trainable parameter of a model is re-initialised in
place, layer by layer, for the activation that follows it in the forward pass, and an
:class:`InitReport` says what changed and why. The schemes, the tensor initialisers and LSUV live in
:mod:`stability_callbacks.init_schemes`; which activation follows each layer is found by
:mod:`stability_callbacks.activation_graph`. Both are re-exported here.

Layer 2 is :class:`InitSwap`, which applies it at the start of a fit, or once when the gradients of
the first steps are diagnosed as vanishing by :class:`~stability_callbacks.monitor.GradientDiagnostician`.

Example, from a plain PyTorch loop::

    report = init_swap(model)                                 # activation-aware, data-free
    report = init_swap(model, "lsuv", sample_input=x_batch)   # data-driven
    print(report)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
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
from stability_callbacks.activation_graph import following_activations, fx_traceable
from stability_callbacks.init_report import InitRecord, InitReport
from stability_callbacks.init_schemes import (
    LSUV_TYPES,
    NORM_TYPES,
    NORMAL_STD,
    SCHEMES,
    Activation,
    LSUVResult,
    activation_gain,
    init_parameter_,
    init_tensor_,
    lsuv_,
    lsuv_layer_names,
)
from stability_callbacks.monitor import GradientDiagnostician, OptimizerLayers, measure_gradients

__all__ = [
    "NORMAL_STD",
    "SCHEMES",
    "Activation",
    "InitRecord",
    "InitReport",
    "InitSwap",
    "LSUVResult",
    "activation_gain",
    "broadcast_module_",
    "check_overrides_match",
    "following_activations",
    "init_swap",
    "init_tensor_",
    "lsuv_",
]

# -- the report -------------------------------------------------------------------------------------


def _check_overrides(overrides: Mapping[str, str] | None) -> dict[str, str]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"`overrides` must be a mapping of name pattern to scheme, got {overrides!r}")
    for pattern, scheme in overrides.items():
        if not isinstance(pattern, str):
            raise ValueError(f"`overrides` keys must be name patterns (str), got {pattern!r}")
        check_choice(f"overrides[{pattern!r}]", scheme, (*SCHEMES, "keep"))
    return dict(overrides)


# -- the model --------------------------------------------------------------------------------------


def _named_params(model: nn.Module) -> list[tuple[str, str, nn.Module, str, nn.Parameter]]:
    """(layer name, param name, module, local name, parameter) for every parameter, once each."""
    seen: set[int] = set()
    out = []
    for mod_name, m in model.named_modules():
        for local, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((mod_name, f"{mod_name}.{local}" if mod_name else local, m, local, p))
    return out


def check_overrides_match(model: nn.Module, overrides: Mapping[str, str] | None) -> None:
    """Raise ``ValueError`` if a pattern of ``overrides`` matches no parameter or module name of ``model``.

    Args:
        model: the model.
        overrides: ``{fnmatch pattern: scheme}``.
    """
    names: set[str] = set()
    for layer, param, *_ in _named_params(model):
        names.update((layer, param))
    for pattern in _check_overrides(overrides):
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"`overrides` pattern {pattern!r} matches no parameter or module of {type(model).__name__}"
            )


def _stds(tensors: Sequence[Tensor]) -> list[float]:
    if not tensors:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = [0.0] * len(tensors)
    for idx in by_device.values():
        values = torch.stack([tensors[i].detach().float().std(correction=0) for i in idx]).tolist()
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    return out


def init_swap(
    model: nn.Module,
    scheme: str = "auto",
    sample_input: Any | None = None,
    overrides: Mapping[str, str] | None = None,
    *,
    lsuv_tol: float = 0.1,
    lsuv_max_iters: int = 10,
    lsuv_center: bool = True,
    forget_bias: float = 1.0,
    generator: torch.Generator | None = None,
) -> InitReport:
    """Re-initialise every trainable parameter of ``model`` in place for the activations it uses.

    Parameters keep their identity (values are copied in under ``torch.no_grad``), so an optimizer
    holding them keeps working. Frozen parameters (``requires_grad=False``) and embeddings are kept
    unless an override names them. Normalisation layers get weight 1 and bias 0 (and fresh running
    statistics); biases 0; other 1-D parameters are kept (no fan-based scheme applies to them).
    Recurrent layers get Xavier input weights and orthogonal recurrent weights per gate block, zero
    biases and, for LSTMs, a total forget-gate bias of ``forget_bias``.

    Args:
        model: the model.
        scheme: one of :data:`SCHEMES`. ``"auto"`` picks per layer from the activation that follows it
            (He for the ReLU family, Xavier with tanh gain 5/3 for tanh, Xavier for sigmoid and none);
            an explicit scheme is applied with the gain of that activation; ``"lsuv"`` is the ``auto``
            treatment plus LSUV on the Linear/Conv layers.
        sample_input: a data batch, needed for ``"lsuv"`` and used to find activations where the model
            does not trace with ``torch.fx``.
        overrides: ``{fnmatch pattern: scheme or "keep"}`` matched against parameter and module names;
            the first matching pattern wins. A pattern that matches nothing is an error.
        lsuv_tol, lsuv_max_iters, lsuv_center: ``tol``, ``max_iters`` and ``center`` of :func:`lsuv_`.
        forget_bias: LSTM forget-gate bias.
        generator: random generator (the global one if ``None``).

    Returns:
        An :class:`InitReport`; ``print(report)`` shows the table.
    """
    check_choice("scheme", scheme, SCHEMES)
    check_number("forget_bias", forget_bias)
    overrides = _check_overrides(overrides)
    check_overrides_match(model, overrides)
    params = _named_params(model)

    def requested_for(layer: str, param: str) -> tuple[str, str]:
        for pattern, s in overrides.items():
            if fnmatchcase(param, pattern) or fnmatchcase(layer, pattern):
                return s, f"override {pattern!r}"
        return scheme, ""

    wants_lsuv = any(
        p.requires_grad and isinstance(m, LSUV_TYPES) and requested_for(layer, name)[0] == "lsuv"
        for layer, name, m, _, p in params
    )
    if wants_lsuv and sample_input is None:
        raise ValueError("scheme 'lsuv' needs `sample_input`, a data batch to measure the layers on")
    if scheme == "lsuv":
        lsuv_layer_names(model)  # a clear error before anything changes

    acts, traced_by = following_activations(model, sample_input)
    old = _stds([p for *_, p in params])
    plan: list[tuple[str, str]] = []
    lsuv_layers: list[str] = []
    reset_norms: list[nn.Module] = []
    for layer, name, m, local, p in params:
        requested, source = requested_for(layer, name)
        prefix = f"{source}: " if source else ""
        if not p.requires_grad:
            plan.append(("kept", "frozen"))
            continue
        if requested == "keep":
            plan.append(("kept", f"{prefix}keep"))
            continue
        chosen, why = init_parameter_(
            m,
            local,
            p,
            requested,
            acts.get(layer),
            named=bool(source),
            lsuv_center=lsuv_center,
            forget_bias=forget_bias,
            generator=generator,
        )
        plan.append((chosen, prefix + why))
        if chosen == "lsuv" and p.dim() >= 2:
            lsuv_layers.append(layer)
        if isinstance(m, NORM_TYPES) and m not in reset_norms:
            reset_norms.append(m)
    for m in reset_norms:
        reset = getattr(m, "reset_running_stats", None)
        if callable(reset):
            reset()
    lsuv_results: dict[str, LSUVResult] = {}
    if lsuv_layers:
        lsuv_results = lsuv_(
            model,
            sample_input,
            layers=lsuv_layers,
            tol=lsuv_tol,
            max_iters=lsuv_max_iters,
            center=lsuv_center,
            generator=generator,
        )
    new = _stds([p for *_, p in params])
    records = []
    for (layer, name, _, _, p), (chosen, why), o, n in zip(params, plan, old, new, strict=True):
        if chosen == "lsuv" and p.dim() >= 2 and layer in lsuv_results:
            r = lsuv_results[layer]
            if r.called:
                why += f" ({r.std_before:.3g} -> {r.std_after:.3g} in {r.tries} tries)"
            else:
                why = "LSUV: orthogonal only, the forward pass never reached this layer"
        records.append(InitRecord(name, layer, tuple(p.shape), chosen, why, o, n))
    return InitReport(tuple(records), scheme, traced_by, lsuv_results)


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks, in place.

    One broadcast per device and dtype (flattened); a no-op without an initialised process group.

    Args:
        module: the module (the same architecture on every rank).
        src: the global rank whose values win.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in [*module.parameters(), *module.buffers()]:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for tensors in groups.values():
            flat = torch._utils._flatten_dense_tensors([t.detach() for t in tensors])
            dist.broadcast(flat, src=src)
            for t, v in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors), strict=True):
                t.copy_(v)


# -- the callback -----------------------------------------------------------------------------------

_WHEN = ("fit_start", "on_vanishing")


def _default_input(batch: Any) -> Any:
    """The model input of a batch: a tensor as is, the first element of a tuple or list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(
        f"InitSwap cannot tell the model input in a batch of type {type(batch).__name__}; "
        "pass `get_input`, e.g. InitSwap(get_input=lambda batch: batch['image'])"
    )


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


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


class InitSwap(StabilityCallback):
    """Re-initialises the model for the activations it uses, at the start of a fit or once gradients vanish.

    With ``when="fit_start"`` the model is re-initialised once, in ``on_train_start`` (before the first
    optimizer step; after the sanity check), in place, so the optimizer keeps its parameters. A fit
    that resumes from a checkpoint (``ckpt_path``) is never touched, and the callback remembers in its
    state that it has acted.

    With ``when="on_vanishing"`` it watches the first ``watch_steps`` optimizer steps: per-layer
    gradient norms, measured as :class:`~stability_callbacks.monitor.GradientMonitor` measures them
    (:func:`~stability_callbacks.monitor.measure_gradients`, layers in forward order), go to
    :class:`~stability_callbacks.monitor.GradientDiagnostician`, and when the gradients have been
    vanishing for ``patience`` consecutive steps the model is re-initialised once, the optimizer state
    is cleared (moments, step counts; the param groups and learning rates stay), the gradients of that
    step are dropped (the step changes nothing), and a message says so. The watch window copies the
    norms to the host once per step (one sync a step, for ``watch_steps`` steps at most, and one
    all-reduce of the decision under DDP); after it, the callback costs nothing.

    ``"lsuv"`` (and models that ``torch.fx`` cannot trace) need data: ``lsuv_batches`` batches of the
    train dataloader, their model input picked by ``get_input``, moved to the module's device. Under
    DDP every rank initialises and rank zero's parameters and buffers are then broadcast, so all ranks
    hold identical weights. The report (per parameter: old std, scheme and why, new std) is printed
    on rank zero and written to TensorBoard as text under ``init/report``. Sharded strategies (FSDP,
    DeepSpeed, model parallel) are refused at setup with
    :class:`~stability_callbacks._trainer.UnsupportedStrategyError`.

    Args:
        scheme: one of :data:`SCHEMES` (see :func:`init_swap`).
        when: ``"fit_start"`` or ``"on_vanishing"``.
        overrides: ``{fnmatch pattern: scheme or "keep"}`` on parameter/module names; a pattern that
            matches nothing raises ``ValueError`` at setup.
        lsuv_batches: train batches joined into the LSUV batch.
        patience: consecutive vanishing steps before acting (``"on_vanishing"``).
        watch_steps: optimizer steps watched from the start (``"on_vanishing"``).
        vanishing_ratio, vanishing_norm: the vanishing rule of the diagnostician.
        lsuv_tol, lsuv_max_iters, lsuv_center: see :func:`lsuv_`.
        get_input: ``batch -> model input``; default: a tensor batch as is, else its first element.
        verbose: say on rank zero what was changed and why (a warning when re-initialising mid-run,
            then the report); ``False`` leaves that to the ``init/report`` text and ``init/reinit``.

    Logged keys:

    ==================  ===================================================================
    key                 meaning
    ==================  ===================================================================
    ``init/reinit``     1.0 at the step the model was re-initialised (logged only then)
    ``init/report``     TensorBoard text: the table of :class:`InitReport`
    ==================  ===================================================================
    """

    def __init__(
        self,
        scheme: str = "auto",
        when: str = "fit_start",
        overrides: Mapping[str, str] | None = None,
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
        self.overrides = _check_overrides(overrides)
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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.scheme, when=self.when)

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded(
            trainer,
            "InitSwap",
            why="it cannot re-initialise sharded parameters",
            instead="Initialise the model before wrapping it, e.g. with init_swap(model).",
        )
        check_overrides_match(pl_module, self.overrides)
        self._order.reset()
        self._layers.clear()

    # -- acting -----------------------------------------------------------------------------------

    def _needs_data(self, pl_module: nn.Module) -> bool:
        return self.scheme == "lsuv" or "lsuv" in self.overrides.values() or not fx_traceable(pl_module)

    def _sample_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any | None:
        loader = _first_loader(trainer.train_dataloader)
        datamodule = getattr(trainer, "datamodule", None)
        if loader is None and datamodule is not None:
            loader = _first_loader(datamodule.train_dataloader())
        if loader is None:
            return None
        get_input = self.get_input or _default_input
        parts = []
        for batch in loader:
            parts.append(get_input(batch))
            if len(parts) == self.lsuv_batches:
                break
        if not parts:
            return None
        return move_data_to_device(_concat(parts), pl_module.device)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, why: str) -> InitReport:
        sample = self._sample_input(trainer, pl_module) if self._needs_data(pl_module) else None
        report = init_swap(
            pl_module,
            self.scheme,
            sample_input=sample,
            overrides=self.overrides,
            lsuv_tol=self.lsuv_tol,
            lsuv_max_iters=self.lsuv_max_iters,
            lsuv_center=self.lsuv_center,
        )
        broadcast_module_(pl_module)
        self.applied = True
        self.reinit_step = trainer.global_step
        self.last_report = report
        if self.verbose:
            rank_zero_info(f"InitSwap: {why}\n{report.table()}")
        writer = tensorboard_writer(trainer)
        if writer is not None:
            writer.add_text("init/report", report.markdown(), global_step=trainer.global_step)
        log_scalars(trainer, {"init/reinit": 1.0})
        return report

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "fit_start" or self.applied:
            return
        self.applied = True
        if trainer.ckpt_path is not None:
            if self.verbose:
                rank_zero_info(
                    "InitSwap: the fit resumes from a checkpoint; the weights are left as they are."
                )
            return
        self._apply(trainer, pl_module, "re-initialised the model before the first step.")

    # -- watching for vanishing gradients -----------------------------------------------------------

    def _watching(self, trainer: pl.Trainer) -> bool:
        return self.when == "on_vanishing" and not self.applied and trainer.global_step < self.watch_steps

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._watching(trainer):
            self._order.start(pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._order.stop()
        if not self._watching(trainer):
            return
        index = self._layers.index(pl_module, optimizer, self._order.order)
        grads = [p.grad for p in index.params]
        if not grads or all(g is None for g in grads):
            return
        total, per_layer, has_grad = measure_gradients(index, grads)
        host = torch.cat([total.reshape(1), per_layer]).tolist()  # the watch window's one sync a step
        norms = [v if has_grad[i] else None for i, v in enumerate(host[1:])]
        diagnosis = self.diagnostician.update(host[0], norms, index.layer_names)
        if not trainer.strategy.reduce_boolean_decision(diagnosis.vanishing, all=False):
            return
        ratio = "n/a" if diagnosis.depth_ratio is None else f"{diagnosis.depth_ratio:.3g}"
        what = (
            f"gradients vanished for {self.patience} consecutive steps (depth ratio {ratio} at step "
            f"{trainer.global_step}); re-initialised the model with scheme {self.scheme!r}, cleared the "
            "optimizer state and dropped this step's gradients."
        )
        if self.verbose:
            rank_zero_warn(f"InitSwap: {what}", category=UserWarning)
        self._apply(trainer, pl_module, what)
        for opt in trainer.optimizers:
            opt.state.clear()
        for p in pl_module.parameters():
            p.grad = None

    # -- lifecycle and state ----------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._order.stop()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._order.stop()
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
