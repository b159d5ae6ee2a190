"""Fault injection: huge finite gradients, and an exception mid-fit in a process that then dies hard."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLPModule, make_loader, make_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stability_callbacks import GradientMonitor, gradient_norms, total_norm


def test_huge_finite_gradients_are_reported_finite() -> None:
    model = torch.nn.Linear(100, 10)
    model.weight.grad = torch.full_like(model.weight, 1e20)
    model.bias.grad = torch.zeros_like(model.bias)
    norms = gradient_norms(model, per="parameter")
    assert math.isfinite(norms["weight"].item())
    assert norms["weight"].item() == torch.tensor(1e20 * math.sqrt(1000)).item()
    assert total_norm([model.weight.grad, model.bias.grad]).item() == norms["weight"].item()


class HugeGrad(MLPModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 1e20  # finite gradients around 1e19-1e20


def test_monitor_flags_huge_finite_gradients_as_exploding_not_nonfinite(tmp_path: Path) -> None:
    # one step, so the run has no level of its own yet: the opt-in absolute bound judges it
    monitor = GradientMonitor(log_every_n_steps=1, exploding_norm=1e4, patience=1)
    make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[monitor]).fit(
        HugeGrad(lr=0.0), make_loader()
    )
    d = monitor.last_diagnosis
    assert d is not None and math.isfinite(d.total_norm) and d.exploding and not d.nonfinite


CRASHING_FIT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import MLPModule, make_loader, make_trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from stability_callbacks import GradientMonitor, HistogramLogger

    class Crashing(MLPModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise RuntimeError("injected failure")
            return super().training_step(batch, batch_idx)

    logger = TensorBoardLogger({root!r}, name="run", version=0)
    callbacks = [GradientMonitor(log_every_n_steps=1), HistogramLogger(every_n_steps=1)]
    trainer = make_trainer({root!r}, max_steps=20, max_epochs=None, logger=logger, callbacks=callbacks)
    try:
        trainer.fit(Crashing(), make_loader(n=320))
    except RuntimeError:
        os._exit(3)  # die at once: no interpreter shutdown, no writer close
    """
)


@pytest.mark.slow
def test_exception_mid_fit_loses_no_logged_event(tmp_path: Path) -> None:
    script = CRASHING_FIT.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-2000:]
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("grad_norm/total")] == [0, 1, 2, 3, 4]
    assert [e.step for e in acc.Histograms("grads/net.0.weight")] == [0, 1, 2, 3, 4]
