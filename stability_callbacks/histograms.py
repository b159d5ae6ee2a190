"""Device-side histograms of many tensors, written as TensorBoard histogram records.

``SummaryWriter.add_histogram`` copies every tensor to host memory and bins it with NumPy, one tensor
at a time. Here the statistics of a TensorBoard ``HistogramProto`` (min, max, count, sum, sum of
squares and the bucket counts over a fixed number of equal-width bins) are computed where the tensors
live, packed into one small ``(n, 7 + bins)`` tensor, and copied to the host once for all of them::

    stats = histogram_stats([p.grad for p in model.parameters()], bins=64)  # on the device, no sync
    hists = to_histograms(stats)  # one device-to-host copy
    write_histograms(writer, dict(zip(tags, hists)), global_step=step)

Conventions (those of ``SummaryWriter.add_histogram_raw`` and TensorBoard's ``HistogramProto``):

* the ``bins`` buckets split ``[min, max]`` into equal widths; ``bucket_limits`` are their right
  edges (the last one is ``max``); TensorBoard takes ``min`` as the left edge of the first bucket;
* a tensor whose finite values are all equal gets buckets over ``[value - 0.5, value + 0.5]`` (as
  NumPy does), with every value in the middle bucket;
* NaN and infinite values are counted apart (``Histogram.nonfinite``) and the finite ones binned, so
  the bucket counts sum to ``num``, the number of finite values;
* bf16, fp16 and integer tensors are binned in float32; sparse tensors use their stored values;
  ``None`` and empty tensors give no histogram.

Besides the histograms, :func:`grad_flow_stats` and :func:`grad_flow_image` draw the classic
"gradient flow" picture: per-layer mean and max absolute gradient from input to output, on a log scale.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from stability_callbacks._trainer import (
    StabilityCallback,
    forward_order,
    is_logging_step,
    optimizer_params,
    tensorboard_writer,
)
from stability_callbacks.stats import LayerIndex, host_reads_are_free, tensor_norms

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

_FMAX = torch.finfo(torch.float32).max
_NO_FLOAT64 = frozenset({"mps", "xla"})
# Elements per chunk: a few cache-sized passes on CPU; few, large kernels on accelerators.
_CHUNK_CPU = 1 << 18
_CHUNK_ACCELERATOR = 1 << 24
# Interleaved copies of each histogram that ``bincount`` fills on CPU (see ``_cpu_rows``).
_HISTOGRAM_COPIES = 4

# Columns of a row of ``histogram_stats``; the bucket counts follow.
_MIN, _MAX, _SUM, _SUMSQ, _NONFINITE, _EDGE_LO, _EDGE_HI = range(7)
STAT_COLUMNS = 7


@dataclass(frozen=True)
class Histogram:
    """One histogram, in the fields of TensorBoard's ``HistogramProto``.

    Attributes:
        min: smallest finite value.
        max: largest finite value.
        num: number of finite values (the bucket counts sum to it).
        sum: sum of the finite values.
        sum_squares: sum of their squares.
        bucket_limits: right edges of the buckets (``len == bins``, last is the upper edge).
        bucket_counts: number of values in each bucket.
        nonfinite: number of NaN and infinite values (not in the buckets).
        lower_edge: left edge of the first bucket (``min``, or ``min - 0.5`` for a constant tensor).
    """

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]
    nonfinite: int
    lower_edge: float


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type in _NO_FLOAT64 else torch.float64


def _values(t: Tensor) -> Tensor:
    """Detached tensor of the stored values: a sparse tensor's (coalesced) values, else the tensor."""
    t = t.detach()
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    if t.layout != torch.strided:  # CSR, CSC, BSR, BSC
        return t.values()
    return t


def _check_bins(bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"`bins` must be a positive integer, got {bins!r}")


def histogram_stats(
    tensors: Sequence[Tensor | None], bins: int = 64, device: torch.device | None = None
) -> Tensor:
    """Histogram statistics of each tensor, computed on its device; on accelerators without a host sync.

    The work per tensor is a handful of elementwise passes and reductions over cache-sized chunks in
    a few scratch buffers (no temporary per tensor), and one bucket count (``torch.histc`` on
    accelerators, which does not sync; ``torch.bincount`` on CPU, where the range of each tensor is
    read first, so that the common all-finite tensor takes the short path).

    Args:
        tensors: the tensors; ``None`` and empty tensors give a row of zeros.
        bins: number of equal-width buckets.
        device: where the result lives; defaults to the device of the first tensor.

    Returns:
        A tensor of shape ``(len(tensors), 7 + bins)`` (float64; float32 on MPS/XLA): per row the
        finite min, max, sum, sum of squares, the non-finite count, the lower and upper bucket edge,
        then the ``bins`` bucket counts. Decode it with :func:`to_histograms`.
    """
    _check_bins(bins)
    values = [None if t is None else _values(t) for t in tensors]
    out_device = device
    if out_device is None:
        out_device = next((v.device for v in values if v is not None), torch.device("cpu"))
    groups: dict[torch.device, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        if v is not None and v.numel() > 0:
            if v.is_complex():
                raise TypeError(f"cannot histogram a complex tensor (position {i}, dtype {v.dtype})")
            groups[v.device].append(i)
    if len(groups) == 1:
        ((dev, idx),) = groups.items()
        if len(idx) == len(values) and dev == out_device:
            return _rows([values[i] for i in idx], bins, dev)  # type: ignore[misc]
    out = torch.zeros(
        len(values), STAT_COLUMNS + bins, dtype=_accumulate_dtype(out_device), device=out_device
    )
    for dev, idx in groups.items():
        rows = _rows([values[i] for i in idx], bins, dev)  # type: ignore[misc]
        out[torch.tensor(idx, device=out_device)] = rows.to(out_device, out.dtype)
    return out


def _rows(values: list[Tensor], bins: int, device: torch.device) -> Tensor:
    """Rows of :func:`histogram_stats` for non-empty tensors on ``device``: the host path on CPU."""
    if host_reads_are_free(device):
        return _cpu_rows(values, bins)
    return _device_rows(values, bins, device)


def _as_float32(x: float) -> float:
    """``x`` rounded to float32 as a tensor cast rounds it (``inf`` beyond its range)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def _cpu_rows(values: list[Tensor], bins: int) -> Tensor:
    """Rows of :func:`histogram_stats` for CPU tensors.

    On the CPU, reading a scalar costs nothing (there is no device to wait for), so each tensor's
    range is read first: a tensor whose values are all finite, with a range and sums that fit in
    float32 (nearly always) needs no masking and no rescaling and is binned in three cheap passes per
    cache-sized chunk. The others take :func:`_device_rows`, which handles every case; both map a
    value to its bucket with the same float32 arithmetic, so the choice never changes a count.
    """
    out = torch.zeros(len(values), STAT_COLUMNS + bins, dtype=torch.float64)
    size = min(max(v.numel() for v in values), _CHUNK_CPU)
    work = torch.empty(size, dtype=torch.float32)
    # ``bincount`` is a serial loop of increments: it is several times faster on int16 than on int32,
    # and faster still when neighbouring values count into different copies of the histogram (a
    # narrow distribution would otherwise increment one counter over and over).
    copies = _HISTOGRAM_COPIES
    int_type = torch.int16 if copies * (bins + 1) < 2**15 else torch.int32
    ints = torch.empty(size, dtype=int_type)
    copy_offset = (torch.arange(size) % copies * (bins + 1)).to(int_type)
    cast = torch.empty(size, dtype=torch.float32)
    careful: list[int] = []
    for i, v in enumerate(values):
        flat = v.reshape(-1)
        pieces = flat.split(_CHUNK_CPU)
        lo, hi = math.inf, -math.inf
        for piece in pieces:  # chunk by chunk, so that amax reads from cache
            lo = min(lo, float(piece.amin()))
            hi = max(hi, float(piece.amax()))
        if v.dtype != torch.float32:  # the values are binned in float32: so are their min and max
            lo, hi = _as_float32(lo), _as_float32(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo > _FMAX:
            careful.append(i)  # non-finite values, or a range that overflows float32
            continue
        row = out[i]
        if hi == lo:
            row[:STAT_COLUMNS] = torch.tensor(
                [lo, hi, lo * flat.numel(), lo * lo * flat.numel(), 0.0, lo - 0.5, hi + 0.5],
                dtype=torch.float64,
            )
            row[STAT_COLUMNS + bins // 2] = flat.numel()
            continue
        scale = _as_float32(bins / (hi - lo))  # as ``_device_rows`` rounds it
        total = squares = 0.0
        counts = torch.zeros(copies * (bins + 1), dtype=torch.int64)
        for piece in pieces:
            n = piece.numel()
            x = piece if piece.dtype == torch.float32 else cast[:n].copy_(piece)
            total += float(x.sum())
            squares += float(torch.dot(x, x))
            y = torch.sub(x, lo, out=work[:n]).mul_(scale)
            idx = ints[:n].copy_(y).add_(copy_offset[:n])
            counts += torch.bincount(idx, minlength=copies * (bins + 1))
        if not (math.isfinite(total) and math.isfinite(squares)):
            careful.append(i)
            continue
        counts = counts.view(copies, bins + 1).sum(0)
        counts[bins - 1] += counts[bins]
        row[:STAT_COLUMNS] = torch.tensor([lo, hi, total, squares, 0.0, lo, hi], dtype=torch.float64)
        row[STAT_COLUMNS:] = counts[:bins]
    if careful:
        out[careful] = _device_rows([values[i] for i in careful], bins, torch.device("cpu"))
    return out


def _device_rows(values: list[Tensor], bins: int, device: torch.device) -> Tensor:
    """Rows of :func:`histogram_stats` for non-empty tensors that all live on ``device``.

    Tensors are processed in chunks of a fixed size (cache-sized on CPU), so the scratch buffers stay
    small and every pass over a chunk after the first one reads from cache.
    """
    acc = _accumulate_dtype(device)
    chunk = _CHUNK_CPU if device.type == "cpu" else _CHUNK_ACCELERATOR
    pieces: list[Tensor] = []
    owner: list[int] = []
    for i, v in enumerate(values):
        for piece in v.reshape(-1).split(chunk):
            pieces.append(piece)
            owner.append(i)
    size = max(p.numel() for p in pieces)
    work = torch.empty(size, dtype=torch.float32, device=device)
    needs_cast = any(p.dtype != torch.float32 for p in pieces)
    cast = torch.empty(size, dtype=torch.float32, device=device) if needs_cast else None
    ints = torch.empty(size, dtype=torch.int32, device=device) if device.type == "cpu" else None

    def as_float32(x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return x
        return cast[: x.numel()].copy_(x)  # type: ignore[index]

    # Pass 1: finite min and max (non-finite values replaced by a value that cannot win).
    los: list[Tensor] = []
    his: list[Tensor] = []
    for piece in pieces:
        x = as_float32(piece)
        w = work[: x.numel()]
        los.append(torch.nan_to_num(x, _FMAX, _FMAX, _FMAX, out=w).amin())
        his.append(torch.nan_to_num(x, -_FMAX, -_FMAX, -_FMAX, out=w).amax())
    n = len(values)
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)
    inf = float("inf")
    lo = torch.full((n,), inf, device=device).scatter_reduce_(0, owner_t, torch.stack(los), "amin")
    hi = torch.full((n,), -inf, device=device).scatter_reduce_(0, owner_t, torch.stack(his), "amax")

    # Bucket mapping y = (x * a - lo * a) * c, so that finite x in [lo, hi] lands in [0, bins]. The
    # difference x - lo is exact for nearby values (a narrow range far from zero keeps its resolution);
    # a = 1/2 only where hi - lo would overflow float32. Constant tensors (and those without finite
    # values) get c = 1, land in bucket 0 and are moved to the middle bucket, with edges value -/+ 0.5.
    lo_acc, hi_acc = lo.to(acc), hi.to(acc)
    width = hi_acc - lo_acc
    scale = (bins / width).float()
    flat_range = ~(width > 0) | ~torch.isfinite(scale)
    half = width > _FMAX
    a = torch.where(half, torch.full_like(lo, 0.5), torch.ones_like(lo))
    b = lo * a  # constant tensors: x - lo == 0 exactly for finite x
    c_scale = torch.where(flat_range, torch.ones_like(scale), scale / a)
    mid = torch.where(lo_acc <= hi_acc, (lo_acc + hi_acc) / 2, torch.zeros_like(lo_acc))
    edge_lo = torch.where(flat_range, mid - 0.5, lo_acc)
    edge_hi = torch.where(flat_range, mid + 0.5, hi_acc)
    # Sums are taken over x * 2**-e with 2**e >= max |x| (exact scaling, |x * 2**-e| <= 1), so that
    # neither the sum nor the sum of squares can overflow float32.
    m = torch.maximum(lo.abs(), hi.abs())
    m = torch.where((m > 0) & (lo <= hi), m, torch.ones_like(m))
    _, exponent = torch.frexp(m)
    pow2 = torch.ldexp(torch.ones_like(m, dtype=acc), exponent)
    inv_pow2 = torch.ldexp(torch.ones_like(m), -exponent)
    a_p, b_p, c_p, inv_p = a[owner_t], b[owner_t], c_scale[owner_t], inv_pow2[owner_t]

    # Pass 2: sums and bucket counts. Bucket ``bins`` collects x == max (folded below),
    # bucket ``bins + 1`` the non-finite values.
    trash = float(bins + 1)
    sums: list[Tensor] = []
    squares: list[Tensor] = []
    counts: list[Tensor] = []
    for j, piece in enumerate(pieces):
        x = as_float32(piece)
        w = work[: x.numel()]
        torch.nan_to_num(x, 0.0, 0.0, 0.0, out=w).mul_(inv_p[j])
        sums.append(w.sum())
        squares.append(torch.dot(w, w))
        torch.mul(x, a_p[j], out=w).sub_(b_p[j]).mul_(c_p[j])
        w.nan_to_num_(trash, trash, trash)
        counts.append(_bucket_counts(w, bins, ints))
    zeros = torch.zeros(n, dtype=acc, device=device)
    total = zeros.index_add(0, owner_t, torch.stack(sums).to(acc)) * pow2
    sum_sq = zeros.index_add(0, owner_t, torch.stack(squares).to(acc)) * pow2.square()
    c = torch.zeros(n, bins + 2, dtype=acc, device=device).index_add_(0, owner_t, torch.stack(counts).to(acc))
    c[:, bins - 1] += c[:, bins]
    middle = torch.where(flat_range, c[:, 0], c[:, bins // 2])
    c[:, 0] = torch.where(flat_range, torch.zeros_like(middle), c[:, 0])
    c[:, bins // 2] = middle
    head = torch.stack([lo_acc, hi_acc, total, sum_sq, c[:, bins + 1], edge_lo, edge_hi], dim=1)
    # Rows without any finite value: min/max/sums are meaningless, report zeros.
    head[:, :_NONFINITE] *= (lo_acc <= hi_acc).to(acc).unsqueeze(1)
    return torch.cat([head, c[:, :bins]], dim=1)


def _bucket_counts(y: Tensor, bins: int, ints: Tensor | None) -> Tensor:
    """Counts of ``floor(y)`` for ``y`` in ``[0, bins + 2)``, as ``bins + 2`` values.

    With an int32 scratch buffer (CPU): ``torch.bincount`` of the truncated values. Without one
    (accelerators, where ``bincount`` would sync to size its output): ``torch.histc`` with fixed
    bounds, one bucket per integer.
    """
    if ints is not None:  # truncation toward zero also sends rounding noise in (-1, 0) to bucket 0
        idx = ints[: y.numel()].copy_(y)
        return torch.bincount(idx, minlength=bins + 2)
    return torch.histc(y.clamp_(min=0.0), bins=bins + 2, min=0.0, max=float(bins + 2))


def fetch_to_host(tensors: Sequence[Tensor]) -> list[np.ndarray]:
    """Copy several device tensors to the host with a single transfer (one ``tolist``).

    The tensors are flattened, cast to float64 (float32 on MPS/XLA) and concatenated on the device of
    the first one; the result is a float64 NumPy array per tensor, in its original shape.
    """
    if not tensors:
        return []
    dev = tensors[0].device
    acc = _accumulate_dtype(dev)
    packed = torch.cat([t.detach().reshape(-1).to(dev, acc) for t in tensors])
    host = np.asarray(packed.tolist(), dtype=np.float64)
    out: list[np.ndarray] = []
    start = 0
    for t in tensors:
        out.append(host[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def to_histograms(stats: Tensor | np.ndarray) -> list[Histogram | None]:
    """Decode :func:`histogram_stats` rows into :class:`Histogram` objects (one host transfer).

    Args:
        stats: the ``(n, 7 + bins)`` tensor, or the same values already on the host.

    Returns:
        One entry per row: ``None`` for a ``None`` or empty tensor, otherwise a histogram (with
        ``num == 0`` when no value is finite).
    """
    host = fetch_to_host([stats])[0] if isinstance(stats, Tensor) else np.asarray(stats, np.float64)
    if host.ndim != 2 or host.shape[1] <= STAT_COLUMNS:
        raise ValueError(f"`stats` must have shape (n, {STAT_COLUMNS} + bins), got {tuple(host.shape)}")
    bins = host.shape[1] - STAT_COLUMNS
    out: list[Histogram | None] = []
    for row in host:
        counts = row[STAT_COLUMNS:]
        num = round(float(counts.sum()))
        nonfinite = round(float(row[_NONFINITE]))
        if num == 0 and nonfinite == 0:
            out.append(None)
            continue
        edges = np.linspace(row[_EDGE_LO], row[_EDGE_HI], bins + 1)
        edges[-1] = row[_EDGE_HI]
        out.append(
            Histogram(
                min=float(row[_MIN]),
                max=float(row[_MAX]),
                num=num,
                sum=float(row[_SUM]),
                sum_squares=float(row[_SUMSQ]),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                nonfinite=nonfinite,
                lower_edge=float(edges[0]),
            )
        )
    return out


def tensor_histograms(tensors: Sequence[Tensor | None], bins: int = 64) -> list[Histogram | None]:
    """Histograms of many tensors with one device-to-host transfer.

    Args:
        tensors: the tensors (``None`` and empty tensors give ``None``).
        bins: number of equal-width buckets.
    """
    return to_histograms(histogram_stats(tensors, bins))


def write_histograms(writer: Any, histograms: Mapping[str, Histogram | None], global_step: int) -> int:
    """Write histograms through a ``SummaryWriter`` (``add_histogram_raw``); returns how many.

    ``None`` entries and histograms without finite values are skipped (TensorBoard cannot show an
    empty histogram).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (a TensorBoardLogger's ``experiment``).
        histograms: tag -> histogram.
        global_step: the step to record.
    """
    written = 0
    for tag, h in histograms.items():
        if h is None or h.num == 0:
            continue
        writer.add_histogram_raw(
            tag,
            min=h.min,
            max=h.max,
            num=h.num,
            sum=h.sum,
            sum_squares=h.sum_squares,
            bucket_limits=h.bucket_limits,
            bucket_counts=h.bucket_counts,
            global_step=global_step,
        )
        written += 1
    return written


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
        [0 if g is None else _values(g).numel() for g in grads], dtype=torch.float32, device=dev
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


def _positive_int(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or (allow_zero and value == 0))
    )
    if not ok:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"`{name}` must be {kind} integer{' or None' if allow_none else ''}, got {value!r}")


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

    Only global rank zero computes and writes. Without a TensorBoardLogger the callback warns once
    and does nothing.

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
        _positive_int("every_n_steps", every_n_steps)
        _check_bins(bins)
        _positive_int("max_tensors", max_tensors, allow_none=True)
        _positive_int("figure_every_n_steps", figure_every_n_steps, allow_none=True, allow_zero=True)
        for name, flag in (("weights", weights), ("grads", grads), ("activations", activations)):
            if not isinstance(flag, bool):
                raise ValueError(f"`{name}` must be a bool, got {flag!r}")
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
        self._act_modules: list[tuple[str, nn.Module]] = []
        self._handles: list[RemovableHandle] = []
        self._act_rows: dict[str, Tensor] = {}
        self._act_step = -1
        self._order_cm: AbstractContextManager[list[str]] | None = None
        self._order_list: list[str] = []
        self._order: list[str] | None = None
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
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise ValueError(
                f"HistogramLogger cannot histogram sharded parameters ({type(trainer.strategy).__name__}): "
                "rank zero holds only its shard. Use a data-parallel strategy to record histograms."
            )
        # Histogram the gradients before any clipping: run ahead of the callbacks that modify them.
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        mine = callbacks.index(self) if self in callbacks else -1
        first = next((i for i, c in enumerate(callbacks) if getattr(c, "modifies_gradients", False)), None)
        if first is not None and 0 <= first < mine:
            callbacks.insert(first, callbacks.pop(mine))
        self._param_names = {id(p): name for name, p in pl_module.named_parameters()}
        self._index = LayerIndex.build(pl_module)
        leaves = [
            (name, mod)
            for name, mod in pl_module.named_modules()
            if name and next(mod.children(), None) is None and self._wanted(f"activations/{name}")
        ]
        self._act_modules = [leaves[i] for i in _evenly(len(leaves), self.max_tensors)]
        self._order = None

    # -- hooks around the forward pass -------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        if self.figure_every_n_steps and self._order is None and self._order_cm is None:
            self._order_cm = forward_order(pl_module)
            self._order_list = self._order_cm.__enter__()
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
            rows[name] = histogram_stats([output], bins)

        return hook

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _stop_recording_order(self, pl_module: pl.LightningModule) -> None:
        if self._order_cm is None:
            return
        self._order_cm.__exit__(None, None, None)
        self._order_cm = None
        if self._order_list and self._index is not None:
            self._order = list(self._order_list)
            self._index = self._index.reorder(self._order)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()
        self._stop_recording_order(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._stop_recording_order(pl_module)
        self._act_rows = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Drop references to the model so a pickled callback does not carry its parameters.
        self._remove_hooks()
        self._stop_recording_order(pl_module)
        self._param_names, self._index, self._act_modules, self._act_rows = {}, None, [], {}
        super().teardown(trainer, pl_module, stage)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()
        self._stop_recording_order(pl_module)
        super().on_exception(trainer, pl_module, exception)

    # -- the logging step --------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._remove_hooks()
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        hist = is_logging_step(trainer, self.every_n_steps)
        fig = bool(self.figure_every_n_steps) and is_logging_step(trainer, self.figure_every_n_steps)
        act_rows = self._act_rows if self._act_step == step else {}
        self._act_rows = {}
        if not (hist or fig):
            return
        writer = self._writer(trainer)
        if writer is None:
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
        if not blocks:
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
