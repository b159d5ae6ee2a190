"""Run every benchmark of the project and write their tables to ``benchmarks/RESULTS.md``.

Each benchmark runs in a fresh process, one after the other (never in parallel: they time wall
clock), and prints markdown tables whose ratios are measured within that one run. This script
gathers them under a header that describes the machine.

Run from the repository root::

    python -m benchmarks                       # everything, about half an hour on a 2-core CPU
    python -m benchmarks --only monitor scaling  # re-run two; the other sections of the file stay
    python -m benchmarks --output benchmarks/RESULTS-gpu.md   # on a GPU machine
    python -m benchmarks --threads 1           # steadier timings on a shared CPU
    python -m benchmarks --dry-run             # print the commands only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    script: str
    args: tuple[str, ...] = ()

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / self.script), *self.args]

    def shown(self) -> str:
        return " ".join(["python", f"benchmarks/{self.script}", *self.args])


BENCHMARKS = [
    Benchmark(
        "monitor",
        "GradientMonitor vs a bare fit and Lightning's grad_norm snippet",
        "monitor_overhead.py",
        ("--repeats", "3"),
    ),
    Benchmark(
        "clipping",
        "Clippers and NonFiniteGuard vs gradient_clip_val and the peer packages",
        "clipping_overhead.py",
        ("--repeats", "3", "--steps-resnet", "40", "--steps-mlp", "150"),
    ),
    Benchmark(
        "histograms",
        "HistogramLogger vs SummaryWriter.add_histogram",
        "histogram_speed.py",
        ("--reps", "3"),
    ),
    Benchmark(
        "autopilot",
        "StabilityAutopilot when nothing goes wrong, and one snapshot",
        "autopilot_overhead.py",
        ("--repeats", "5"),
    ),
    Benchmark(
        "faults",
        "Fault injection: the autopilot against no remedy, ZClip, NormClip and SpikeDetection",
        "fault_injection.py",
        ("--steps", "300", "--fault-step", "150"),
    ),
    Benchmark(
        "scaling",
        "Overhead growth with tensor count and parameter count",
        "scaling.py",
        ("--repeats", "3"),
    ),
    Benchmark(
        "norms",
        "Logged gradient norms of the sigmoid recipe against a float64 reference",
        "norm_accuracy.py",
        ("--steps", "30"),
    ),
]


def describe_machine() -> list[str]:
    import lightning
    import torch

    python = f"Python {platform.python_version()}"
    lines = [f"- {python}, torch {torch.__version__}, lightning {lightning.__version__}"]
    if torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    lines.append(
        f"- CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{platform.system()} {platform.release()}"
    )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        lines.append(f"- commit {commit}")
    except (OSError, subprocess.CalledProcessError):
        pass
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    names = [b.name for b in BENCHMARKS]
    parser.add_argument("--only", nargs="+", choices=names, default=names, help="benchmarks to run")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per benchmark (0: torch's default); 1 steadies timings on a shared machine",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if b.name in args.only]
    if args.dry_run:
        for b in chosen:
            print(b.shown())
        return 0

    machine = describe_machine()  # the commit measured is the one checked out when the run starts
    commit = next((line[len("- commit ") :] for line in machine if line.startswith("- commit ")), "?")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    command = "python -m benchmarks" + (f" --threads {args.threads}" if args.threads else "")
    today = datetime.date.today().isoformat()
    sections = _read_sections(args.output) if set(args.only) != set(names) else {}
    failed: list[str] = []
    for b in chosen:
        print(f"[{b.name}] {b.shown()}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(b.command(), cwd=ROOT, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t0
        body = proc.stdout.strip()
        if proc.returncode != 0:
            failed.append(b.name)
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            body += f"\n\nFAILED with exit code {proc.returncode}:\n\n```\n{tail}\n```"
        sections[b.title] = (
            f"`{b.shown()}` ({seconds / 60:.1f} min; `{command}`, commit {commit}, {today})\n\n{body}\n"
        )
        print(body + "\n", flush=True)

    header = [
        "# Benchmark results",
        "",
        f"Written by `{command}`; each section names the commit and the day it was measured.",
        "Every ratio compares variants timed in the same run, interleaved, median of the repetitions.",
        "",
        *(line for line in machine if not line.startswith("- commit ")),
        "",
    ]
    ordered = [b.title for b in BENCHMARKS if b.title in sections]
    ordered += [title for title in sections if title not in ordered]  # sections of no known benchmark
    body = "\n".join(f"## {title}\n\n{sections[title]}" for title in ordered)
    args.output.write_text("\n".join(header) + "\n" + body)
    print(f"wrote {args.output}")
    return 1 if failed else 0


def _read_sections(path: Path) -> dict[str, str]:
    """The ``## title`` sections of an earlier results file, title -> text (empty if there is none)."""
    if not path.exists():
        return {}
    sections: dict[str, str] = {}
    title: str | None = None
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = ""
        elif title is not None:
            sections[title] += line
    return {t: text.lstrip("\n") for t, text in sections.items()}


if __name__ == "__main__":
    raise SystemExit(main())
