"""Step-time overhead of the clipping callbacks and NonFiniteGuard against a bare fit, Lightning's
``Trainer(gradient_clip_val=...)`` and the peers' callbacks (zclip, smartclip, autoclip, timm's AGC).

Run: ``python benchmarks/clipping_overhead.py [--repeats 3] [--steps-resnet 20] [--steps-mlp 100]
[--only AGC "peer: timm"]``.
Prints a markdown table of median step times, the ratio to the bare fit and the ratio to
``gradient_clip_val``, all measured in one run (variants interleaved within each repetition).

Whole-step times on a shared CPU vary by several per cent between fits, more than the clipping costs,
so each fit also times the per-step hooks alone (``hook_ms``: the callback's hooks, or Lightning's
clipping for ``gradient_clip_val``); ``hooks_ratio`` and ``hooks_vs_clip_val`` are the step-time
ratios they imply: ``(bare + hook) / bare`` and ``(bare + hook) / (bare + clip_val hook)``.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import lightning.pytorch as pl
import smartclip as sc
from _common import machine, markdown, run_table, time_fit_and_hooks
from autoclip.torch import QuantileClip
from lightning.pytorch.callbacks import Callback
from timm.utils.agc import adaptive_clip_grad
from zclip import ZClipLightningCallback

from stability_callbacks.clipping import AGC, AutoClip, NormClip, ValueClip, ZClip
from stability_callbacks.guard import NonFiniteGuard


class QuantileClipCallback(Callback):
    """autoclip's ``QuantileClip(global_threshold=True)`` called before each optimizer step."""

    def __init__(self) -> None:
        self.clipper: QuantileClip | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        if self.clipper is None:
            self.clipper = QuantileClip(list(pl_module.parameters()), quantile=0.1, global_threshold=True)
        self.clipper.step()


class SmartClipCallback(Callback):
    """smartclip's Lightning callback, verbatim: ``smartclip.apply(pl_module, clipper)`` before each step.

    (Its own module, ``smartclip.backends.torch.integrate``, cannot be imported without ``transformers``.)
    """

    def __init__(self, clipper: Any) -> None:
        self.clipper = clipper

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        sc.apply(pl_module, self.clipper)


class TimmAGCCallback(Callback):
    """timm's ``adaptive_clip_grad`` called before each optimizer step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        adaptive_clip_grad(pl_module.parameters(), clip_factor=0.01, eps=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-resnet", type=int, default=20)
    parser.add_argument("--steps-mlp", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mlp300"])
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="time only the variants whose name starts with one of these (bare and gradient_clip_val always)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    def fit(callbacks: list[Callback], **trainer_kwargs: Any) -> Any:
        return lambda m, s: time_fit_and_hooks(m, callbacks, s, trainer_kwargs=trainer_kwargs)

    variants = {
        "bare": lambda m, s: time_fit_and_hooks(m, [], s),
        "gradient_clip_val=1.0": lambda m, s: time_fit_and_hooks(
            m, [], s, trainer_kwargs={"gradient_clip_val": 1.0}
        ),
        "NormClip(1.0)": lambda m, s: time_fit_and_hooks(m, [NormClip(1.0)], s),
        "ValueClip(1.0)": lambda m, s: time_fit_and_hooks(m, [ValueClip(1.0)], s),
        "AutoClip()": lambda m, s: time_fit_and_hooks(m, [AutoClip()], s),
        "ZClip()": lambda m, s: time_fit_and_hooks(m, [ZClip()], s),
        "AGC()": lambda m, s: time_fit_and_hooks(m, [AGC()], s),
        "NonFiniteGuard()": lambda m, s: time_fit_and_hooks(m, [NonFiniteGuard()], s),
        "peer: zclip ZClipLightningCallback": lambda m, s: time_fit_and_hooks(
            m, [ZClipLightningCallback(max_grad_norm=None)], s
        ),
        "peer: smartclip AutoClip": lambda m, s: time_fit_and_hooks(m, [SmartClipCallback(sc.AutoClip())], s),
        "peer: smartclip AGC": lambda m, s: time_fit_and_hooks(m, [SmartClipCallback(sc.AGC())], s),
        "peer: autoclip QuantileClip": lambda m, s: time_fit_and_hooks(m, [QuantileClipCallback()], s),
        "peer: timm adaptive_clip_grad": lambda m, s: time_fit_and_hooks(m, [TimmAGCCallback()], s),
    }
    if args.only:
        keep = ("bare", "gradient_clip_val", *args.only)
        variants = {name: run for name, run in variants.items() if name.startswith(keep)}
    steps = {"resnet18": args.steps_resnet, "mlp300": args.steps_mlp}
    rows = run_table(variants, args.models, steps, args.repeats)
    for model in args.models:
        mine = [r for r in rows if r["model"] == model]
        bare = next(r for r in mine if r["variant"] == "bare")
        clip_val = next(r for r in mine if r["variant"] == "gradient_clip_val=1.0")
        for r in mine:
            r["vs_clip_val"] = r["step_ms"] / clip_val["step_ms"]
            implied = bare["step_ms"] - bare["hook_ms"] + r["hook_ms"]
            r["hooks_vs_clip_val"] = implied / (bare["step_ms"] - bare["hook_ms"] + clip_val["hook_ms"])
    print(f"Clipping overhead on {machine()}, median of {args.repeats} repetitions\n")
    print(markdown(rows, extra=["vs_clip_val", "hook_ms", "hooks_ratio", "hooks_vs_clip_val"]))


if __name__ == "__main__":
    main()
