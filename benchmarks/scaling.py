"""How the callbacks' overhead grows with the number of parameter tensors and with the parameter count.

Two families of ReLU MLPs of square ``Linear`` layers (weight and bias: two tensors a layer), trained
with momentum SGD on random data, batch 64:

- **tensor count**: 10, 100 and 1000 tensors at an equal parameter count (about 1M): 5 layers of
  width 447, 50 of width 141, 500 of width 44. Per-tensor costs (kernel launches, Python loops,
  one host read per tensor) show here;
- **parameter count**: 100 tensors (50 layers) at about 0.1M, 1M and 10M parameters. Per-value costs
  (reading every gradient once more) show here.

Each variant is timed against a bare fit in the same run (median of ``--repeats`` interleaved
repetitions); the ratio is step time over the bare fit's.

Run: ``python benchmarks/scaling.py [--repeats 3] [--steps 60]``.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from typing import Any

from _common import MODELS, Classifier, machine, markdown, run_table, time_fit_and_hooks
from lightning.pytorch.utilities import grad_norm
from torch import nn

from stability_callbacks import AGC, GradientMonitor, NonFiniteGuard, ZClip


class SnippetClassifier(Classifier):
    """Lightning's documented recipe: ``self.log_dict(grad_norm(self, norm_type=2))`` every step."""

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.log_dict(grad_norm(self, norm_type=2))


def square_mlp(layers: int, width: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(width, width))
            if i < layers - 1:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)

    return build


def width_for(params: float, layers: int) -> int:
    """Width ``w`` with ``layers * (w * w + w)`` closest to ``params``."""
    return max(10, round((-1 + math.sqrt(1 + 4 * params / layers)) / 2))


def register(tensors: int, params: float) -> str:
    """Add the MLP with ``tensors`` parameter tensors and about ``params`` parameters to the model table."""
    layers = tensors // 2
    width = width_for(params, layers)
    count = layers * (width * width + width)
    name = f"{tensors} tensors, {count / 1e6:.2g}M params (width {width})"
    MODELS[name] = (square_mlp(layers, width), (width,), 64)
    return name


VARIANTS: dict[str, Callable[[str, int], float]] = {
    "bare": lambda m, s: time_fit_and_hooks(m, [], s),
    "GradientMonitor every 50": lambda m, s: time_fit_and_hooks(
        m, [GradientMonitor(log_every_n_steps=50)], s
    ),
    "GradientMonitor every step": lambda m, s: time_fit_and_hooks(
        m, [GradientMonitor(log_every_n_steps=1)], s
    ),
    "Lightning grad_norm snippet": lambda m, s: time_fit_and_hooks(m, [], s, module_cls=SnippetClassifier),
    "gradient_clip_val=1.0": lambda m, s: time_fit_and_hooks(
        m, [], s, trainer_kwargs={"gradient_clip_val": 1.0}
    ),
    "ZClip()": lambda m, s: time_fit_and_hooks(m, [ZClip()], s),
    "AGC()": lambda m, s: time_fit_and_hooks(m, [AGC()], s),
    "NonFiniteGuard()": lambda m, s: time_fit_and_hooks(m, [NonFiniteGuard()], s),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    variants = {name: VARIANTS[name] for name in ["bare", *args.variants] if name in VARIANTS}

    print(f"Overhead growth on {machine()}, median of {args.repeats} repetitions\n")
    families = {
        "equal parameter count (about 1M), more tensors": [register(n, 1e6) for n in (10, 100, 1000)],
        "100 tensors, more parameters": [register(100, p) for p in (1e5, 1e6, 1e7)],
    }
    models = list(dict.fromkeys(m for family in families.values() for m in family))
    rows = run_table(variants, models, dict.fromkeys(models, args.steps), args.repeats)
    for title, family in families.items():
        print(f"### {title}\n")
        print(
            markdown([r for m in family for r in rows if r["model"] == m], extra=["hook_ms", "hooks_ratio"])
            + "\n"
        )


if __name__ == "__main__":
    main()
