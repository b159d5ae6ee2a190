"""Every exported callback on the models people train, in the ways they train them.

Callbacks (from ``stability_callbacks.__all__``) x models of :mod:`model_zoo` (torchvision resnet18,
timm's ViT tiny, transformers' GPT-2, Lightning's demo Transformer and LSTM language model, a module
without ``forward``) x modes (eager; ``torch.compile`` of the network with the ``"eager"`` backend,
which runs dynamo's capture and guards without paying for inductor's code generation on a CPU;
``bf16-mixed``; ``accumulate_grad_batches=4``), two optimizer steps each. A cell passes when the fit
finishes with finite weights (or, where it does not, the same fit without the callback does not
either: ``bf16-mixed`` resnet18 on the CPU has been seen to overflow in the full suite), the callback
logged its keys, and every key and tag has the user's names: no ``_orig_mod.``, and under
``torch.compile`` exactly the keys of the eager run.

One instance of each model serves every cell of its mode (the compiled one is compiled once), given
back its initial weights each time, and the steps run on one thread, so the whole matrix takes under a
minute on two cores.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from model_zoo import MODELS
from torch import Tensor

import stability_callbacks

pytestmark = pytest.mark.slow  # about a minute in all (CI runs slow tests too)

CALLBACKS = sorted(
    name
    for name in stability_callbacks.__all__
    if inspect.isclass(obj := getattr(stability_callbacks, name)) and issubclass(obj, Callback)
)
MODES = ["eager", "compile", "bf16-mixed", "accumulate4"]
STEPS = 2

# the key (or TensorBoard tag) prefix each callback writes within two steps at a cadence of one step
WRITES = {
    "AGC": "clip/",
    "ActivationMonitor": "act/",
    "AdaGC": "clip/",
    "AutoClip": "clip/",
    "GradientMonitor": "grad_norm/",
    "HistogramLogger": "weights/",
    "InitSwap": "init/report",
    "MomentReset": "moment/",
    "NonFiniteGuard": "guard/",
    "NormClip": "clip/",
    "StabilityAutopilot": "autopilot/",
    "UpdateMonitor": "update/",
    "ValueClip": "clip/",
    "ZClip": "clip/",
}


def make_callback(name: str) -> Callback:
    """The callback with its defaults, but logging every step (its own cadence argument, if any)."""
    cls = getattr(stability_callbacks, name)
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    for cadence in ("every_n_steps", "log_every_n_steps"):
        if cadence in params:
            kwargs[cadence] = 1
    if "verbose" in params:
        kwargs["verbose"] = False
    return cls(**kwargs)


class _Writer:
    """Stands in for a SummaryWriter: remembers the tag of every ``add_*`` call, writes nothing."""

    def __init__(self, tags: set[str]) -> None:
        self.tags = tags

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> _Writer:
            tag = args[0] if args else kwargs.get("tag")
            if name.startswith("add_") and isinstance(tag, str):
                self.tags.add(tag)
            return self

        return call


class TagLogger(TensorBoardLogger):
    """A TensorBoardLogger that only collects the keys and tags it is given."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root), name="tags", default_hp_metric=False)
        self.tags: set[str] = set()

    @property
    def experiment(self) -> Any:
        return _Writer(self.tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.tags.update(metrics)

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def save(self) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


_instances: dict[tuple[str, bool], tuple[pl.LightningModule, dict[str, Tensor]]] = {}
_eager_keys: dict[tuple[str, str], set[str]] = {}


def model_for(name: str, compiled: bool) -> pl.LightningModule:
    """The model of a cell: one instance per model and mode (built and compiled once), given back its
    initial weights and buffers each time, so no cell trains on what an earlier cell left."""
    key = (name, compiled)
    if key not in _instances:
        torch.manual_seed(0)
        model = MODELS[name](compile_backend="eager" if compiled else None)
        _instances[key] = (model, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model, initial = _instances[key]
    model.load_state_dict(initial)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_release_models() -> Any:
    """One thread: these tiny steps run fastest on one, and much slower on two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _instances.clear()
    torch._dynamo.reset()


def _finite(model: pl.LightningModule) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("mode", MODES)
def test_cell(tmp_path: Path, callback: str, model_name: str, mode: str) -> None:
    model = model_for(model_name, compiled=mode == "compile")
    kwargs: dict[str, Any] = {}
    if mode == "bf16-mixed":
        kwargs["precision"] = "bf16-mixed"
    if mode == "accumulate4":
        kwargs["accumulate_grad_batches"] = 4
    batches = STEPS * kwargs.get("accumulate_grad_batches", 1)
    logger = TagLogger(tmp_path)
    trainer = make_trainer(
        tmp_path,
        max_steps=STEPS,
        max_epochs=None,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[make_callback(callback)],
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the callbacks' one-time notes are tested where they are made
        trainer.fit(model, model.loader(batches))
    assert trainer.global_step == STEPS
    if not _finite(model):  # then the same fit without the callback must go non-finite too
        bare = model_for(model_name, compiled=mode == "compile")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(tmp_path / "bare", max_steps=STEPS, max_epochs=None, logger=False, **kwargs).fit(
                bare, bare.loader(batches)
            )
        assert not _finite(bare), f"{callback} made the {mode} fit of {model_name} non-finite"
    ours = {k for k in logger.tags if k.startswith(WRITES[callback])} if callback in WRITES else logger.tags
    assert ours, f"{callback} logged nothing on {model_name} ({mode}): {sorted(logger.tags)}"
    assert not [k for k in logger.tags if "_orig_mod" in k]
    if mode == "eager":
        _eager_keys[(callback, model_name)] = set(logger.tags)
    elif mode == "compile" and (callback, model_name) in _eager_keys:
        assert set(logger.tags) == _eager_keys[(callback, model_name)]  # compiled and eager runs line up


def test_the_matrix_covers_every_callback_and_runs_eager_before_compiled(
    request: pytest.FixtureRequest,
) -> None:
    assert set(WRITES) >= set(CALLBACKS), set(CALLBACKS) - set(WRITES)
    names = [item.name for item in request.session.items if item.name.startswith("test_cell[")]
    if len(names) == len(CALLBACKS) * len(MODELS) * len(MODES):  # the whole matrix was collected
        assert names.index(f"test_cell[eager-{next(iter(MODELS))}-{CALLBACKS[0]}]") < names.index(
            f"test_cell[compile-{next(iter(MODELS))}-{CALLBACKS[0]}]"
        )
