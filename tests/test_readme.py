"""The README: its plain-PyTorch example runs as written, its result tables are the committed summaries
rendered, and what it names exists."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _plain_loop_code() -> str:
    text = README.read_text()
    section = text[text.index("## From a plain PyTorch loop") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    return code.group(1)


def test_plain_pytorch_loop_example_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    code = _plain_loop_code()
    namespace: dict[str, Any] = {}  # nothing injected: the snippet defines everything it uses
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out

    model, x, y, loss_fn = (namespace[k] for k in ("model", "x", "y", "loss_fn"))
    steps = len(namespace["loader"])
    assert {r.param for r in namespace["report"].changed} == {n for n, _ in model.named_parameters()}
    assert "re-initialised" in out
    assert int(namespace["policy"].count) == steps  # AutoClip's rule saw the norm of every step
    logged = re.findall(r"^step (\d+): loss [\d.]+, clipped layer norms \{'0': [\d.e-]+", out, re.M)
    assert [int(s) for s in logged] == list(range(0, steps, 20))

    # The same set-up, up to the training loop, gives the model before training: training must have
    # taught it the rule (the snippet seeds everything, so both runs start from the same weights).
    setup = code[: code.index("policy = PercentilePolicy")]
    before: dict[str, Any] = {}
    exec(compile(setup, "README.md", "exec"), before)
    capsys.readouterr()
    with torch.no_grad():
        loss_before = float(loss_fn(before["model"](x), y))
        loss_after = float(loss_fn(model(x), y))
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert torch.equal(before["x"], x)
    assert loss_after < 0.5 * loss_before
    assert accuracy > 0.85


def test_deep_mlp_variant_count_matches_the_recipe() -> None:
    from recipes.runner import get_recipe

    match = re.search(r"a deep MLP \((\d+) pathologies and (\d+)\s+variants", README.read_text())
    assert match is not None
    variants = get_recipe("deep_mlp").variants
    pathologies = {v.cures for v in variants.values() if v.cures}
    assert (int(match.group(1)), int(match.group(2))) == (len(pathologies), len(variants) - len(pathologies))


def test_every_test_file_the_readme_names_exists() -> None:
    root = README.parent
    named = set(re.findall(r"\b(test_\w+\.py)\b", README.read_text()))
    assert named  # the comparison and the guarantees name their tests
    missing = [name for name in sorted(named) if not (root / "tests" / name).exists()]
    assert missing == []


def test_guarantee_matrix_has_a_row_for_every_callback() -> None:
    import inspect

    from lightning.pytorch.callbacks import Callback

    import stability_callbacks

    text = README.read_text()
    section = text[text.index("## Guarantees") : text.index("## Compared with the alternatives")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    callbacks = {
        name
        for name in stability_callbacks.__all__
        if inspect.isclass(obj := getattr(stability_callbacks, name)) and issubclass(obj, Callback)
    }
    assert callbacks <= names, callbacks - names


def test_readme_result_tables_are_the_committed_summaries_rendered() -> None:
    # Every table of recipe results in the README is written by `python -m recipes demo --write-readme`
    # (or `python -m recipes readme`) from recipes/results/<recipe>.json: a table edited by hand, a
    # summary changed without rewriting the README, or a recipe without its section fails here.
    from recipes import registry, reports

    blocks = reports.readme_blocks(README.read_text())
    assert list(blocks) == list(registry.RECIPES)
    summaries = reports.load_results(registry.RECIPES)
    for name, summary in summaries.items():
        assert blocks[name] == reports.readme_section(summary), f"run: python -m recipes readme ({name})"


def test_readme_corrupted_batch_section_is_the_committed_summary_rendered() -> None:
    # written by `python -m recipes corrupted --write-readme` from recipes/results/corrupted.json
    from recipes import reports

    summary = json.loads((reports.RESULTS_DIR / reports.CORRUPTED_RESULTS).read_text())
    block = reports.corrupted_readme_block(README.read_text())
    assert block == reports.corrupted_readme_section(summary), (
        "run: python -m recipes corrupted --write-readme"
    )
    assert list(summary["runs"]) == ["clean", "corrupted", "corrupted_autopilot"]
    assert summary["command"].startswith("python -m recipes corrupted")


def test_committed_summaries_are_of_the_recipes_as_they_are() -> None:
    # A variant added, removed or given another `cures` since the summary was written: run the demo again.
    from recipes import registry, reports

    for name, summary in reports.load_results(registry.RECIPES).items():
        rec = registry.get_recipe(name)
        assert summary["recipe"] == name and summary["preset"] == "cpu"
        assert list(summary["variants"]) == list(rec.variants), name
        cures = {v: e["cures"] for v, e in summary["variants"].items()}
        assert cures == {v: var.cures for v, var in rec.variants.items()}, name
