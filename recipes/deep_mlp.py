"""Deep MLP recipe: fully connected nets whose gradients vanish in three classic ways, the remedies that
cure each one, and remedies tried where they cure nothing.

Every variant changes one thing, and each remedy names the pathology it cures (``Variant.cures``):

- ``sigmoid``: 30 sigmoid layers under PyTorch's default initialisation, trained with SGD, pass almost no
  gradient to their first layers and stay at chance (Glorot & Bengio 2010; Hochreiter 1991). Cured by a
  non-saturating activation with its He initialisation (He et al. 2015), BatchNorm (Ioffe & Szegedy
  2015), residual connections (He et al. 2016), highway layers (Srivastava et al. 2015), and
  :class:`~stability_callbacks.autopilot.StabilityAutopilot`, which finds the vanishing gradients and
  re-initialises.
- ``tanh``: the same with tanh, whose zero-centred units LayerNorm (Ba et al. 2016) can normalise; cured by
  LayerNorm and by an initialisation chosen by :class:`~stability_callbacks.init.InitSwap` or LSUV
  (Mishkin & Matas 2015).
- ``sigmoid_6``: 6 sigmoid layers, whose gradients vanish under SGD but stay far above Adam's eps, so the
  per-parameter step sizes of Adam (Kingma & Ba 2015) and RMSprop (Tieleman & Hinton 2012) rescue them.
- ``swish``, ``warmup``, ``ema`` and ``regularized`` are kept with the baselines they were tried on
  (``sigmoid``; ``high_lr``, ReLU at ten times its learning rate; ``noisy``, Adam at a constant rate with
  dropout; ``overfit``, a wide net that memorises the training digits) but cure nothing in this recipe:
  the README gives their numbers.

Run one variant with ``python -m recipes run deep_mlp --variant sigmoid`` or all with
``python -m recipes compare deep_mlp``; as a LightningCLI script::

    python -m recipes.deep_mlp fit --config recipes/configs/deep_mlp_sigmoid.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from recipes.base import RecipeModule, activation_module
from recipes.spec import Preset, Recipe, Variant
from stability_callbacks import InitSwap, StabilityAutopilot

__all__ = ["RECIPE", "VARIANTS", "DeepMLP", "HighwayLayer", "ResidualLayer", "cli_main"]

NORMS = ("none", "batch", "layer")
INITS = ("default", "he", "xavier")


def _norm(kind: str, width: int) -> nn.Module | None:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    return None


class ResidualLayer(nn.Module):
    """Pre-activation residual layer: ``h + Linear(dropout(act(norm(h))))``."""

    def __init__(self, width: int, activation: str, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm = _norm(norm, width)
        self.act = activation_module(activation)
        self.drop = nn.Dropout(dropout) if dropout else None
        self.linear = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        z = self.norm(h) if self.norm is not None else h
        z = self.act(z)
        if self.drop is not None:
            z = self.drop(z)
        return h + self.linear(z)


class HighwayLayer(nn.Module):
    """Highway layer (Srivastava et al. 2015): ``y = H(x) * T(x) + x * (1 - T(x))`` with transform gate
    ``T = sigmoid(W_T x + b_T)``, ``b_T`` initialised to ``gate_bias`` (negative: carry at first)."""

    def __init__(self, width: int, activation: str, dropout: float, gate_bias: float = -4.0) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = activation_module(activation)
        self.gate = nn.Linear(width, width)
        self.gate_act = nn.Sigmoid()
        self.drop = nn.Dropout(dropout) if dropout else None
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.linear(x))
        if self.drop is not None:
            h = self.drop(h)
        t = self.gate_act(self.gate(x))
        return h * t + x * (1.0 - t)


class DeepMLP(RecipeModule):
    """A deep fully connected classifier with switchable activation, normalisation and shortcuts.

    ``depth`` counts the weight layers between input and output: an input projection, ``depth - 2``
    hidden layers (plain ``Linear -> norm -> act``, residual or highway) and the classifier.

    Args:
        depth: number of weight layers (>= 2).
        width: hidden width.
        activation: ``sigmoid``, ``tanh``, ``relu``, ``leaky_relu`` (slope 0.2), ``elu`` or ``silu``.
        norm: ``none``, ``batch`` or ``layer``.
        residual: pre-activation residual hidden layers.
        highway: highway hidden layers (exclusive with ``residual``).
        dropout: dropout probability after each activation.
        init: ``default`` (PyTorch's), ``he`` (Kaiming normal with the activation's gain, LeakyReLU's
            slope included) or ``xavier`` (Glorot normal with the activation's gain); biases zero; the
            residual branches are then scaled by ``1 / sqrt(number of branches)``.
        in_features: input features (64 for the digits, 784 for flat MNIST).
        num_classes: output classes.
        optimizer, lr, momentum, weight_decay, warmup_steps, cosine: see
            :class:`~recipes.base.RecipeModule`.
    """

    def __init__(
        self,
        depth: int = 30,
        width: int = 64,
        activation: str = "sigmoid",
        norm: str = "none",
        residual: bool = False,
        highway: bool = False,
        dropout: float = 0.0,
        init: str = "default",
        in_features: int = 64,
        num_classes: int = 10,
        optimizer: str = "sgd",
        lr: float = 0.005,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        cosine: bool = True,
    ) -> None:
        super().__init__("classification", optimizer, lr, momentum, weight_decay, warmup_steps, cosine)
        if depth < 2:
            raise ValueError(f"`depth` must be >= 2, got {depth!r}")
        if width < 1:
            raise ValueError(f"`width` must be >= 1, got {width!r}")
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}")
        if init not in INITS:
            raise ValueError(f"`init` must be one of {INITS}, got {init!r}")
        if residual and highway:
            raise ValueError("`residual` and `highway` cannot both be True")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        activation_module(activation)  # validates the name
        self.save_hyperparameters()
        self.activation = activation
        layers: list[nn.Module] = [nn.Linear(in_features, width)]
        if residual or highway:
            for _ in range(depth - 2):
                if residual:
                    layers.append(ResidualLayer(width, activation, norm, dropout))
                else:
                    layers.append(HighwayLayer(width, activation, dropout))
            norm_out = _norm(norm, width) if residual else None
            if norm_out is not None:
                layers.append(norm_out)
            layers.append(activation_module(activation))
        else:
            for i in range(depth - 1):
                if i > 0:
                    layers.append(nn.Linear(width, width))
                norm_mod = _norm(norm, width)
                if norm_mod is not None:
                    layers.append(norm_mod)
                layers.append(activation_module(activation))
                if dropout:
                    layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        if init != "default":
            self._init_weights(init)

    def _init_weights(self, init: str) -> None:
        act = self.activation
        nonlin: Any
        if act in ("relu", "leaky_relu"):
            nonlin, slope = act, 0.2 if act == "leaky_relu" else 0.0
        elif act in ("elu", "silu"):
            nonlin, slope = "relu", 0.0
        else:
            nonlin, slope = act, 0.0
        head = self.net[-1]
        gates = {id(h.gate) for h in self.modules() if isinstance(h, HighwayLayer)}
        for mod in self.modules():
            if isinstance(mod, nn.Linear) and id(mod) not in gates:
                if mod is head:  # no activation follows the classifier: Glorot, gain 1
                    nn.init.xavier_normal_(mod.weight)
                elif init == "he":
                    nn.init.kaiming_normal_(mod.weight, a=slope, nonlinearity=nonlin)
                else:
                    nn.init.xavier_normal_(mod.weight, gain=nn.init.calculate_gain(nonlin, slope))
                nn.init.zeros_(mod.bias)
        # Each residual branch adds its variance to the stream: scale the branches by 1/sqrt(count) so the
        # output variance stays bounded at any depth (as GPT-2 and Fixup do).
        branches = [m.linear for m in self.modules() if isinstance(m, ResidualLayer)]
        for lin in branches:
            with torch.no_grad():
                lin.weight.mul_(len(branches) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _ema() -> list[Callback]:
    # Imported here, when the variant runs: EMAWeightAveraging is recent in Lightning, and the other
    # variants run on the older releases the package supports.
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return [EMAWeightAveraging(decay=0.99)]


RELU_HE = {"activation": "relu", "init": "he"}
TANH = {"activation": "tanh"}
SHALLOW_SIGMOID = {"depth": 6}  # gradients small (first layer ~1e-4 of the last) but far above Adam's eps
HIGH_LR = {**RELU_HE, "lr": 0.05}  # ten times relu_he's: without warm-up the first steps blow up
# Adam's normalised steps at a constant rate, and dropout, keep the weights moving to the end of the run.
NOISY = {**RELU_HE, "depth": 4, "optimizer": "adam", "lr": 1e-2, "cosine": False, "dropout": 0.3}
OVERFIT = {**RELU_HE, "depth": 3, "width": 512, "lr": 0.05}  # 0.3M weights for 1437 digits

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("sigmoid", "pathology: 30 sigmoid layers, PyTorch default init, SGD; gradients vanish"),
        Variant("relu_he", "ReLU with He initialisation", dict(RELU_HE), cures="sigmoid"),
        Variant(
            "leaky_relu",
            "LeakyReLU(0.2) with its own He gain",
            {"activation": "leaky_relu", "init": "he"},
            cures="sigmoid",
        ),
        Variant("elu", "ELU with He initialisation", {"activation": "elu", "init": "he"}, cures="sigmoid"),
        Variant("swish", "SiLU (swish) with He initialisation", {"activation": "silu", "init": "he"}),
        Variant(
            "batchnorm",
            "sigmoid net with BatchNorm before every activation",
            {"norm": "batch"},
            cures="sigmoid",
        ),
        Variant(
            "residual",
            "sigmoid net with pre-activation residual connections",
            {"residual": True},
            cures="sigmoid",
        ),
        Variant(
            "highway", "sigmoid net with highway (gated carry) layers", {"highway": True}, cures="sigmoid"
        ),
        Variant(
            "autopilot",
            "sigmoid baseline with StabilityAutopilot(reinit_scheme='lsuv'): re-initialised by centred LSUV "
            "once vanishing is flagged (Xavier gain 1, 'auto', leaves 30 sigmoid layers vanishing)",
            {},
            # Xavier with the sigmoid's gain of 1 ("auto") leaves a 30-layer sigmoid stack vanishing;
            # centred LSUV gives every layer unit-variance, zero-mean pre-activations and so brings it back.
            lambda: [StabilityAutopilot(reinit_scheme="lsuv", verbose=False)],
            cures="sigmoid",
        ),
        Variant("tanh", "pathology: 30 tanh layers, PyTorch default init, SGD; gradients vanish", dict(TANH)),
        Variant(
            "layernorm",
            "tanh net with LayerNorm before every activation (zero-centred units, as LayerNorm needs)",
            {**TANH, "norm": "layer"},
            cures="tanh",
        ),
        Variant(
            "initswap",
            "tanh net; InitSwap('auto') re-initialises it (Xavier, tanh gain 5/3) once vanishing is flagged",
            dict(TANH),
            lambda: [InitSwap(scheme="auto", when="on_vanishing")],
            cures="tanh",
        ),
        Variant(
            "lsuv",
            "tanh net re-initialised by InitSwap('lsuv') at fit start (unit output variance per layer)",
            dict(TANH),
            lambda: [InitSwap(scheme="lsuv", when="fit_start")],
            cures="tanh",
        ),
        Variant(
            "sigmoid_6",
            "pathology: 6 sigmoid layers, SGD; gradients vanish, but stay far above Adam's eps",
            dict(SHALLOW_SIGMOID),
        ),
        Variant(
            "adam",
            "sigmoid_6 trained with Adam (per-parameter step sizes), learning rate 0.01",
            {**SHALLOW_SIGMOID, "optimizer": "adam", "lr": 1e-2},
            cures="sigmoid_6",
        ),
        Variant(
            "rmsprop",
            "sigmoid_6 trained with RMSprop, learning rate 0.003",
            {**SHALLOW_SIGMOID, "optimizer": "rmsprop", "lr": 3e-3},
            cures="sigmoid_6",
        ),
        # The remedies below cure nothing here (see the README): each keeps the baseline it was tried on.
        Variant("high_lr", "baseline: relu_he at ten times its learning rate (0.05), no warm-up", HIGH_LR),
        Variant(
            "warmup",
            "high_lr with a 200-step linear warm-up before its cosine decay",
            {**HIGH_LR, "warmup_steps": 200},
        ),
        Variant("noisy", "baseline: 4 ReLU layers, Adam at a constant 0.01, dropout 0.3", NOISY),
        Variant("ema", "noisy with Lightning's EMA weight averaging (decay 0.99)", dict(NOISY), _ema),
        Variant("overfit", "baseline: 3 ReLU layers of 512 memorise the 1437 training digits", OVERFIT),
        Variant(
            "regularized",
            "overfit with dropout 0.5 and L2 weight decay 1e-3",
            {**OVERFIT, "dropout": 0.5, "weight_decay": 1e-3},
        ),
    ]
}


def _data_args(data: str) -> dict[str, Any]:
    features = {"digits": 64, "mnist": 784, "fashion_mnist": 784, "cifar10": 3072}
    if data not in features:
        raise ValueError(f"deep_mlp trains on {sorted(features)}, not {data!r}")
    return {"in_features": features[data], "num_classes": 10}


RECIPE = Recipe(
    name="deep_mlp",
    module=DeepMLP,
    variants=VARIANTS,
    presets={
        "cpu": Preset(
            max_steps=1000,
            batch_size=64,
            data="digits",
            log_every_n_steps=10,
            histogram_every_n_steps=100,
            val_every_n_steps=200,
            cpu_threads=1,
        ),
        "gpu": Preset(
            max_steps=5000,
            batch_size=128,
            data="digits",
            gpu_data="mnist",
            model={"width": 256},
            trainer={"accelerator": "auto", "precision": "bf16-mixed"},
            log_every_n_steps=50,
            histogram_every_n_steps=500,
            val_every_n_steps=1000,
        ),
    },
    divergence_bound=1e3,
    data_args=_data_args,
    flat=True,
)

cli_main = RECIPE.cli_main

if __name__ == "__main__":
    cli_main()
