"""What StabilityAutopilot costs when nothing goes wrong, and what one snapshot costs.

Step time of a fit with ``StabilityAutopilot(snapshot_every_n_steps=100)`` (ZClip, NonFiniteGuard,
the vanishing watch and the loss-spike check all on) against a bare fit and against a fit with only
``ZClip()``, on torchvision's resnet18 and a 300-layer narrow MLP, timed after the vanishing watch of
the first ``reinit_watch_steps`` steps (what every later step of a long run costs); then what a step
inside that watch costs, and the time and memory of one snapshot of model and optimizer state, on the
host and on the device.

Run: ``python benchmarks/autopilot_overhead.py [--repeats 3] [--steps-resnet 100] [--steps-mlp 300]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import MODELS, Classifier, machine, markdown, run_table, time_fit_and_hooks

from stability_callbacks import StabilityAutopilot, ZClip
from stability_callbacks.autopilot import SnapshotRing

WARMUP = 5  # steps before any timing (first-step set-up)


def snapshot_cost(model_name: str, device: str, repeats: int = 5) -> tuple[float, int]:
    """Median seconds and bytes of one snapshot of the model and a momentum-SGD optimizer's state."""
    factory, shape, batch_size = MODELS[model_name]
    accel = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = Classifier(factory()).to(accel)
    optimizer = module.configure_optimizers()
    x = torch.randn(batch_size, *shape, device=accel)
    module(x).sum().backward()
    optimizer.step()  # creates the momentum buffers
    ring = SnapshotRing(every_n_steps=1, max_snapshots=1, device=device)
    times = []
    for step in range(repeats):
        if accel.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        snap = ring.take(step, module, [optimizer])
        if accel.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), snap.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-resnet", type=int, default=100)
    parser.add_argument("--steps-mlp", type=int, default=300)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mlp300"])
    args = parser.parse_args()

    def autopilot() -> StabilityAutopilot:
        return StabilityAutopilot(snapshot_every_n_steps=100, verbose=False)

    watch = autopilot().children["reinit"].watch_steps  # type: ignore[attr-defined]
    after_watch = WARMUP + watch
    variants = {
        "bare": lambda m, s: time_fit_and_hooks(m, [], s, warmup=after_watch),
        "ZClip()": lambda m, s: time_fit_and_hooks(m, [ZClip()], s, warmup=after_watch),
        "StabilityAutopilot(snapshot_every_n_steps=100)": lambda m, s: time_fit_and_hooks(
            m, [autopilot()], s, warmup=after_watch
        ),
    }
    steps = {"resnet18": args.steps_resnet, "mlp300": args.steps_mlp}
    rows = run_table(variants, args.models, steps, args.repeats)
    print(
        f"StabilityAutopilot overhead on {machine()}, median of {args.repeats} repetitions, steps after "
        f"the vanishing watch of the first {watch} steps\n"
    )
    print(markdown(rows, extra=["hook_ms", "hooks_ratio"]))
    in_watch = {
        "bare": lambda m, s: time_fit_and_hooks(m, [], s, warmup=WARMUP),
        "StabilityAutopilot(snapshot_every_n_steps=100)": lambda m, s: time_fit_and_hooks(
            m, [autopilot()], s, warmup=WARMUP
        ),
    }
    rows = run_table(in_watch, args.models, dict.fromkeys(args.models, watch - WARMUP), args.repeats)
    print(f"\nSteps {WARMUP + 1} to {watch}, inside the vanishing watch (one host read a step)\n")
    print(markdown(rows, extra=["hook_ms", "hooks_ratio"]))
    print("\n| model | snapshot on | ms per snapshot | MiB per snapshot |\n|---|---|---|---|")
    for model in args.models:
        for device in ("host", "device"):
            seconds, nbytes = snapshot_cost(model, device)
            print(f"| {model} | {device} | {seconds * 1e3:.1f} | {nbytes / 2**20:.1f} |")


if __name__ == "__main__":
    main()
