"""Histogram speed: device-side histograms vs ``SummaryWriter.add_histogram``, and the fit overhead.

Three measurements, each the median of ``--reps`` interleaved repetitions in one run:

1. one histogram step for resnet18's weights and gradients (124 tensors, 22M values): our path
   (``histogram_stats`` + one transfer + ``add_histogram_raw``) vs a loop of
   ``SummaryWriter.add_histogram`` over the same tensors with the same number of bins, both writing
   to an event file;
2. the extra host memory of each (``tracemalloc`` peak: Python and NumPy allocations), against the
   bound ``bins x tensors``; torch's own scratch buffers (a few chunk-sized buffers, on the
   tensors' device) are not seen by tracemalloc and are printed apart;
3. the fit-level overhead of ``HistogramLogger(every_n_steps=100)`` against a bare fit.

Usage::

    python benchmarks/histogram_speed.py                 # a few minutes on a laptop CPU
    python benchmarks/histogram_speed.py --reps 5 --steps 200
    python benchmarks/histogram_speed.py --threads 1    # a shared machine: spinning OpenMP threads
                                                        # stall every torch op when cores are busy
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS, machine, run_table, time_fit_and_hooks

from stability_callbacks.histogram_math import _CHUNK_ACCELERATOR, _CHUNK_CPU
from stability_callbacks.histograms import (
    HistogramLogger,
    grad_flow_image,
    histogram_stats,
    to_histograms,
    write_histograms,
)


def resnet18_tensors(device: torch.device) -> tuple[list[str], list[Tensor]]:
    """Tags and tensors of resnet18's weights and gradients after one backward pass."""
    factory, shape, batch_size = MODELS["resnet18"]
    torch.manual_seed(0)
    model = factory().to(device)
    x = torch.randn(batch_size, *shape, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    tags: list[str] = []
    tensors: list[Tensor] = []
    for kind in ("weights", "grads"):
        for name, p in model.named_parameters():
            tags.append(f"{kind}/{name}")
            tensors.append(p.detach() if kind == "weights" else p.grad)  # type: ignore[arg-type]
    return tags, tensors


def ours(writer: SummaryWriter, tags: list[str], tensors: list[Tensor], bins: int, step: int) -> None:
    hists = to_histograms(histogram_stats(tensors, bins))  # one device-to-host transfer
    write_histograms(writer, dict(zip(tags, hists, strict=True)), step)


def add_histogram_loop(
    writer: SummaryWriter, tags: list[str], tensors: list[Tensor], bins: int, step: int
) -> None:
    for tag, t in zip(tags, tensors, strict=True):
        writer.add_histogram(tag, t, step, bins=bins)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    # Let the worker threads of the previous variant go idle first: NumPy's OpenBLAS threads spin for
    # a while after ``add_histogram``'s dot product and would steal a core from the next measurement.
    time.sleep(0.3)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def traced_peak(fn: Callable[[], None]) -> int:
    """Peak bytes allocated through Python and NumPy while ``fn`` runs (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - base


def time_picture(tensors: list[Tensor], reps: int) -> list[float]:
    """Times of drawing the gradient-flow picture for the layers of ``tensors`` (the first is a warm-up)."""
    names = [f"param.{i}" for i in range(len(tensors) // 2)]
    means = [float(t.abs().mean()) for t in tensors[len(tensors) // 2 :]]
    maxes = [float(t.abs().max()) for t in tensors[len(tensors) // 2 :]]
    out = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        grad_flow_image(names, means, maxes)
        out.append(time.perf_counter() - t0)
    return out[1:]


def histogram_step_table(reps: int, bins: int, device: torch.device) -> tuple[str, dict[str, Any]]:
    tags, tensors = resnet18_tensors(device)
    values = sum(t.numel() for t in tensors)
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        ready = dict(zip(tags, to_histograms(histogram_stats(tensors, bins)), strict=True))
        variants: dict[str, Callable[[int], None]] = {
            "add_histogram loop": lambda s: add_histogram_loop(writer, tags, tensors, bins, s),
            "HistogramLogger path": lambda s: ours(writer, tags, tensors, bins, s),
            # What both paths pay to write the records: TensorBoard's event writer computes each
            # record's CRC-32C in pure Python, so this is the floor of any histogram step.
            "writing the records alone": lambda s: write_histograms(writer, ready, s),
        }
        for fn in variants.values():  # warm-up: allocator, NumPy, protobuf
            fn(0)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(reps):
            for name, fn in variants.items():
                times[name].append(time_once(lambda fn=fn, rep=rep: fn(rep + 1), device))  # type: ignore[misc]
        mem = {name: traced_peak(lambda fn=fn: fn(reps + 1)) for name, fn in variants.items()}  # type: ignore[misc]
        writer.close()
    base = statistics.median(times["add_histogram loop"])
    bound = bins * len(tensors)
    lines = [
        f"resnet18 weights + grads: {len(tensors)} tensors, {values / 1e6:.1f}M values, {bins} bins, "
        f"median of {reps}",
        "",
        "| variant | step_ms | speed-up | tracemalloc peak (KiB) | peak / (bins x tensors) (bytes) |",
        "|---|---|---|---|---|",
    ]
    for name in variants:
        med = statistics.median(times[name])
        kib, per_value = mem[name] / 1024, mem[name] / bound
        lines.append(f"| {name} | {med * 1e3:.1f} | {base / med:.1f}x | {kib:.0f} | {per_value:.1f} |")
    cpu = device.type == "cpu"
    chunk = min(_CHUNK_CPU if cpu else _CHUNK_ACCELERATOR, max(t.numel() for t in tensors))
    buffers = "two float32 and one int32 buffer" if cpu else "two float32 buffers"
    lines += [
        "",
        f"scratch buffers of our path (torch allocator, not in tracemalloc): at most "
        f"{(2 * 4 + (4 if cpu else 0)) * chunk / 2**20:.1f} MiB ({buffers} of one chunk of {chunk} values)",
    ]
    picture = statistics.median(time_picture(tensors, reps))
    lines.append(
        f"\ngradient-flow picture of resnet18's {len(tensors) // 2} parameter layers (matplotlib, drawn on "
        f"every fifth histogram step by default): {picture * 1e3:.0f} ms"
    )
    speedup = base / statistics.median(times["HistogramLogger path"])
    floor = base / statistics.median(times["writing the records alone"])
    summary = {"speedup": speedup, "floor": floor, "ours_bytes": mem["HistogramLogger path"], "bound": bound}
    return "\n".join(lines), summary


def fit_table(reps: int, steps: int, every: int) -> str:
    variants = {
        "bare": lambda model, n: time_fit_and_hooks(model, [], n),
        f"HistogramLogger(every_n_steps={every})": lambda model, n: time_fit_and_hooks(
            model, [HistogramLogger(every_n_steps=every)], n
        ),
    }
    rows = run_table(variants, ["resnet18"], {"resnet18": steps}, reps)  # type: ignore[arg-type]
    lines = [
        f"fit overhead, resnet18 (batch 32, 3x32x32), {steps} timed steps (includes "
        f"{steps // every} histogram step(s); the default picture cadence is 5x that), median of {reps}",
        "",
        "| model | variant | step_ms | ratio | hook_ms | hooks_ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['step_ms']:.1f} | {r['ratio']:.3f}x "
            f"| {r['hook_ms']:.2f} | {r['hooks_ratio']:.3f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median), at least 3")
    parser.add_argument("--bins", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="timed fit steps (>= every to include a log)")
    parser.add_argument("--every", type=int, default=100, help="HistogramLogger(every_n_steps=...)")
    parser.add_argument("--skip-fit", action="store_true", help="only the histogram-step table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.reps < 3:
        parser.error("--reps must be at least 3")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# histogram speed on {machine()}\n")
    table, summary = histogram_step_table(args.reps, args.bins, device)
    print(table + "\n")
    print(
        f"speed-up: {summary['speedup']:.1f}x (target >= 10x on CPU; TensorBoard's writer alone caps it "
        f"at {summary['floor']:.1f}x)\n"
    )
    if not args.skip_fit:
        print(fit_table(args.reps, args.steps, args.every))


if __name__ == "__main__":
    main()
