"""HistogramLogger: weight, gradient and activation histograms and the gradient-flow picture in TensorBoard.

The callback gathers the tensors of a logging step and hands them to the layer-1 functions, which it
re-exports so that ``from stability_callbacks.histograms import ...`` keeps working:

* :mod:`stability_callbacks.histogram_math`: device histograms and TensorBoard histogram records
  (:class:`Histogram`, :func:`histogram_stats`, :func:`to_histograms`, :func:`tensor_histograms`,
  :func:`write_histograms`, :func:`fetch_to_host`);
* :mod:`stability_callbacks.figures`: the gradient-flow picture (:func:`grad_flow_stats`,
  :func:`grad_flow_image`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from stability_callbacks._checks import check_bool, check_int
from stability_callbacks._trainer import (
    ForwardOrder,
    StabilityCallback,
    check_reads_before_modifiers,
    is_logging_step,
    optimizer_params,
    refuse_sharded,
    tensorboard_writer,
)
from stability_callbacks.figures import grad_flow_image, grad_flow_stats
from stability_callbacks.histogram_math import (
    Histogram,
    fetch_to_host,
    histogram_stats,
    tensor_histograms,
    to_histograms,
    write_histograms,
)
from stability_callbacks.stats import LayerIndex, user_name
from stability_callbacks.tb_crc import install_fast_crc

try:  # DTensor: the parameters and gradients of FSDP2 (fully_shard) and tensor parallelism
    from torch.distributed.tensor import DTensor
except ImportError:  # a build of torch without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "Histogram",
    "HistogramLogger",
    "fetch_to_host",
    "grad_flow_image",
    "grad_flow_stats",
    "histogram_stats",
    "tensor_histograms",
    "to_histograms",
    "write_histograms",
]


def _compile_patterns(name: str, patterns: str | Sequence[str] | None) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(items, Sequence) or not all(isinstance(p, str) for p in items):
        raise ValueError(f"`{name}` must be a regular expression or a list of them, got {patterns!r}")
    compiled = []
    for p in items:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"`{name}` holds an invalid regular expression {p!r}: {err}") from err
    return compiled


def _evenly(n: int, k: int | None) -> list[int]:
    """``k`` indices out of ``range(n)``, evenly spread and keeping the first and the last."""
    if k is None or n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


class HistogramLogger(StabilityCallback):
    """Weight, gradient and activation histograms in TensorBoard, computed on the device.

    On each logging step all histograms are computed on the device (:func:`histogram_stats`), copied
    to the host in one transfer and written through the TensorBoardLogger's own ``SummaryWriter``
    (``add_histogram_raw``; no second event file). Steps that do not log do nothing at all: no
    statistics, no hooks, no host sync. Gradients are taken in ``on_before_optimizer_step``: after
    AMP unscaling, before gradient clipping, once per optimizer step. Activations are the outputs of
    the leaf modules, captured by forward hooks registered only for the first micro-batch of a
    logging step and removed right after it.

    Global rank zero writes. Under data parallelism (DDP) it alone computes: every rank holds the
    same weights and averaged gradients. Under ``ModelParallelStrategy`` (FSDP2 ``fully_shard``, tensor
    parallelism), whose parameters and gradients are DTensors, every rank bins its local shards and the
    ranges and counts are reduced across the mesh (two collectives a logging step for all tensors), so
    the histograms count the full tensors, as the same model trained unsharded would give. Activations
    are those of rank zero's own micro-batch under every strategy (the local part of a DTensor output).
    ``FSDPStrategy`` (FSDP1) and DeepSpeed, whose gradients are plain tensors holding a flat shard, are
    refused at setup. Without a TensorBoardLogger the callback warns once and does nothing.

    Order of callbacks: Lightning calls ``on_before_optimizer_step`` in the order of
    ``Trainer(callbacks=[...])``, so to histogram the gradients before any callback clips, rescales
    or drops them, put ``HistogramLogger`` before those callbacks (clippers, ``NonFiniteGuard``,
    ``StabilityAutopilot``)::

        Trainer(callbacks=[GradientMonitor(), HistogramLogger(), ZClip()])

    Placed after one of them, it raises ``MisconfigurationException`` at setup, naming them.
    Lightning's own ``gradient_clip_val`` clips after every callback and needs no care.

    Written records:

    =============================  =========  ========================================================
    tag                            kind       content
    =============================  =========  ========================================================
    ``weights/<param>``            histogram  parameter values (``named_parameters`` name)
    ``grads/<param>``              histogram  gradient as the optimizer sees it, before clipping
    ``activations/<module>``       histogram  output of a leaf module (first call of the step)
    ``nonfinite/<tag>``            scalar     NaN/inf count of a histogrammed tensor, only when > 0
    ``grad_flow``                  image      per-layer mean and max abs gradient, input to output,
                                              log scale (needs matplotlib)
    =============================  =========  ========================================================

    Args:
        every_n_steps: histograms on optimizer steps ``n-1, 2n-1, ...`` (Lightning's convention).
        weights: histogram the parameters.
        grads: histogram the gradients.
        activations: histogram the outputs of leaf modules.
        bins: number of equal-width buckets of each histogram.
        include: regular expression(s); if given, only tags matching one of them (``re.search``) are
            written, e.g. ``r"^grads/"`` or ``r"layer4"``.
        exclude: regular expression(s); tags matching one of them are not written, e.g. ``r"\\.bias$"``.
        max_tensors: at most this many histograms per kind (weights, grads, activations) and step,
            evenly spread from the first to the last layer; ``None`` for all.
        figure_every_n_steps: the gradient-flow picture on steps ``n-1, 2n-1, ...``; ``None`` for
            every fifth histogram step (``5 * every_n_steps``: drawing costs about one or two training
            steps of a small CNN on CPU), ``0`` for never.
    """

    reads_gradients = True

    def __init__(
        self,
        every_n_steps: int = 100,
        weights: bool = True,
        grads: bool = True,
        activations: bool = False,
        bins: int = 64,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        max_tensors: int | None = None,
        figure_every_n_steps: int | None = None,
    ) -> None:
        check_int("every_n_steps", every_n_steps)
        check_int("bins", bins)
        check_int("max_tensors", max_tensors, allow_none=True)
        check_int("figure_every_n_steps", figure_every_n_steps, minimum=0, allow_none=True)
        check_bool("weights", weights)
        check_bool("grads", grads)
        check_bool("activations", activations)
        self.every_n_steps = every_n_steps
        self.weights = weights
        self.grads = grads
        self.activations = activations
        self.bins = bins
        self.include = include
        self.exclude = exclude
        self.max_tensors = max_tensors
        self.figure_every_n_steps = (
            5 * every_n_steps if figure_every_n_steps is None else figure_every_n_steps
        )
        self._include = _compile_patterns("include", include)
        self._exclude = _compile_patterns("exclude", exclude)
        self._param_names: dict[int, str] = {}
        self._index: LayerIndex | None = None
        self._sharded = False
        self._act_modules: list[tuple[str, nn.Module]] = []
        self._handles: list[RemovableHandle] = []
        self._act_rows: dict[str, Tensor] = {}
        self._act_step = -1
        self._order = ForwardOrder()
        self._warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            weights=self.weights,
            grads=self.grads,
            activations=self.activations,
            bins=self.bins,
            include=self.include,
            exclude=self.exclude,
            max_tensors=self.max_tensors,
        )

    def _wanted(self, tag: str) -> bool:
        if self._include and not any(p.search(tag) for p in self._include):
            return False
        return not any(p.search(tag) for p in self._exclude)

    def _writer(self, trainer: pl.Trainer) -> Any | None:
        writer = tensorboard_writer(trainer)
        if writer is None and trainer.is_global_zero and not self._warned:
            self._warned = True
            rank_zero_warn(
                "HistogramLogger needs a TensorBoardLogger (Trainer(logger=TensorBoardLogger(...))); "
                "no histograms or images will be written."
            )
        return writer

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded(
            trainer,
            "HistogramLogger",
            "each rank holds a flat shard of the parameters, which is not the shape of any of them",
            "Use DDP, or ModelParallelStrategy (FSDP2, TP), whose DTensor shards it counts whole.",
            dtensor_ok=True,
        )
        check_reads_before_modifiers(trainer, self)
        install_fast_crc()  # C CRC-32C for TensorBoard's record writer, when installed
        self._learn_parameters(pl_module)
        leaves = [
            (user_name(name), mod)
            for name, mod in pl_module.named_modules()
            if name and next(mod.children(), None) is None and self._wanted(f"activations/{user_name(name)}")
        ]
        self._act_modules = [leaves[i] for i in _evenly(len(leaves), self.max_tensors)]
        self._order.reset()  # a new fit learns the forward order again

    def _learn_parameters(self, pl_module: pl.LightningModule) -> None:
        self._param_names = {id(p): user_name(name) for name, p in pl_module.named_parameters()}
        self._index = LayerIndex.build(pl_module)
        self._sharded = DTensor is not None and any(isinstance(p, DTensor) for p in pl_module.parameters())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy has wrapped the model by now: FSDP2 and tensor parallelism replace the parameters.
        self._learn_parameters(pl_module)

    # -- hooks around the forward pass -------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        if self.figure_every_n_steps:
            self._order.start(pl_module)  # once: a no-op while recording and after the first step
        if (
            self.activations
            and self._act_modules
            and is_logging_step(trainer, self.every_n_steps)
            and self._act_step != trainer.global_step
            and self._writer(trainer) is not None
        ):
            self._act_step = trainer.global_step
            self._act_rows = {}
            for name, mod in self._act_modules:
                self._handles.append(mod.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        rows = self._act_rows
        bins = self.bins

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in rows or not isinstance(output, Tensor) or output.numel() == 0 or output.is_complex():
                return
            if DTensor is not None and isinstance(output, DTensor):
                output = output.to_local()  # rank zero alone runs the hook: no collective here
            rows[name] = histogram_stats([output], bins)

        return hook

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _stop_recording_order(self) -> None:
        """Remove the forward-order hooks; after the first step, order the layers from input to output."""
        if self._order.stop() and self._order.order and self._index is not None:
            self._index = self._index.reorder(self._order.order)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()
        self._stop_recording_order()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._stop_recording_order()
        self._act_rows = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Drop references to the model so a pickled callback does not carry its parameters.
        self._remove_hooks()
        self._stop_recording_order()
        self._param_names, self._index, self._act_modules, self._act_rows = {}, None, [], {}
        super().teardown(trainer, pl_module, stage)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()
        self._stop_recording_order()
        super().on_exception(trainer, pl_module, exception)

    # -- the logging step --------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._remove_hooks()
        if not (trainer.is_global_zero or self._sharded):
            return
        step = trainer.global_step
        hist = is_logging_step(trainer, self.every_n_steps)
        fig = bool(self.figure_every_n_steps) and is_logging_step(trainer, self.figure_every_n_steps)
        act_rows = self._act_rows if self._act_step == step else {}
        self._act_rows = {}
        if not (hist or fig):
            return
        # Sharded: every rank takes part in the reductions of the same steps; rank zero writes.
        writer = self._writer(trainer)
        if writer is None and not (
            self._sharded and any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        ):
            return

        tags: list[str] = []
        tensors: list[Tensor | None] = []
        if hist:
            params = optimizer_params(optimizer)
            for kind, wanted in (("weights", self.weights), ("grads", self.grads)):
                if not wanted:
                    continue
                chosen = [
                    (
                        f"{kind}/{self._param_names.get(id(p), f'param_{i}')}",
                        p if kind == "weights" else p.grad,
                    )
                    for i, p in enumerate(params)
                    if kind == "weights" or p.grad is not None
                ]
                chosen = [(tag, t) for tag, t in chosen if self._wanted(tag)]
                for j in _evenly(len(chosen), self.max_tensors):
                    tags.append(chosen[j][0])
                    tensors.append(chosen[j][1])
        blocks: list[Tensor] = []
        if tensors:
            blocks.append(histogram_stats(tensors, self.bins))
        act_tags = [f"activations/{name}" for name in act_rows] if hist else []
        if act_tags:
            blocks.extend(act_rows.values())
        flow_at = len(blocks)
        if fig and self._index is not None and self._index.params:
            blocks.append(grad_flow_stats([p.grad for p in self._index.params], self._index))
        if not blocks or writer is None:
            return

        host = fetch_to_host(blocks)  # the one device-to-host transfer of this step
        if flow_at:
            hists = to_histograms(np.concatenate(host[:flow_at], axis=0))
            records = dict(zip([*tags, *act_tags], hists, strict=True))
            write_histograms(writer, records, step)
            for tag, h in records.items():
                if h is not None and h.nonfinite > 0:
                    writer.add_scalar(f"nonfinite/{tag}", h.nonfinite, step)
        if len(host) > flow_at:
            self._write_figure(writer, host[flow_at], step)

    def _write_figure(self, writer: Any, flow: np.ndarray, step: int) -> None:
        assert self._index is not None  # set in setup; the figure step is only reached after it
        try:
            image = grad_flow_image(
                self._index.layer_names, flow[0], flow[1], title=f"gradient flow, step {step}"
            )
        except ImportError:
            rank_zero_warn(
                "HistogramLogger draws the gradient-flow picture with matplotlib, which is not installed "
                "(pip install 'stability-callbacks[recipes]'); the picture is skipped."
            )
            self.figure_every_n_steps = 0
            return
        writer.add_image("grad_flow", image, step, dataformats="HWC")
