"""Two clippers in one Trainer are a clear error at setup; a guard with one clipper composes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLPModule, make_loader, make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from stability_callbacks import (
    AGC,
    AutoClip,
    GradientMonitor,
    HistogramLogger,
    NonFiniteGuard,
    NormClip,
    StabilityAutopilot,
    ZClip,
)
from stability_callbacks._trainer import check_one_clipper
from stability_callbacks.stats import user_name


@pytest.mark.parametrize(
    ("callbacks", "names"),
    [
        (lambda: [ZClip(), AutoClip()], r"ZClip and AutoClip both clip"),
        (lambda: [NormClip(1.0), AGC()], r"NormClip and AGC both clip"),
        (lambda: [StabilityAutopilot(), ZClip()], r"StabilityAutopilot \(which owns a ZClip\) and ZClip"),
        (lambda: [AutoClip(), StabilityAutopilot(clipper="agc")], r"AutoClip and StabilityAutopilot"),
    ],
)
def test_two_clippers_fail_at_setup_naming_both(tmp_path: Path, callbacks: Any, names: str) -> None:
    model = MLPModule()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=callbacks())
    with pytest.raises(MisconfigurationException, match=names):
        trainer.fit(model, make_loader())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no step ran


def test_the_same_clipper_given_to_the_autopilot_and_the_trainer_is_two(tmp_path: Path) -> None:
    clipper = ZClip()
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[StabilityAutopilot(clipper=clipper), clipper])
    with pytest.raises(MisconfigurationException, match="owns a ZClip"):
        trainer.fit(MLPModule(), make_loader())


def test_a_guard_with_one_clipper_composes_with_distinct_keys(tmp_path: Path) -> None:
    """The README's example: measure first, then the guard, then one clipper."""
    logger = CSVLogger(tmp_path)
    callbacks: list[Callback] = [GradientMonitor(), HistogramLogger(), NonFiniteGuard(), ZClip()]
    trainer = make_trainer(
        tmp_path, max_steps=3, max_epochs=None, log_every_n_steps=1, logger=logger, callbacks=callbacks
    )
    trainer.fit(MLPModule(), make_loader())
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"guard/nonfinite", "clip/norm_pre", "clip/threshold"} <= set(header)


def test_an_autopilot_without_a_clipper_leaves_room_for_one(tmp_path: Path) -> None:
    autopilot = StabilityAutopilot(clipper=None, verbose=False)
    assert not autopilot.clips_gradients and StabilityAutopilot().clips_gradients
    trainer = make_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[autopilot, ZClip()])
    trainer.fit(MLPModule(), make_loader())
    assert trainer.global_step == 2


def test_a_clipper_driven_by_its_owner_is_not_checked_on_its_own() -> None:
    class Trainer:
        callbacks = [StabilityAutopilot()]

    check_one_clipper(Trainer(), Trainer.callbacks[0].children["clipper"])  # type: ignore[arg-type]
    check_one_clipper(Trainer(), Trainer.callbacks[0])  # type: ignore[arg-type]


def test_user_names_drop_the_wrappers_of_compiled_and_checkpointed_modules() -> None:
    assert user_name("model._orig_mod.conv1.weight") == "model.conv1.weight"
    assert user_name("_orig_mod.0") == "0"
    assert user_name("_orig_mod") == ""
    assert user_name("enc._checkpoint_wrapped_module.layer.0") == "enc.layer.0"
    assert user_name("net.orig_mod_x.weight") == "net.orig_mod_x.weight"  # only whole segments
