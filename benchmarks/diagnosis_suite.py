"""GradientMonitor on the labelled diagnosis suite: precision and recall per category, onset to first flag.

Runs the fourteen short CPU runs of ``tests/diagnosis_runs.py`` (the runs ``tests/test_diagnosis_suite.py``
checks), each watched on the same gradients by the monitors of ``diagnosis_runs.MONITORS`` (the default
``GradientMonitor`` logging every step and every 50 steps; one whose rules see every step), and prints,
per monitor and category, how many runs have the truth, how many the monitor flagged, precision, recall,
and the steps from the truth's onset to the first flag; then one line per run.

Run: ``python benchmarks/diagnosis_suite.py [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from diagnosis_runs import CASES, MONITORS, Result, run_case, scores


def _delays(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):g} (max {max(values)})"


def _fmt(flags: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(flags.items(), key=lambda kv: kv[1])) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only the cases with these names")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    cases = [c for c in CASES if not args.only or c.name in args.only]
    results: list[Result] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for case in cases:
            results.append(run_case(case, root))
    took = time.perf_counter() - t0

    print(f"GradientMonitor on {len(results)} labelled runs, {took:.0f} s on CPU\n")
    print("| monitor | category | runs | flagged | precision | recall | onset to first flag, steps |")
    print("|---|---|---|---|---|---|---|")
    for monitor in MONITORS:
        for s in scores(results, monitor):
            cells = [
                monitor,
                s.category,
                s.runs,
                s.flagged,
                f"{s.precision:.2f}",
                f"{s.recall:.2f}",
                _delays(s.delays),
            ]
            print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n| run | category | truths (onset step) | " + " | ".join(f"flags: {m}" for m in MONITORS) + " |")
    print("|---|---|---|" + "---|" * len(MONITORS))
    for r in results:
        cells = [r.case.name, r.case.category, _fmt(r.truths), *(_fmt(r.first_flagged[m]) for m in MONITORS)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
