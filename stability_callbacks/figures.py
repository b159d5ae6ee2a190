"""The gradient-flow picture: per-layer mean and max absolute gradient, from input to output, log scale.

:func:`grad_flow_stats` computes the per-layer values on the device (no host sync, one fused norm
pass per statistic); :func:`grad_flow_image` draws them as an RGB image for
``SummaryWriter.add_image`` with matplotlib's Agg canvas (no pyplot state). A layer whose mean
gradient falls by orders of magnitude toward the input shows vanishing gradients at a glance::

    flow = grad_flow_stats([p.grad for p in index.params], index)  # (3, n_layers), on the device
    mean_abs, max_abs, _ = flow.tolist()
    image = grad_flow_image(index.layer_names, mean_abs, max_abs)
    writer.add_image("grad_flow", image, step, dataformats="HWC")
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from stability_callbacks.histogram_math import stored_values
from stability_callbacks.stats import LayerIndex, tensor_norms

__all__ = ["grad_flow_image", "grad_flow_stats"]


def grad_flow_stats(grads: Sequence[Tensor | None], index: LayerIndex) -> Tensor:
    """Per-layer mean and max of the absolute gradient, on the device (no host sync).

    Args:
        grads: one gradient per parameter of ``index`` (``None`` for a parameter without one).
        index: the parameter-to-layer map (:meth:`LayerIndex.build`, ordered with
            :meth:`LayerIndex.reorder` from input to output).

    Returns:
        A float32 tensor of shape ``(3, n_layers)``: mean |g|, max |g|, and the number of gradient
        values of the layer (0 for a layer without gradients, whose mean and max are 0).
    """
    if len(grads) != len(index.params):
        raise ValueError(f"`grads` has {len(grads)} entries but the index has {len(index.params)} parameters")
    l1 = tensor_norms(grads, 1.0)
    mx = tensor_norms(grads, math.inf)
    dev = l1.device
    numel = torch.tensor(
        [0 if g is None else stored_values(g).numel() for g in grads], dtype=torch.float32, device=dev
    )
    layer_of = torch.tensor(index.layer_of, dtype=torch.long, device=dev)
    n = len(index.layer_names)
    l1_sum = torch.zeros(n, dtype=torch.float32, device=dev).index_add_(0, layer_of, l1)
    count = torch.zeros(n, dtype=torch.float32, device=dev).index_add_(0, layer_of, numel)
    layer_max = torch.zeros(n, dtype=torch.float32, device=dev).scatter_reduce_(
        0, layer_of, mx, "amax", include_self=False
    )
    layer_max = torch.where(count > 0, layer_max, torch.zeros_like(layer_max))
    return torch.stack([l1_sum / count.clamp_min(1.0), layer_max, count])


def grad_flow_image(
    layer_names: Sequence[str],
    mean_abs: Sequence[float],
    max_abs: Sequence[float],
    title: str = "gradient flow",
    dpi: int = 80,
) -> np.ndarray:
    """Draw the gradient-flow picture: per-layer max and mean |gradient|, input to output, log scale.

    Layers without a gradient (max 0) are marked with a grey ``x`` at the bottom, non-finite ones
    with a red ``x`` at the top. Drawn with matplotlib's Agg canvas (no pyplot state is touched).

    Args:
        layer_names: layer names from input to output.
        mean_abs: mean absolute gradient of each layer.
        max_abs: max absolute gradient of each layer.
        title: the figure title.
        dpi: resolution.

    Returns:
        An ``(H, W, 3)`` uint8 RGB image (``SummaryWriter.add_image(..., dataformats="HWC")``).

    Raises:
        ImportError: when matplotlib is not installed (``pip install stability-callbacks[recipes]``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    n = len(layer_names)
    means = np.asarray(mean_abs, dtype=np.float64)
    maxes = np.asarray(max_abs, dtype=np.float64)
    if means.shape != (n,) or maxes.shape != (n,):
        raise ValueError(f"need one mean and one max per layer ({n}), got {means.shape} and {maxes.shape}")
    finite = np.isfinite(means) & np.isfinite(maxes)
    positive = finite & (maxes > 0)
    shown = np.concatenate([means[positive & (means > 0)], maxes[positive]])
    low = float(shown.min()) / 10 if shown.size else 1e-12
    high = float(shown.max()) * 10 if shown.size else 1.0
    x = np.arange(n)

    # Lines rather than bar patches, fixed margins rather than tight_layout (which draws twice) and no
    # minor ticks: the picture costs a fraction of a training step, not several.
    width_in = max(6.0, min(0.2 * n + 2, 24.0))
    label_in = 0.06 * max((len(name) for name in layer_names), default=1) + 0.3
    fig = Figure(figsize=(width_in, 3.2 + label_in), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=0.6 / width_in, right=1 - 0.15 / width_in, top=0.88, bottom=label_in / (3.2 + label_in)
    )
    ax = fig.add_subplot(1, 1, 1)
    bar = max(1.0, min(8.0, 0.6 * width_in * dpi / max(n, 1) * 72 / dpi))
    ax.vlines(x[positive], low, maxes[positive], colors="c", linewidth=bar, alpha=0.45, label="max |grad|")
    ax.vlines(
        x[positive],
        low,
        np.maximum(means[positive], low),
        colors="b",
        linewidth=bar,
        alpha=0.8,
        label="mean |grad|",
    )
    if (finite & ~positive).any():
        ax.plot(
            x[finite & ~positive],
            np.full((finite & ~positive).sum(), low * 1.5),
            "x",
            color="grey",
            label="zero",
        )
    if (~finite).any():
        ax.plot(x[~finite], np.full((~finite).sum(), high / 1.5), "x", color="r", label="non-finite")
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(low, high)
    ax.set_xlim(-0.75, n - 0.25)
    ax.set_xticks(x)
    ax.set_xticklabels(list(layer_names), rotation=90, fontsize=6 if n > 20 else 8)
    ax.tick_params(axis="x", length=2)
    ax.set_ylabel("|gradient|")
    ax.set_title(f"{title} (input -> output)", loc="left", fontsize=9)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, fontsize=7, frameon=False)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])
