"""Step-time overhead of GradientMonitor against a bare fit and the documented Lightning snippet.

The snippet is Lightning's own recipe for gradient norms::

    def on_before_optimizer_step(self, optimizer):
        self.log_dict(grad_norm(self, norm_type=2))

Run: ``python benchmarks/monitor_overhead.py [--repeats 3] [--steps-resnet 60] [--steps-mlp 200]``.
Prints a markdown table of median step times and ratios to the bare fit, all measured in one run.

Whole-step times on a shared CPU vary by several per cent between fits, so each fit also times the
per-step hooks alone (``hook_ms``: the monitor's hooks or the snippet's ``on_before_optimizer_step``,
mean per step, logging steps included), and ``hooks_ratio`` is the step-time ratio to the bare fit
they imply: ``(bare + hook) / bare``. (The snippet's values are written by Lightning after the hook, every
``log_every_n_steps``; the monitor writes its own within the hook, so its hook time includes writing.)
"""

from __future__ import annotations

import argparse
from typing import Any

from _common import Classifier, machine, markdown, run_table, time_fit_and_hooks
from lightning.pytorch.utilities import grad_norm

from stability_callbacks import GradientMonitor


class SnippetClassifier(Classifier):
    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.log_dict(grad_norm(self, norm_type=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-resnet", type=int, default=60)
    parser.add_argument("--steps-mlp", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mlp300"])
    args = parser.parse_args()

    variants = {
        "bare": lambda m, s: time_fit_and_hooks(m, [], s),
        "GradientMonitor every 50": lambda m, s: time_fit_and_hooks(
            m, [GradientMonitor(log_every_n_steps=50)], s
        ),
        "GradientMonitor every 50, rules every 10": lambda m, s: time_fit_and_hooks(
            m, [GradientMonitor(log_every_n_steps=50, sample_every_n_steps=10)], s
        ),
        "GradientMonitor every step": lambda m, s: time_fit_and_hooks(
            m, [GradientMonitor(log_every_n_steps=1)], s
        ),
        "Lightning grad_norm snippet": lambda m, s: time_fit_and_hooks(
            m, [], s, module_cls=SnippetClassifier
        ),
    }
    steps = {"resnet18": args.steps_resnet, "mlp300": args.steps_mlp}
    rows = run_table(variants, args.models, steps, args.repeats)
    print(f"GradientMonitor overhead on {machine()}, median of {args.repeats} repetitions\n")
    print(markdown(rows, extra=["hook_ms", "hooks_ratio"]))


if __name__ == "__main__":
    main()
