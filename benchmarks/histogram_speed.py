"""Histogram speed: device-side histograms vs ``SummaryWriter.add_histogram``, and the fit overhead.

Three measurements in one run: the histogram step takes the minimum of ``--reps`` interleaved
repetitions (the least disturbed one on a shared machine), the fit overhead the median:

1. one histogram step for resnet18's weights and gradients (124 tensors, 22M values): our path
   (``histogram_stats`` + one transfer + ``add_histogram_raw``) vs a loop of
   ``SummaryWriter.add_histogram`` over the same tensors with the same number of bins, both writing
   to an event file (each timing ends with ``writer.flush()``: TensorBoard's writer thread computes
   the records' checksums after ``add_*`` returns). Each path runs with TensorBoard's pure-Python
   CRC-32C and, when ``google-crc32c`` or ``crc32c`` is installed, with the C one that
   ``HistogramLogger`` installs (:mod:`stability_callbacks.tb_crc`); the device math and the writing
   are also timed alone, to show where the time goes;
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
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as python_masked_crc32c
from tensorboard.summary.writer import record_writer

from stability_callbacks.histogram_math import _CHUNK_ACCELERATOR, _CHUNK_CPU
from stability_callbacks.histograms import (
    HistogramLogger,
    fetch_to_host,
    grad_flow_image,
    histogram_stats,
    to_histograms,
    write_histograms,
)
from stability_callbacks.tb_crc import c_crc32c, fast_masked_crc32c


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


def with_crc(c: bool, fn: Callable[[int], None]) -> Callable[[int], None]:
    """``fn`` run with TensorBoard's record writer using the C CRC-32C (``c``) or its pure-Python one."""

    def run(step: int) -> None:
        record_writer.masked_crc32c = fast_masked_crc32c if c else python_masked_crc32c
        try:
            fn(step)
        finally:
            record_writer.masked_crc32c = python_masked_crc32c

    return run


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

        def loop(s: int) -> None:
            add_histogram_loop(writer, tags, tensors, bins, s)
            writer.flush()

        def path(s: int) -> None:
            ours(writer, tags, tensors, bins, s)
            writer.flush()

        def records(s: int) -> None:
            write_histograms(writer, ready, s)
            writer.flush()

        variants: dict[str, Callable[[int], None]] = {
            "add_histogram loop": with_crc(False, loop),
            "HistogramLogger path": with_crc(False, path),
            # What both paths pay to write the records: protobufs, the checksums, the file.
            "writing the records alone": with_crc(False, records),
        }
        if c_crc32c is not None:
            variants["add_histogram loop, C CRC"] = with_crc(True, loop)
            variants["HistogramLogger path, C CRC"] = with_crc(True, path)
            variants["writing the records alone, C CRC"] = with_crc(True, records)
        # The device math of our path and its one transfer, without any writing.
        variants["histogram_stats + transfer alone"] = lambda s: fetch_to_host(
            [histogram_stats(tensors, bins)]
        )
        for fn in variants.values():  # warm-up: allocator, NumPy, protobuf
            fn(0)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(reps):
            for name, fn in variants.items():
                times[name].append(time_once(lambda fn=fn, rep=rep: fn(rep + 1), device))  # type: ignore[misc]
        mem = {name: traced_peak(lambda fn=fn: fn(reps + 1)) for name, fn in variants.items()}  # type: ignore[misc]
        writer.close()
    med = {name: min(t) for name, t in times.items()}
    base = med["add_histogram loop"]
    bound = bins * len(tensors)
    lines = [
        f"resnet18 weights + grads: {len(tensors)} tensors, {values / 1e6:.1f}M values, {bins} bins, "
        f"best of {reps}; speed-up against the add_histogram loop with TensorBoard's own writer"
        + ("" if c_crc32c is not None else " (no C CRC-32C package installed: pip install google-crc32c)"),
        "",
        "| variant | step_ms | speed-up | tracemalloc peak (KiB) | peak / (bins x tensors) (bytes) |",
        "|---|---|---|---|---|",
    ]
    for name in variants:
        kib, per_value = mem[name] / 1024, mem[name] / bound
        lines.append(
            f"| {name} | {med[name] * 1e3:.1f} | {base / med[name]:.1f}x | {kib:.0f} | {per_value:.1f} |"
        )
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
    fast = c_crc32c is not None
    ours_name = "HistogramLogger path, C CRC" if fast else "HistogramLogger path"
    summary = {
        "speedup": base / med[ours_name],
        "speedup_same_writer": (med["add_histogram loop, C CRC"] if fast else base) / med[ours_name],
        "speedup_python_crc": base / med["HistogramLogger path"],
        "floor": base / med["writing the records alone, C CRC" if fast else "writing the records alone"],
        "math_ms": med["histogram_stats + transfer alone"] * 1e3,
        "ours_ms": med[ours_name] * 1e3,
        "fast": fast,
        "ours_bytes": mem[ours_name],
        "bound": bound,
    }
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
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions (best of, median for the fit), at least 3"
    )
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
    crc = "with the C CRC-32C" if summary["fast"] else "with TensorBoard's pure-Python CRC-32C"
    print(
        f"speed-up: {summary['speedup']:.1f}x {crc} (target >= 10x on CPU; "
        f"{summary['speedup_python_crc']:.1f}x with the pure-Python CRC, "
        f"{summary['speedup_same_writer']:.1f}x against an add_histogram loop that writes with the same "
        f"CRC). Of our {summary['ours_ms']:.0f} ms, the device math and its transfer take "
        f"{summary['math_ms']:.0f} ms; "
        f"writing the records alone caps the speed-up at {summary['floor']:.1f}x\n"
    )
    if not args.skip_fit:
        print(fit_table(args.reps, args.steps, args.every))


if __name__ == "__main__":
    main()
