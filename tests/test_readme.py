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
