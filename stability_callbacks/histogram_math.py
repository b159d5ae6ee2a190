"""Device histograms of many tensors, and the TensorBoard histogram records made from them (no Lightning).

``SummaryWriter.add_histogram`` copies every tensor to host memory and bins it with NumPy, one tensor
at a time. Here the statistics of a TensorBoard ``HistogramProto`` (min, max, count, sum, sum of
squares and the bucket counts over a fixed number of equal-width bins) are computed where the tensors
live, packed into one small ``(n, 7 + bins)`` tensor, and copied to the host once for all of them::

    stats = histogram_stats([p.grad for p in model.parameters()], bins=64)  # on the device, no sync
    hists = to_histograms(stats)  # one device-to-host copy
    write_histograms(writer, dict(zip(tags, hists)), global_step=step)

The binning is one piece of tensor code that runs the same way on every device, the CPU included: it
never reads a value on the host before the final copy, so it does not stall an accelerator's queue.

Conventions (those of ``SummaryWriter.add_histogram_raw`` and TensorBoard's ``HistogramProto``):

* the ``bins`` buckets split ``[min, max]`` into equal widths; ``bucket_limits`` are their right
  edges (the last one is ``max``); TensorBoard takes ``min`` as the left edge of the first bucket;
* a tensor whose finite values are all equal gets buckets over ``[value - 0.5, value + 0.5]`` (as
  NumPy does), with every value in the middle bucket;
* NaN and infinite values are counted apart (``Histogram.nonfinite``) and the finite ones binned, so
  the bucket counts sum to ``num``, the number of finite values;
* bf16, fp16 and integer tensors are binned in float32; sparse tensors use their stored values;
  ``None`` and empty tensors give no histogram.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stability_callbacks._checks import check_int
from stability_callbacks.stats import wide_dtype

__all__ = [
    "STAT_COLUMNS",
    "Histogram",
    "fetch_to_host",
    "histogram_stats",
    "stored_values",
    "tensor_histograms",
    "to_histograms",
    "write_histograms",
]

_FMAX = torch.finfo(torch.float32).max
# Elements per chunk: a few cache-sized passes on CPU; few, large kernels on accelerators.
_CHUNK_CPU = 1 << 18
_CHUNK_ACCELERATOR = 1 << 24

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


def stored_values(t: Tensor) -> Tensor:
    """Detached tensor of the stored values: a sparse tensor's (coalesced) values, else the tensor.

    These are the values a histogram counts (the implicit zeros of a sparse tensor are not).
    """
    t = t.detach()
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    if t.layout != torch.strided:  # CSR, CSC, BSR, BSC
        return t.values()
    return t


def histogram_stats(
    tensors: Sequence[Tensor | None], bins: int = 64, device: torch.device | None = None
) -> Tensor:
    """Histogram statistics of each tensor, computed on its device without a host sync.

    The work per tensor is a handful of elementwise passes and reductions over chunks of a fixed size
    in a few scratch buffers (no temporary per tensor), and one bucket count per chunk
    (``torch.histc`` on accelerators, which does not sync; ``torch.bincount`` on CPU, where it is
    faster). The same code runs on every device; nothing is read on the host.

    Args:
        tensors: the tensors; ``None`` and empty tensors give a row of zeros.
        bins: number of equal-width buckets.
        device: where the result lives; defaults to the device of the first tensor.

    Returns:
        A tensor of shape ``(len(tensors), 7 + bins)`` (float64; float32 on MPS/XLA): per row the
        finite min, max, sum, sum of squares, the non-finite count, the lower and upper bucket edge,
        then the ``bins`` bucket counts. Decode it with :func:`to_histograms`.
    """
    check_int("bins", bins)
    values = [None if t is None else stored_values(t) for t in tensors]
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
            return _device_rows([values[i] for i in idx], bins, dev)  # type: ignore[misc]
    out = torch.zeros(len(values), STAT_COLUMNS + bins, dtype=wide_dtype(out_device), device=out_device)
    for dev, idx in groups.items():
        rows = _device_rows([values[i] for i in idx], bins, dev)  # type: ignore[misc]
        out[torch.tensor(idx, device=out_device)] = rows.to(out_device, out.dtype)
    return out


def _device_rows(values: list[Tensor], bins: int, device: torch.device) -> Tensor:
    """Rows of :func:`histogram_stats` for non-empty tensors that all live on ``device``.

    Tensors are processed in chunks of a fixed size (cache-sized on CPU), so the scratch buffers stay
    small and every pass over a chunk after the first one reads from cache.
    """
    acc = wide_dtype(device)
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
    acc = wide_dtype(dev)
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
