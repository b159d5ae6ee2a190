"""Command line of the recipes: ``python -m recipes {list,run,compare,demo,readme,depth-table,corrupted}``
(``recipes/__main__.py`` runs :func:`main`).

Examples::

    python -m recipes list
    python -m recipes run deep_mlp --variant sigmoid
    python -m recipes compare lstm --seed 1
    python -m recipes demo
    python -m recipes demo --recipes deep_mlp --write-readme
    python -m recipes readme --check
    python -m recipes depth-table --json
    python -m recipes corrupted --seed 1
    tensorboard --logdir logs

Every argument is checked before anything trains: a bad one (an unknown variant, preset or data set, a
negative seed, ...) is a usage error, exit status 2, with the subcommand's usage line and no traceback.
Runs print one line each; ``--progress`` shows Lightning's progress bar as well.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes import corrupted, registry, reports, runner, train
from recipes.base import activation_module
from recipes.data import DATASETS, torchvision_available
from recipes.spec import filter_third_party_warnings

SEED_MAX = 2**32 - 1  # numpy's bound, which Lightning's seed_everything also enforces
CONFIGS = Path(__file__).resolve().parent / "configs"
TORCHVISION_SETS = ("mnist", "fashion_mnist", "cifar10")  # the data sets that may need a download

# Every subcommand and its one-line help, in the order ``--help`` and ``list`` show them.
COMMANDS: dict[str, str] = {
    "list": "recipes, their variants and these commands",
    "run": "train one variant of a recipe",
    "compare": "train every variant of a recipe with the same seed and budget; a table and summary files",
    "demo": "compare for every recipe on CPU budgets (--write-readme: the README's tables too)",
    "readme": "rewrite the README's result tables from the committed summaries, without training",
    "depth-table": "depth ratio vs depth, plain vs residual, sigmoid vs ReLU",
    "corrupted": "one corrupted batch mid-run: clean vs corrupted vs corrupted + StabilityAutopilot",
}


# -- argument types (argparse turns their errors into usage errors) ------------------------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed is an integer in [0, {SEED_MAX}], got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _step(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if any(not n for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"a name is repeated in {text!r}")
    return names


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(d < 2 for d in depths):
        raise argparse.ArgumentTypeError(f"every depth must be >= 2, got {text!r}")
    return depths


# -- the parser --------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_seed, default=0, help="seed of weights, data order and generated data")
    p.add_argument(
        "--max-steps", type=_positive, default=None, help="optimizer steps (default: the preset's)"
    )
    p.add_argument("--preset", choices=("cpu", "gpu"), default="cpu", help="budget and scale")
    p.add_argument("--data", choices=DATASETS, default=None, help="data set (default: the preset's)")
    p.add_argument("--data-dir", default=None, help="folder of the torchvision data sets")
    p.add_argument("--download", action="store_true", help="download a missing torchvision data set")
    p.add_argument("--log-dir", default="logs", help="TensorBoard root (default: logs)")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar in each run")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m recipes``."""
    parser = argparse.ArgumentParser(
        prog="python -m recipes",
        description="Recipes that show unstable gradients and their remedies, side by side in TensorBoard.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    cmd = {name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS.items()}

    cmd["run"].add_argument("recipe", choices=registry.RECIPES)
    cmd["run"].add_argument("--variant", required=True, help="variant name (python -m recipes list)")
    _add_common(cmd["run"])

    cmd["compare"].add_argument("recipe", choices=registry.RECIPES)
    cmd["compare"].add_argument(
        "--variants", type=_names, default=None, help="comma-separated subset of the variants"
    )
    cmd["compare"].add_argument("--jobs", type=_positive, default=1, help="variants trained at once")
    _add_common(cmd["compare"])

    cmd["demo"].add_argument("--seed", type=_seed, default=0)
    cmd["demo"].add_argument("--max-steps", type=_positive, default=None, help="override every budget")
    cmd["demo"].add_argument("--log-dir", default="logs")
    cmd["demo"].add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    cmd["demo"].add_argument(
        "--recipes", type=_names, default=None, help="comma-separated recipes (default: all)"
    )
    cmd["demo"].add_argument(
        "--write-readme",
        action="store_true",
        help="also write recipes/results/<recipe>.json and rewrite the README's tables of these recipes",
    )
    cmd["demo"].add_argument("--readme", default=str(reports.README), help="the README to rewrite")
    cmd["demo"].add_argument("--jobs", type=_positive, default=1, help="variants trained at once")

    p_readme = cmd["readme"]
    p_readme.add_argument(
        "--recipes", type=_names, default=None, help="comma-separated recipes (default: all)"
    )
    p_readme.add_argument("--readme", default=str(reports.README), help="the README to rewrite")
    p_readme.add_argument(
        "--results-dir", default=str(reports.RESULTS_DIR), help="folder of the committed summaries"
    )
    p_readme.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a table differs from its summary"
    )

    p_depth = cmd["depth-table"]
    p_depth.add_argument("--json", action="store_true", help="print the rows as JSON")
    p_depth.add_argument("--depths", type=_depths, default=[10, 50, 100], help="comma-separated depths")
    p_depth.add_argument("--steps", type=_positive, default=150, help="training steps K")
    p_depth.add_argument("--seed", type=_seed, default=0)
    p_depth.add_argument(
        "--activations", type=_names, default=["sigmoid", "relu"], help="comma-separated activations"
    )

    p_bad = cmd["corrupted"]
    p_bad.add_argument("--seed", type=_seed, default=0)
    p_bad.add_argument("--step", type=_step, default=corrupted.CORRUPT_STEP, help="step of the bad batch")
    p_bad.add_argument(
        "--max-steps", type=_positive, default=corrupted.MAX_STEPS, help="optimizer steps per run"
    )
    p_bad.add_argument("--input-scale", type=_finite, default=1e3, help="factor on the bad batch's inputs")
    p_bad.add_argument("--log-dir", default="logs")
    p_bad.add_argument("--json", action="store_true", help="print the results as JSON")
    p_bad.add_argument(
        "--write-readme",
        action="store_true",
        help=f"also write recipes/results/{reports.CORRUPTED_RESULTS} and rewrite the README's section",
    )
    p_bad.add_argument("--readme", default=str(reports.README), help="the README to rewrite")
    p_bad.add_argument(
        "--results-dir", default=str(reports.RESULTS_DIR), help="folder of the committed summaries"
    )
    parser.set_defaults(subparsers=cmd)
    return parser


# -- checks that need more than one argument (before anything trains) ---------------------------------------


def _check_log_dir(p: argparse.ArgumentParser, log_dir: str) -> None:
    if Path(log_dir).exists() and not Path(log_dir).is_dir():
        p.error(f"argument --log-dir: not a folder but a file: {log_dir!r}")


def _check_recipe_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    rec = registry.get_recipe(args.recipe)  # a choice of the parser: known
    wanted = [args.variant] if args.command == "run" else args.variants or []
    flag = "--variant" if args.command == "run" else "--variants"
    unknown = [v for v in wanted if v not in rec.variants]
    if unknown:
        p.error(
            f"argument {flag}: unknown variant {', '.join(map(repr, unknown))} of {rec.name} "
            f"(choose from {', '.join(rec.variants)})"
        )
    if args.preset not in rec.presets:
        p.error(
            f"argument --preset: {rec.name} has no preset {args.preset!r} "
            f"(choose from {', '.join(rec.presets)})"
        )
    if args.data is not None:
        try:
            rec.data_args(args.data)
        except ValueError as err:
            p.error(f"argument --data: {err}")
    if args.data_dir is not None and not args.download and not Path(args.data_dir).is_dir():
        p.error(f"argument --data-dir: no folder {args.data_dir!r} (pass --download to create it)")
    data = train.resolve_data(rec, rec.presets[args.preset], args.data, args.data_dir)
    if data in TORCHVISION_SETS and not args.download:
        folder = args.data_dir or "data"
        if not torchvision_available(data, folder):
            p.error(
                f"argument --data: data set {data!r} is not under {folder!r}; pass --download or --data-dir"
            )
    _check_log_dir(p, args.log_dir)


def _check_recipes(p: argparse.ArgumentParser, names: list[str] | None) -> None:
    unknown = [n for n in names or [] if n not in registry.RECIPES]
    if unknown:
        p.error(
            f"argument --recipes: unknown recipe {', '.join(map(repr, unknown))} "
            f"(choose from {', '.join(registry.RECIPES)})"
        )


def _check_readme(p: argparse.ArgumentParser, readme: str) -> None:
    if not Path(readme).is_file():
        p.error(f"argument --readme: no file {readme!r}")
    if not reports.readme_blocks(Path(readme).read_text()):
        begin, _ = reports.readme_markers("<recipe>")
        p.error(f"argument --readme: {readme!r} has no generated section ({begin} ... end)")


def check_args(args: argparse.Namespace) -> None:
    """Usage errors (``SystemExit(2)`` with the subcommand's usage) for arguments that are each valid but
    do not fit the recipe or each other."""
    p: argparse.ArgumentParser = args.subparsers[args.command]
    if args.command in ("run", "compare"):
        _check_recipe_args(p, args)
    elif args.command == "demo":
        _check_log_dir(p, args.log_dir)
        _check_recipes(p, args.recipes)
        if args.write_readme:
            if args.max_steps is not None:
                p.error("argument --write-readme: the README shows the presets' budgets; drop --max-steps")
            _check_readme(p, args.readme)
    elif args.command == "readme":
        _check_recipes(p, args.recipes)
        _check_readme(p, args.readme)
        try:
            reports.load_results(args.recipes or registry.RECIPES, Path(args.results_dir))
        except FileNotFoundError as err:
            p.error(f"argument --results-dir: {err}")
        corrupted_path = Path(args.results_dir) / reports.CORRUPTED_RESULTS
        has_section = reports.corrupted_readme_block(Path(args.readme).read_text()) is not None
        if args.recipes is None and has_section and not corrupted_path.is_file():
            command = reports.CORRUPTED_COMMAND
            p.error(f"argument --results-dir: no summary {corrupted_path} (write it with `{command}`)")
    elif args.command == "depth-table":
        for name in args.activations:
            try:
                activation_module(name)
            except ValueError as err:
                p.error(f"argument --activations: {err}")
    elif args.command == "corrupted":
        if args.step >= args.max_steps:
            p.error(f"argument --step: must be below --max-steps ({args.max_steps}), got {args.step}")
        _check_log_dir(p, args.log_dir)
        if args.write_readme:
            if not Path(args.readme).is_file():
                p.error(f"argument --readme: no file {args.readme!r}")
            if reports.corrupted_readme_block(Path(args.readme).read_text()) is None:
                begin, end = reports.CORRUPTED_MARKERS
                p.error(
                    f"argument --readme: {args.readme!r} has no corrupted-batch section ({begin} ... {end})"
                )


# -- the commands ------------------------------------------------------------------------------------------


def _list() -> None:
    for name in registry.RECIPES:
        rec = registry.get_recipe(name)
        print(f"{name} ({rec.module.__name__}, default data: {rec.presets['cpu'].data})")
        width = max(len(v) for v in rec.variants)
        for vname, var in rec.variants.items():
            print(f"  {vname:<{width}}  {var.description}")
    print("\ncommands (python -m recipes <command> --help):")
    width = max(len(c) for c in COMMANDS)
    for name, text in COMMANDS.items():
        print(f"  {name:<{width}}  {text}")
    configs = ", ".join(c.name for c in sorted(CONFIGS.glob("*.yaml")))
    print(f"\nLightningCLI: python -m recipes.<recipe> fit --config recipes/configs/<file>  ({configs})")


def _write_corrupted(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Commit the corrupted-batch run's summary (with the command that made it) and its README section."""
    p_bad = args.subparsers["corrupted"]
    words = ["python -m recipes corrupted"]
    for flag, name in (("--seed", "seed"), ("--step", "step"), ("--max-steps", "max_steps")):
        if getattr(args, name) != p_bad.get_default(name):
            words.append(f"{flag} {getattr(args, name)}")
    if args.input_scale != p_bad.get_default("input_scale"):
        words.append(f"--input-scale {args.input_scale:g}")
    summary = corrupted.summary_of(
        results, seed=args.seed, step=args.step, max_steps=args.max_steps, input_scale=args.input_scale
    )
    summary["command"] = " ".join([*words, "--write-readme"])
    out = Path(args.results_dir) / reports.CORRUPTED_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    changed = reports.write_corrupted_readme(summary, Path(args.readme))
    print(f"summary: {out}; README section {'rewritten' if changed else 'unchanged'}")


def _readme(args: argparse.Namespace) -> int:
    names = args.recipes or list(registry.RECIPES)
    readme, results = Path(args.readme), Path(args.results_dir)
    corrupted_path = results / reports.CORRUPTED_RESULTS
    # the corrupted-batch section too, when all are asked for and the README has it
    with_corrupted = args.recipes is None and reports.corrupted_readme_block(readme.read_text()) is not None
    corrupted_summary = json.loads(corrupted_path.read_text()) if with_corrupted else None
    if not args.check:
        changed = reports.write_readme(names, readme, results)
        if corrupted_summary is not None and reports.write_corrupted_readme(corrupted_summary, readme):
            changed.append("corrupted")
        print(f"README sections rewritten: {', '.join(changed) or 'none (unchanged)'}")
        return 0
    text = readme.read_text()
    expected = reports.readme_blocks(reports.update_readme(text, reports.load_results(names, results)))
    found = reports.readme_blocks(text)
    stale = [n for n in names if found.get(n) != expected.get(n)]
    corrupted_now = reports.corrupted_readme_block(text)
    if corrupted_summary is not None and corrupted_now != reports.corrupted_readme_section(corrupted_summary):
        stale.append("corrupted")
    print(
        f"README tables differ from their summaries: {', '.join(stale)} (run python -m recipes readme)"
        if stale
        else "README tables match the committed summaries"
    )
    return 1 if stale else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (a usage error exits with 2 before any training)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    filter_third_party_warnings()
    if args.command == "list":
        _list()
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
            progress=args.progress,
        )
        print(train.progress_line(result))
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
            variants=args.variants,
            progress=args.progress,
            jobs=args.jobs,
        )
        return 0
    if args.command == "demo":
        runner.demo(
            seed=args.seed,
            log_dir=args.log_dir,
            max_steps=args.max_steps,
            progress=args.progress,
            recipes=args.recipes,
            write_readme=args.write_readme,
            readme=args.readme,
            jobs=args.jobs,
        )
        return 0
    if args.command == "readme":
        return _readme(args)
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
        if args.write_readme:
            _write_corrupted(args, results)
        return 0
    rows = runner.depth_table(
        depths=args.depths,
        steps=args.steps,
        seed=args.seed,
        activations=args.activations,
        progress=not args.json,
    )
    print(json.dumps(rows, indent=2) if args.json else reports.format_depth_table(rows))
    return 0
