"""The README's plain-PyTorch example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parent.parent / "README.md"


def test_plain_pytorch_loop_example_runs() -> None:
    text = README.read_text()
    section = text[text.index("## From a plain PyTorch loop") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    loader = list(zip(x.split(16), y.split(16), strict=True))
    namespace = {
        "model": model,
        "sample_x": x,
        "loader": loader,
        "loss_fn": nn.functional.cross_entropy,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
    }
    before = model[0].weight.detach().clone()
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    assert not torch.equal(before, model[0].weight)
    assert namespace["report"].changed


def test_deep_mlp_variant_count_matches_the_recipe() -> None:
    from recipes.runner import get_recipe

    match = re.search(r"a sigmoid baseline and (\d+)\s+variants", README.read_text())
    assert match is not None
    assert int(match.group(1)) == len(get_recipe("deep_mlp").variants) - 1


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
