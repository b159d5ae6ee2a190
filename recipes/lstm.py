"""Recurrent recipe: a vanilla RNN whose gradients vanish or explode over time, next to the LSTM (Hochreiter
& Schmidhuber 1997), the GRU (Cho et al. 2014) and the gradient clippers that tame the explosion
(Pascanu et al. 2013; AutoClip, Seetharaman et al. 2020; ZClip, Kumar et al. 2025).

The default task is the adding problem with T = 50 (:class:`recipes.data.AddingDataModule`): the target
is the sum of two marked values far apart in time, so a model must carry information across the whole
sequence. Predicting the mean gives an MSE of about 0.167. ``--data seq_digits`` classifies the digits
read pixel by pixel instead.

Two pathologies, each with the remedies that cure it (``Variant.cures``): ``rnn`` (default init,
T = 50: the gradients vanish) is cured by the gated cells ``lstm``, ``gru`` and ``lstm_init``;
``rnn_exploding`` (recurrent weights 2x orthogonal, SGD with momentum, T = 10: the gradients explode and
the run diverges) by ``rnn_normclip``, ``rnn_zclip`` and the ``autopilot``; ``rnn_autoclip`` and
``rnn_agc`` keep it finite without learning the task at every seed.

As a LightningCLI script::

    python -m recipes.lstm fit --config recipes/configs/lstm_adding.yaml
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from recipes.base import RecipeModule
from recipes.spec import Preset, Recipe, Variant
from stability_callbacks import AGC, AutoClip, InitSwap, NormClip, StabilityAutopilot, ZClip

__all__ = ["RECIPE", "VARIANTS", "SequenceModel", "cli_main"]

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class SequenceModel(RecipeModule):
    """A recurrent network read out at the last time step, for regression or classification.

    Args:
        cell: ``"rnn"`` (tanh), ``"lstm"`` or ``"gru"``.
        hidden: hidden units per layer.
        layers: stacked recurrent layers.
        recurrent_init_scale: if set, every recurrent weight matrix (each gate's block) is re-initialised
            as ``scale`` times a random orthogonal matrix; ``None`` keeps PyTorch's default
            initialisation. A scale well above 1 makes a tanh RNN's gradients explode.
        input_size: features per time step (2 for the adding problem, 1 for seq_digits).
        num_outputs: 1 for regression, the number of classes for classification.
        task: ``"regression"`` or ``"classification"``.
        optimizer, lr, momentum, weight_decay, warmup_steps: see :class:`~recipes.base.RecipeModule`.
    """

    def __init__(
        self,
        cell: str = "lstm",
        hidden: int = 64,
        layers: int = 1,
        recurrent_init_scale: float | None = None,
        input_size: int = 2,
        num_outputs: int = 1,
        task: str = "regression",
        optimizer: str = "adam",
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(task, optimizer, lr, momentum, weight_decay, warmup_steps)
        if cell not in CELLS:
            raise ValueError(f"`cell` must be one of {sorted(CELLS)}, got {cell!r}")
        if hidden < 1:
            raise ValueError(f"`hidden` must be >= 1, got {hidden!r}")
        if layers < 1:
            raise ValueError(f"`layers` must be >= 1, got {layers!r}")
        if recurrent_init_scale is not None and not recurrent_init_scale > 0:
            raise ValueError(f"`recurrent_init_scale` must be > 0 or None, got {recurrent_init_scale!r}")
        self.save_hyperparameters()
        self.rnn = CELLS[cell](input_size, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_outputs)
        if recurrent_init_scale is not None:
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if name.startswith("weight_hh"):
                        for block in p.split(hidden, dim=0):
                            nn.init.orthogonal_(block)
                            block.mul_(recurrent_init_scale)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


# A tanh RNN whose recurrent weights start at 2x orthogonal, trained by SGD with momentum: on sequences
# of 10 steps its gradients explode within the first steps, and a clipped run learns the task (Pascanu
# et al. 2013 show clipping lets plain RNNs learn at moderate lengths; at T = 50 none of the clippers
# gets the tanh RNN below the trivial predictor within the CPU budget).
EXPLODING = {"cell": "rnn", "recurrent_init_scale": 2.0, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9}
EXPLODING_LEN = 10
SHORT = {"seq_len": EXPLODING_LEN}
CLIP = 1.0  # the fixed cap of NormClip and of ZClip (the zclip package's default max_grad_norm)


def _variant_on_exploding(name: str, what: str, build: Callable[[], list[Callback]], cures: bool) -> Variant:
    return Variant(
        name,
        f"rnn_exploding with {what}",
        dict(EXPLODING),
        build,
        cures="rnn_exploding" if cures else None,
        data=dict(SHORT),
    )


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("rnn", "pathology: tanh RNN, default init; gradients vanish over 50 steps", {"cell": "rnn"}),
        Variant(
            "rnn_exploding",
            f"pathology: tanh RNN, recurrent weights 2x orthogonal, SGD with momentum, no clipping, "
            f"T = {EXPLODING_LEN}: the gradients explode and the run diverges",
            dict(EXPLODING),
            data=dict(SHORT),
        ),
        _variant_on_exploding(
            "rnn_normclip", f"a fixed norm clip (NormClip({CLIP}))", lambda: [NormClip(max_norm=CLIP)], True
        ),
        _variant_on_exploding(
            "rnn_autoclip",
            "AutoClip (10th percentile of past norms); its threshold follows the huge norms of the first "
            "steps, so it cures some seeds and not others",
            lambda: [AutoClip(percentile=10.0)],
            False,
        ),
        _variant_on_exploding(
            "rnn_zclip",
            f"ZClip (z-score spike clipping, norm capped at {CLIP})",
            lambda: [ZClip(max_grad_norm=CLIP)],
            True,
        ),
        _variant_on_exploding(
            "rnn_agc",
            "unit-wise adaptive gradient clipping, AGC(0.05): finite, but it learns little of the task",
            lambda: [AGC(clip_factor=0.05)],
            False,
        ),
        _variant_on_exploding(
            "autopilot",
            f"StabilityAutopilot (its ZClip capped at {CLIP}; non-finite steps skipped, rollback on loss "
            "spikes, InitSwap('auto') if gradients vanish early)",
            lambda: [StabilityAutopilot(clipper=ZClip(max_grad_norm=CLIP), verbose=False)],
            True,
        ),
        Variant("lstm", "LSTM (gated memory cell), default init", {"cell": "lstm"}, cures="rnn"),
        Variant("gru", "GRU, default init", {"cell": "gru"}, cures="rnn"),
        Variant(
            "lstm_init",
            "LSTM re-initialised by InitSwap('auto'): orthogonal recurrent weights, forget bias 1",
            {"cell": "lstm"},
            lambda: [InitSwap(scheme="auto", when="fit_start", verbose=False)],
            cures="rnn",
        ),
    ]
}


def _data_args(data: str) -> dict[str, Any]:
    if data == "adding":
        return {"input_size": 2, "num_outputs": 1, "task": "regression"}
    if data == "seq_digits":
        return {"input_size": 1, "num_outputs": 10, "task": "classification"}
    raise ValueError(f"lstm trains on 'adding' or 'seq_digits', not {data!r}")


RECIPE = Recipe(
    name="lstm",
    module=SequenceModel,
    variants=VARIANTS,
    presets={
        "cpu": Preset(
            max_steps=1200,
            batch_size=64,
            data="adding",
            model={"hidden": 64},
            data_kwargs={"seq_len": 50},
            log_every_n_steps=10,
            histogram_every_n_steps=100,
            val_every_n_steps=200,
            cpu_threads=1,
        ),
        "gpu": Preset(
            max_steps=5000,
            batch_size=128,
            data="adding",
            model={"hidden": 128},
            data_kwargs={"seq_len": 200},
            trainer={"accelerator": "auto", "precision": "bf16-mixed"},
            log_every_n_steps=50,
            histogram_every_n_steps=500,
            val_every_n_steps=1000,
        ),
    },
    divergence_bound=1e6,
    data_args=_data_args,
)

cli_main = RECIPE.cli_main

if __name__ == "__main__":
    cli_main()
