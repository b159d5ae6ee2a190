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
DTensors (the parameters and gradients of FSDP2 and tensor parallelism) are counted whole: each rank
bins its shard with the range of the full tensor, two all-reduces for all tensors of a call.

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
import torch.distributed as dist
from torch import Tensor

from stability_callbacks._checks import check_int
from stability_callbacks.stats import local_tensor, reduce_over_shards, shard_groups, wide_dtype

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

    Two passes over each tensor, in chunks of a fixed size through a few scratch buffers (no
    temporary per tensor): the finite range, then the sums and the bucket counts (``torch.bincount``
    of integer bucket indices on CPU; ``torch.histc`` with fixed bounds on accelerators, where
    ``bincount`` would sync). The same code runs on every device; nothing is read on the host.

    DTensors (FSDP2, tensor parallelism) are counted whole: each rank bins its local shard with the
    range of the full tensor, which takes one all-reduce (max) of the ranges and one (sum) of the rows
    for all tensors sharded over the same process group. Every rank must then call this with the same
    tensors, on the same steps.

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
    shards = shard_groups(tensors)
    values = [None if t is None else stored_values(local_tensor(t)) for t in tensors]
    out_device = device
    if out_device is None:
        out_device = next((v.device for v in values if v is not None), torch.device("cpu"))
    groups: dict[torch.device, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        if v is not None and v.numel() > 0:
            if v.is_complex():
                raise TypeError(f"cannot histogram a complex tensor (position {i}, dtype {v.dtype})")
            groups[v.device].append(i)
    n = len(values)
    acc = wide_dtype(out_device)
    lo = torch.full((n,), float("inf"), device=out_device)
    hi = torch.full((n,), -float("inf"), device=out_device)
    body = torch.zeros(n, 3 + bins, dtype=acc, device=out_device)
    jobs: list[tuple[_Scratch, Tensor, list[Tensor]]] = []
    for dev, idx in groups.items():
        vals = [v for i in idx if (v := values[i]) is not None]
        jobs.append((_Scratch(vals, dev), torch.tensor(idx, device=out_device), vals))
    for scratch, at, vals in jobs:
        part_lo, part_hi = _finite_ranges(vals, scratch)
        lo[at], hi[at] = part_lo.to(out_device), part_hi.to(out_device)
        if not shards:
            body[at] = _binned_rows(vals, part_lo, part_hi, bins, scratch).to(out_device, acc)
    if shards:
        # The range of each whole tensor (one all-reduce per process group: max of -min and of max),
        # then its sums and counts (one all-reduce: sum), binned with that range on every rank.
        ranges = reduce_over_shards(torch.stack([-lo, hi], dim=1), shards, dist.ReduceOp.MAX)
        lo, hi = -ranges[:, 0], ranges[:, 1]
        for scratch, at, vals in jobs:
            dev = scratch.device
            rows = _binned_rows(vals, lo[at].to(dev), hi[at].to(dev), bins, scratch)
            body[at] = rows.to(out_device, acc)
        body = reduce_over_shards(body, shards, dist.ReduceOp.SUM)
    return _assemble(lo, hi, body, bins)


def _pieces(values: list[Tensor], device: torch.device) -> tuple[list[Tensor], list[int]]:
    """The flattened tensors split into chunks of at most the device's chunk size, and each one's owner."""
    chunk = _CHUNK_CPU if device.type == "cpu" else _CHUNK_ACCELERATOR
    pieces: list[Tensor] = []
    owner: list[int] = []
    for i, v in enumerate(values):
        for piece in v.reshape(-1).split(chunk):
            pieces.append(piece)
            owner.append(i)
    return pieces, owner


class _Scratch:
    """Chunk-sized scratch buffers of one device, allocated once a call and reused for every piece (fresh
    memory costs a page fault a page): a float32 work buffer, a float32 cast buffer for other dtypes, an
    int32 buffer for the bucket indices on CPU."""

    def __init__(self, values: list[Tensor], device: torch.device) -> None:
        chunk = _CHUNK_CPU if device.type == "cpu" else _CHUNK_ACCELERATOR
        size = min(chunk, max(v.numel() for v in values))
        self.device = device
        self.work = torch.empty(size, dtype=torch.float32, device=device)
        cast = any(v.dtype != torch.float32 for v in values)
        self.cast = torch.empty(size, dtype=torch.float32, device=device) if cast else None
        cpu = device.type == "cpu"
        self.ints = torch.empty(size, dtype=torch.int32, device=device) if cpu else None

    def float32(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return x
        return self.cast[: x.numel()].copy_(x)  # type: ignore[index]


def _finite_ranges(values: list[Tensor], scratch: _Scratch) -> tuple[Tensor, Tensor]:
    """Smallest and largest finite value of each (non-empty) tensor, float32; a tensor without finite
    values gets ``(FMAX, -FMAX)``, an empty range."""
    device = scratch.device
    pieces, owner = _pieces(values, device)
    los: list[Tensor] = []
    his: list[Tensor] = []
    for piece in pieces:  # non-finite values replaced by a value that cannot win
        x = scratch.float32(piece)
        w = scratch.work[: x.numel()]
        los.append(torch.nan_to_num(x, _FMAX, _FMAX, _FMAX, out=w).amin())
        his.append(torch.nan_to_num(x, -_FMAX, -_FMAX, -_FMAX, out=w).amax())
    n = len(values)
    if len(pieces) == n:  # one piece a tensor
        return torch.stack(los), torch.stack(his)
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)
    inf = float("inf")
    lo = torch.full((n,), inf, device=device).scatter_reduce_(0, owner_t, torch.stack(los), "amin")
    hi = torch.full((n,), -inf, device=device).scatter_reduce_(0, owner_t, torch.stack(his), "amax")
    return lo, hi


@dataclass(frozen=True)
class _BucketMap:
    """Per-tensor bucket mapping ``y = (x * a - b) * c``: finite ``x`` in ``[lo, hi]`` lands in
    ``[0, bins]``. The difference ``x * a - b`` is exact for nearby values (a narrow range far from zero
    keeps its resolution); ``a = 1/2`` only where ``hi - lo`` would overflow float32. Constant tensors
    (and those without finite values) are ``flat``: ``c = 1``, they land in bucket 0 and are moved to the
    middle bucket, with edges ``value -/+ 0.5``. ``inv_pow2`` is ``2**-e`` with ``2**e >= max |x|``: sums
    are taken over ``x * inv_pow2`` (exact scaling), so neither they nor the squares overflow float32."""

    a: Tensor
    neg_b: Tensor
    c: Tensor
    flat: Tensor
    pow2: Tensor
    inv_pow2: Tensor

    @classmethod
    def build(cls, lo: Tensor, hi: Tensor, bins: int) -> _BucketMap:
        acc = wide_dtype(lo.device)
        lo, hi = lo.float(), hi.float()
        width = hi.to(acc) - lo.to(acc)
        scale = (bins / width).float()
        flat = ~(width > 0) | ~torch.isfinite(scale)
        half = width > _FMAX
        a = torch.where(half, torch.full_like(lo, 0.5), torch.ones_like(lo))
        lo_or_zero = torch.where(lo <= hi, lo, torch.zeros_like(lo))  # no inf * 0 for empty ranges
        c = torch.where(flat, torch.ones_like(scale), scale / a)
        m = torch.maximum(lo_or_zero.abs(), torch.where(lo <= hi, hi, torch.zeros_like(hi)).abs())
        m = torch.where(m > 0, m, torch.ones_like(m))
        _, exponent = torch.frexp(m)
        pow2 = torch.ldexp(torch.ones_like(m, dtype=acc), exponent)
        inv_pow2 = torch.ldexp(torch.ones_like(m), -exponent)
        return cls(a, -(lo_or_zero * a), c, flat, pow2, inv_pow2)


def _binned_rows(values: list[Tensor], lo: Tensor, hi: Tensor, bins: int, scratch: _Scratch) -> Tensor:
    """Sum, sum of squares, non-finite count and the ``bins`` bucket counts of each (non-empty) tensor,
    binned over ``[lo, hi]``: a ``(len(values), 3 + bins)`` tensor in the wide dtype."""
    device = lo.device
    acc = wide_dtype(device)
    pieces, owner = _pieces(values, device)
    bmap = _BucketMap.build(lo, hi, bins)
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)
    # One 0-d view per piece and parameter, taken with one op each.
    a_p, nb_p, c_p, inv_p = (t[owner_t].unbind() for t in (bmap.a, bmap.neg_b, bmap.c, bmap.inv_pow2))
    # Bucket ``bins`` collects x == max (folded below), bucket ``bins + 1`` the non-finite values.
    trash = float(bins + 1)
    sums: list[Tensor] = []
    squares: list[Tensor] = []
    counts: list[Tensor] = []
    for j, piece in enumerate(pieces):
        x = scratch.float32(piece)
        w = scratch.work[: x.numel()]
        torch.mul(x, inv_p[j], out=w).nan_to_num_(0.0, 0.0, 0.0)
        sums.append(w.sum())
        squares.append(torch.dot(w, w))
        torch.mul(x, a_p[j], out=w).add_(nb_p[j]).mul_(c_p[j]).nan_to_num_(trash, trash, trash)
        counts.append(_bucket_counts(w, bins, scratch.ints))
    n = len(values)
    zeros = torch.zeros(n, dtype=acc, device=device)
    total = zeros.index_add(0, owner_t, torch.stack(sums).to(acc)) * bmap.pow2
    sum_sq = zeros.index_add(0, owner_t, torch.stack(squares).to(acc)) * bmap.pow2.square()
    c = torch.zeros(n, bins + 2, dtype=acc, device=device).index_add_(0, owner_t, torch.stack(counts).to(acc))
    c[:, bins - 1] += c[:, bins]
    flat = bmap.flat
    middle = torch.where(flat, c[:, 0], c[:, bins // 2])
    c[:, 0] = torch.where(flat, torch.zeros_like(middle), c[:, 0])
    c[:, bins // 2] = middle
    return torch.cat([total[:, None], sum_sq[:, None], c[:, bins + 1 :], c[:, :bins]], dim=1)


def _assemble(lo: Tensor, hi: Tensor, body: Tensor, bins: int) -> Tensor:
    """The rows of :func:`histogram_stats` from the ranges and the rows of :func:`_binned_rows`."""
    acc = body.dtype
    finite = lo <= hi
    lo_acc = torch.where(finite, lo.to(acc), torch.zeros_like(body[:, 0]))
    hi_acc = torch.where(finite, hi.to(acc), torch.zeros_like(body[:, 0]))
    flat = _BucketMap.build(lo, hi, bins).flat
    mid = (lo_acc + hi_acc) / 2
    edge_lo = torch.where(flat, mid - 0.5, lo_acc)
    edge_hi = torch.where(flat, mid + 0.5, hi_acc)
    # Rows without any finite value: min/max/sums are meaningless, report zeros.
    total = torch.where(finite, body[:, 0], torch.zeros_like(body[:, 0]))
    sum_sq = torch.where(finite, body[:, 1], torch.zeros_like(body[:, 1]))
    head = torch.stack([lo_acc, hi_acc, total, sum_sq, body[:, 2], edge_lo, edge_hi], dim=1)
    rows = torch.cat([head, body[:, 3:]], dim=1)
    present = finite | (body[:, 2] > 0)  # None and empty tensors: a row of zeros
    return torch.where(present[:, None], rows, torch.zeros_like(rows))


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
