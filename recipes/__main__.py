"""Command line of the recipes: ``python -m recipes {list,run,compare,demo,depth-table,corrupted}``.

Examples::

    python -m recipes list
    python -m recipes run deep_mlp --variant sigmoid
    python -m recipes compare lstm --seed 1
    python -m recipes demo
    python -m recipes depth-table --json
    python -m recipes corrupted --seed 1
    tensorboard --logdir logs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from recipes import corrupted, registry, reports, runner, train


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and generated data")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu", help="budget and scale")
    p.add_argument(
        "--data", default=None, help="data set (digits, mnist, fashion_mnist, cifar10, adding, seq_digits)"
    )
    p.add_argument("--data-dir", default=None, help="folder of the torchvision data sets")
    p.add_argument("--download", action="store_true", help="download a missing torchvision data set")
    p.add_argument("--log-dir", default="logs", help="TensorBoard root (default: logs)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m recipes``."""
    parser = argparse.ArgumentParser(
        prog="python -m recipes",
        description="Recipes that show unstable gradients and their remedies, side by side in TensorBoard.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="recipes and their variants, one line each")

    p_run = sub.add_parser("run", help="train one variant")
    p_run.add_argument("recipe", choices=registry.RECIPES)
    p_run.add_argument("--variant", required=True)
    _add_common(p_run)

    p_cmp = sub.add_parser("compare", help="train every variant of a recipe with the same seed and budget")
    p_cmp.add_argument("recipe", choices=registry.RECIPES)
    p_cmp.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    _add_common(p_cmp)

    p_demo = sub.add_parser("demo", help="compare for all three recipes on CPU budgets")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--max-steps", type=int, default=None, help="override every preset's budget")
    p_demo.add_argument("--log-dir", default="logs")

    p_depth = sub.add_parser("depth-table", help="depth ratio vs depth, plain vs residual, sigmoid vs ReLU")
    p_depth.add_argument("--json", action="store_true", help="print the rows as JSON")
    p_depth.add_argument("--depths", default="10,50,100", help="comma-separated depths")
    p_depth.add_argument("--steps", type=int, default=150, help="training steps K")
    p_depth.add_argument("--seed", type=int, default=0)
    p_depth.add_argument("--activations", default="sigmoid,relu", help="comma-separated activations")

    p_bad = sub.add_parser(
        "corrupted", help="one corrupted batch mid-run: clean vs corrupted vs corrupted + StabilityAutopilot"
    )
    p_bad.add_argument("--seed", type=int, default=0)
    p_bad.add_argument("--step", type=int, default=corrupted.CORRUPT_STEP, help="step of the bad batch")
    p_bad.add_argument("--max-steps", type=int, default=corrupted.MAX_STEPS, help="optimizer steps per run")
    p_bad.add_argument("--input-scale", type=float, default=1e3, help="factor on the bad batch's inputs")
    p_bad.add_argument("--log-dir", default="logs")
    p_bad.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for name in registry.RECIPES:
            rec = registry.get_recipe(name)
            print(f"{name} ({rec.module.__name__}, default data: {rec.presets['cpu'].data})")
            width = max(len(v) for v in rec.variants)
            for vname, var in rec.variants.items():
                print(f"  {vname:<{width}}  {var.description}")
        return 0
    if args.command == "run":
        result = train.run_variant(
            args.recipe,
            args.variant,
            seed=args.seed,
            max_steps=args.max_steps,
            preset=args.preset,
            data=args.data,
            data_dir=args.data_dir,
            download=args.download,
            log_dir=args.log_dir,
        )
        print(reports.format_table({args.variant: result}))
        if result.log_dir:
            print(f"logs: {result.log_dir}  (tensorboard --logdir {args.log_dir})")
        return 0
    if args.command == "compare":
        runner.compare(
            args.recipe,
            seed=args.seed,
            max_steps=args.max_steps,
            preset=args.preset,
            data=args.data,
            data_dir=args.data_dir,
            download=args.download,
            log_dir=args.log_dir,
            variants=args.variants.split(",") if args.variants else None,
        )
        return 0
    if args.command == "demo":
        runner.demo(seed=args.seed, log_dir=args.log_dir, max_steps=args.max_steps)
        return 0
    if args.command == "corrupted":
        results = corrupted.corrupted_demo(
            seed=args.seed,
            step=args.step,
            max_steps=args.max_steps,
            input_scale=args.input_scale,
            log_dir=args.log_dir,
            progress=not args.json,
            echo=not args.json,
        )
        if args.json:
            print(json.dumps({name: r.summary() for name, r in results.items()}, indent=2))
        return 0
    rows = runner.depth_table(
        depths=[int(d) for d in args.depths.split(",")],
        steps=args.steps,
        seed=args.seed,
        activations=args.activations.split(","),
        progress=not args.json,
    )
    print(json.dumps(rows, indent=2) if args.json else reports.format_depth_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
