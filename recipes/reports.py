"""Reports of the recipes: number formatting, the result tables, the ``summary.json`` / ``summary.md`` /
``summary.png`` files, and per-layer gradient norms read back from a run's TensorBoard event file."""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes.spec import CorruptedResult, Recipe, RunResult

__all__ = [
    "CORRUPTED_MARKERS",
    "CORRUPTED_RESULTS",
    "README",
    "RESULTS_DIR",
    "corrupted_readme_block",
    "corrupted_readme_section",
    "corrupted_report",
    "corrupted_summary",
    "format_corrupted_table",
    "format_depth_table",
    "format_number",
    "format_table",
    "layer_norms_from_events",
    "load_results",
    "readme_blocks",
    "readme_markers",
    "readme_section",
    "render_entries",
    "render_table",
    "summary_entry",
    "update_readme",
    "write_corrupted_readme",
    "write_corrupted_summary",
    "write_readme",
    "write_summary",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
README_COMMAND = "python -m recipes demo --write-readme"
CORRUPTED_COMMAND = "python -m recipes corrupted --write-readme"
CORRUPTED_RESULTS = "corrupted.json"  # in RESULTS_DIR
CORRUPTED_MARKERS = ("<!-- corrupted:begin -->", "<!-- corrupted:end -->")


def format_number(x: float | None, digits: int = 3) -> str:
    """``x`` for a table: ``-`` for ``None``, scientific notation below 1e-2 or from 1e4, else fixed."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) < 1e-2 or abs(x) >= 1e4:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def render_table(head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """``rows`` under ``head`` as left-aligned text columns (or a Markdown table)."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(c) for c in col) for col in zip(head, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in rows)]
    )


def summary_entry(result: RunResult) -> dict[str, Any]:
    """A run's entry of ``summary.json``: its numbers, the pathology it ``cures``, the monitor's
    ``diagnosis`` in words, its plain-words ``warnings`` (rule -> message) and the autopilot's
    ``actions``."""
    return {
        **result.summary(),
        "cures": result.cures,
        "diagnosis": result.diagnosis(),
        "warnings": dict(result.warnings),
        "actions": list(result.actions),
    }


def _cures_cell(entries: dict[str, dict[str, Any]], name: str) -> str:
    target = entries[name].get("cures")
    if not target:
        return "-"
    if target not in entries:
        return str(target)
    return f"{target} ({format_number(entries[target].get('val_metric'))})"


def render_entries(entries: dict[str, dict[str, Any]], markdown: bool = False, notes: bool = True) -> str:
    """The compare table of a recipe's ``summary.json`` entries (:func:`summary_entry`).

    The ``cures`` column names the pathology a remedy cures, with that pathology's validation metric
    beside it. With ``notes``, the table is followed by what the monitor said (the first plain-words
    message of each rule that fired, once per run) and what the autopilot did, run by run.
    """
    first = next(iter(entries.values()), {})
    metric = first.get("val_metric_name", "val_metric")
    head = ["variant", "cures", "train loss", metric, "depth ratio", "diagnosis", "diverged", "steps"]
    head.append("seconds")
    rows = [
        [
            name,
            _cures_cell(entries, name),
            format_number(e.get("final_train_loss")),
            format_number(e.get("val_metric")),
            format_number(e.get("depth_ratio"), 2),
            e.get("diagnosis") or "-",
            "yes" if e.get("diverged") else "no",
            str(e.get("steps")),
            f"{float(e.get('seconds') or 0.0):.1f}",
        ]
        for name, e in entries.items()
    ]
    table = render_table(head, rows, markdown)
    said = _notes(entries, markdown) if notes else []
    return "\n".join([table, "", *said]) if said else table


def _notes(entries: dict[str, dict[str, Any]], markdown: bool) -> list[str]:
    lines: list[str] = []
    for name, e in entries.items():
        said = [f"GradientMonitor ({kind}): {text}" for kind, text in e.get("warnings", {}).items()]
        said += [f"StabilityAutopilot: {text}" for text in e.get("actions", [])]
        for text in said:
            if markdown:
                lines.append(f"- `{name}` {text}")
            else:
                lines.extend(textwrap.wrap(text, 110, initial_indent=f"{name}: ", subsequent_indent="    "))
    return lines


def format_table(results: dict[str, RunResult], markdown: bool = False, notes: bool = True) -> str:
    """The results of a recipe's runs as an aligned text table (or a Markdown table), followed (with
    ``notes``) by the monitor's messages and the autopilot's actions; see :func:`render_entries`."""
    return render_entries({name: summary_entry(r) for name, r in results.items()}, markdown, notes)


def format_depth_table(rows: Sequence[dict[str, Any]]) -> str:
    """The depth table (:func:`recipes.runner.depth_table`) as aligned text."""
    head = ["depth", "activation", "net", "ratio at init", "ratio after K", "val_acc"]
    body = [
        [
            str(r["depth"]),
            r["activation"],
            "residual" if r["residual"] else "plain",
            format_number(r["depth_ratio_init"], 2),
            format_number(r["depth_ratio_final"], 2),
            format_number(r["val_acc"]),
        ]
        for r in rows
    ]
    return render_table(head, body)


def format_corrupted_table(runs: Mapping[str, Mapping[str, Any]], markdown: bool = False) -> str:
    """The corrupted-batch demonstration's runs (``CorruptedResult.summary()`` entries, by run name) as
    an aligned text table (or a Markdown table)."""
    head = ["run", "final train loss", "ratio to clean", "rollbacks", "diverged", "val_acc", "steps"]
    rows = [
        [
            name,
            format_number(r["final_train_loss"], 4),
            "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
            str(r["rollbacks"]),
            "yes" if r["diverged"] else "no",
            format_number(r["val_metric"]),
            str(r["steps"]),
        ]
        for name, r in runs.items()
    ]
    return render_table(head, rows, markdown)


def corrupted_summary(
    base: dict[str, Any],
    seed: int,
    step: int,
    max_steps: int,
    input_scale: float,
    results: Mapping[str, CorruptedResult],
) -> dict[str, Any]:
    """The corrupted-batch demonstration's ``summary.json`` object (``base`` names the recipe, variant
    and model arguments it starts from)."""
    return {
        "base": base,
        "seed": seed,
        "corrupt_step": step,
        "max_steps": max_steps,
        "input_scale": input_scale,
        "runs": {name: r.summary() for name, r in results.items()},
    }


def corrupted_report(summary: Mapping[str, Any]) -> str:
    """What ``python -m recipes corrupted`` prints, from its summary: the setting, the table and the
    autopilot's timeline."""
    base = summary["base"]
    words = ", ".join(f"{k}={v}" for k, v in base["model"].items())
    lines = [
        f"one corrupted batch at step {summary['corrupt_step']} of {summary['max_steps']}, "
        f"seed {summary['seed']}",
        f"run: {base['recipe']} variant {base['variant']} with {words}",
        format_corrupted_table(summary["runs"]),
        *(f"{name}: {e}" for name, r in summary["runs"].items() for e in r["events"]),
    ]
    return "\n".join(line.rstrip() for text in lines for line in text.splitlines())


def corrupted_readme_section(summary: Mapping[str, Any]) -> str:
    """The README's generated section of the corrupted-batch demonstration."""
    seconds = sum(r["seconds"] for r in summary["runs"].values())
    command = summary.get("command", CORRUPTED_COMMAND)
    head = f"`{command}` took {seconds:.0f} s and printed (from `recipes/results/{CORRUPTED_RESULTS}`):"
    return "\n".join([head, "", "```text", corrupted_report(summary), "```"])


def corrupted_readme_block(text: str) -> str | None:
    """The README's corrupted-batch section (the text between its markers), ``None`` without one."""
    begin, end = CORRUPTED_MARKERS
    match = re.search(rf"{re.escape(begin)}\n?(.*?)\n?{re.escape(end)}", text, re.S)
    return match.group(1) if match else None


def write_corrupted_readme(summary: Mapping[str, Any], readme: Path = README) -> bool:
    """Rewrite the README's corrupted-batch section from ``summary``; returns whether it changed.
    ``ValueError`` if the README has no such section."""
    text = readme.read_text()
    begin, end = CORRUPTED_MARKERS
    if begin not in text or end not in text:
        raise ValueError(f"the README {readme} has no corrupted-batch section ({begin} ... {end})")
    start, stop = text.index(begin), text.index(end) + len(end)
    new = text[:start] + f"{begin}\n{corrupted_readme_section(summary)}\n{end}" + text[stop:]
    if new != text:
        readme.write_text(new)
    return new != text


def write_summary(
    recipe: Recipe, seed: int, results: dict[str, RunResult], out_dir: Path, preset: str = "cpu"
) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md`` and ``summary.png`` to ``out_dir``; returns the JSON object."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "recipe": recipe.name,
        "seed": seed,
        "preset": preset,
        "variants": {name: summary_entry(r) for name, r in results.items()},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# {recipe.name}: all variants, seed {seed}, preset {preset}",
        "",
        format_table(results, markdown=True),
        "",
        "| variant | what it shows |",
        "|---|---|",
        *(f"| {n} | {recipe.variants[n].description} |" for n in results),
        "",
        f"TensorBoard: `tensorboard --logdir {out_dir}`",
        "",
    ]
    (out_dir / "summary.md").write_text("\n".join(lines))
    _plot(recipe, results, out_dir / "summary.png")
    return summary


def write_corrupted_summary(out_dir: Path, recipe: Recipe, summary: Mapping[str, Any]) -> None:
    """Write the corrupted-batch demonstration's ``summary.json`` and ``summary.md`` to ``out_dir``
    (``recipe``: the demonstration's recipe, whose variants are the runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    runs = summary["runs"]
    lines = [
        f"# One corrupted batch at step {summary['corrupt_step']}, seed {summary['seed']}",
        "",
        format_corrupted_table(runs, markdown=True),
        "",
        "| run | what it is |",
        "|---|---|",
        *(f"| {n} | {recipe.variants[n].description} |" for n in runs),
        "",
        *(f"- {n}: {e}" for n, r in runs.items() for e in r["events"]),
        "",
        f"TensorBoard: `tensorboard --logdir {out_dir}`",
        "",
    ]
    (out_dir / "summary.md").write_text("\n".join(lines))


def _plot(recipe: Recipe, results: dict[str, RunResult], path: Path) -> None:
    # matplotlib is imported here so that its backend is chosen only when a picture is drawn.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    for i, (name, r) in enumerate(results.items()):
        color = cmap(i % 20)
        steps = list(range(len(r.losses)))
        losses = [v if math.isfinite(v) and v > 0 else float("nan") for v in r.losses]
        if len(losses) > 50:  # light smoothing so the curves stay readable
            k = max(1, len(losses) // 50)
            losses = [
                sum(losses[j : j + k]) / len(losses[j : j + k])
                if all(math.isfinite(v) for v in losses[j : j + k])
                else float("nan")
                for j in range(0, len(losses), k)
            ]
            steps = list(range(0, len(r.losses), k))
        ax_loss.plot(steps, losses, label=name, color=color, lw=1.2)
        if r.layer_norms:
            ax_grad.plot(
                range(len(r.layer_norms)), [v for _, v in r.layer_norms], label=name, color=color, lw=1.2
            )
    ax_loss.set(title=f"{recipe.name}: training loss", xlabel="step", ylabel="loss", yscale="log")
    ax_grad.set(
        title="gradient norm per layer (geometric mean over the run)",
        xlabel="layer (input -> output)",
        ylabel="L2 norm",
        yscale="log",
    )
    ax_grad.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(fontsize=7, ncol=2)
    ax_grad.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_norms_from_events(run_dir: Path, model: torch.nn.Module) -> list[tuple[str, float]]:
    """Per-layer gradient norms (geometric mean over the run) read back from the run's event file,
    in module order (input to output)."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 1, "images": 1})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    out: list[tuple[str, float]] = []
    for name, mod in model.named_modules():
        tag = f"grad_norm/{name}"
        if name and tag in tags and any(True for _ in mod.parameters(recurse=False)):
            values = [e.value for e in acc.Scalars(tag) if math.isfinite(e.value) and e.value > 0]
            if values:
                out.append((name, math.exp(sum(math.log(v) for v in values) / len(values))))
    return out


# -- the README's generated sections ------------------------------------------------------------------------


def readme_markers(recipe: str) -> tuple[str, str]:
    """The comment lines around the README's generated section of ``recipe``."""
    return f"<!-- recipes:{recipe}:begin -->", f"<!-- recipes:{recipe}:end -->"


def readme_section(summary: dict[str, Any]) -> str:
    """The README's generated section of one recipe's ``summary.json``: a line saying what ran and how to
    make it again, the Markdown table and the notes of :func:`render_entries`."""
    name = summary["recipe"]
    head = (
        f"`{name}`, seed {summary['seed']}, preset {summary.get('preset', 'cpu')} "
        f"(`{README_COMMAND}`; from `recipes/results/{name}.json`):"
    )
    return "\n".join([head, "", render_entries(summary["variants"], markdown=True)])


def readme_blocks(text: str) -> dict[str, str]:
    """The generated sections of a README's ``text``, by recipe name (the text between the markers)."""
    out: dict[str, str] = {}
    for match in re.finditer(r"<!-- recipes:(\w+):begin -->\n?(.*?)\n?<!-- recipes:\1:end -->", text, re.S):
        out[match.group(1)] = match.group(2)
    return out


def update_readme(text: str, summaries: dict[str, dict[str, Any]]) -> str:
    """``text`` with the generated section of each recipe in ``summaries`` rewritten.

    A recipe without a section yet gets one after the last generated section (the recipes keep the
    order of ``summaries``); a README with no generated section at all raises ``ValueError``.
    """
    previous_end: str | None = None
    for name, summary in summaries.items():
        begin, end = readme_markers(name)
        block = f"{begin}\n{readme_section(summary)}\n{end}"
        if begin in text and end in text:
            start, stop = text.index(begin), text.index(end) + len(end)
            text = text[:start] + block + text[stop:]
        else:
            anchor = previous_end or _last_end_marker(text)
            if anchor is None:
                raise ValueError(f"the README has no generated section to put {name!r} after ({begin})")
            at = text.index(anchor) + len(anchor)
            text = text[:at] + "\n\n" + block + text[at:]
        previous_end = end
    return text


def _last_end_marker(text: str) -> str | None:
    ends = list(re.finditer(r"<!-- recipes:\w+:end -->", text))
    return ends[-1].group(0) if ends else None


def load_results(names: Sequence[str], results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """The committed summaries ``<results_dir>/<recipe>.json`` of ``names``; ``FileNotFoundError``
    names the first missing file and the command that writes it."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        path = results_dir / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no summary {path} (write it with `{README_COMMAND}`)")
        out[name] = json.loads(path.read_text())
    return out


def write_readme(names: Sequence[str], readme: Path = README, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Rewrite the generated sections of ``readme`` for ``names`` from the committed summaries; returns
    the names whose section changed."""
    text = readme.read_text()
    summaries = load_results(names, results_dir)
    new = update_readme(text, summaries)
    before = readme_blocks(text)
    after = readme_blocks(new)
    if new != text:
        readme.write_text(new)
    return [n for n in names if before.get(n) != after.get(n)]
