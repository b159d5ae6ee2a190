"""ResNet recipe: a plain deep CNN trains worse than its residual twin (He et al. 2016).

The network is the CIFAR-style ResNet of depth ``6n + 2`` of He et al. 2016 (section 4.2): a 3x3 stem,
three stages of ``n`` basic blocks with 16, 32 and 64 channels (stride 2 between stages, identity
shortcuts padded with zeros, "option A"), global average pooling and a linear classifier. ``plain=True``
removes the shortcuts and leaves the same layers. ``norm_free=True`` is a normalisation-free residual
network in the spirit of Brock et al. 2021 (weight-standardised convolutions, scaled ReLU, residual
branches that start at zero), the setting adaptive gradient clipping (AGC) was designed for.
``backbone="resnet18"`` uses torchvision's resnet18 (3x3 stem, no max-pool) instead.

Three pathologies, each with the remedies that cure it (``Variant.cures``):

- ``plain`` (32 layers, BatchNorm, He init, no shortcuts) trains worse than its twin ``residual``;
- ``plain_nobn`` (20 plain layers without BatchNorm, PyTorch's default init) has vanishing gradients and
  stays at chance; ``plain_batchnorm``, ``plain_initswap`` (He init), ``plain_lsuv`` and ``autopilot``
  (:class:`~stability_callbacks.autopilot.StabilityAutopilot`, which re-initialises it) cure it;
- ``nf`` (the normalisation-free net at a learning rate of 2) diverges; ``nf_agc`` trains it.

As a LightningCLI script::

    python -m recipes.resnet fit --config recipes/configs/resnet_plain.yaml
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from recipes.base import RecipeModule
from recipes.spec import Preset, Recipe, Variant
from stability_callbacks import AGC, InitSwap, StabilityAutopilot

__all__ = ["RECIPE", "VARIANTS", "BasicBlock", "CifarResNet", "ResNetClassifier", "WSConv2d", "cli_main"]

_NF_GAMMA = 1.7139  # ReLU's variance-preserving gain for unit-Gaussian inputs (Brock et al. 2021)


class WSConv2d(nn.Conv2d):
    """Convolution with scaled weight standardisation (Qiao et al. 2019; Brock et al. 2021): each output
    filter is standardised to zero mean and ``1 / fan_in`` variance in the forward pass, times a learnt
    gain."""

    def __init__(self, *args: Any, eps: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * torch.rsqrt(var * fan_in + self.eps) * self.gain
        return self._conv_forward(x, w, self.bias)


class _ScaledReLU(nn.ReLU):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * _NF_GAMMA


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an optional identity shortcut (zero-padded when the shape changes).

    Args:
        cin, cout: input and output channels.
        stride: stride of the first convolution.
        plain: no shortcut.
        norm_free: weight-standardised convolutions without BatchNorm; the residual branch is scaled by
            ``alpha`` and a learnt scalar that starts at zero (SkipInit, De & Smith 2020).
        alpha: residual branch scale of the normalisation-free block.
        batchnorm: BatchNorm after each convolution (ignored when ``norm_free``); without it the
            convolutions get a bias.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        plain: bool,
        norm_free: bool,
        alpha: float = 0.2,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.plain = plain
        self.norm_free = norm_free
        self.stride = stride
        self.pad = cout - cin
        conv: type[nn.Conv2d] = WSConv2d if norm_free else nn.Conv2d
        norm = batchnorm and not norm_free
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=not norm)
        self.conv2 = conv(cout, cout, 3, stride=1, padding=1, bias=not norm)
        self.bn1: nn.Module = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.bn2: nn.Module = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.act1: nn.Module = _ScaledReLU() if norm_free else nn.ReLU()
        self.act2: nn.Module = _ScaledReLU() if norm_free else nn.ReLU()
        self.alpha = alpha
        self.skip_gain = nn.Parameter(torch.zeros(())) if norm_free else None

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = nn.functional.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_free:
            assert self.skip_gain is not None  # set in __init__ when norm_free
            out = self.conv2(self.act2(self.conv1(self.act1(x))))
            return self._shortcut(x) + out * self.alpha * self.skip_gain
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.plain:
            out = out + self._shortcut(x)
        return self.act2(out)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth ``6n + 2`` (He et al. 2016, section 4.2).

    Args:
        depth: 20, 32, 44, 56, 110, ... (``(depth - 2) % 6 == 0``).
        in_channels: image channels.
        num_classes: output classes.
        width: channels of the first stage (16 in the paper; doubled at each stage).
        plain: remove every shortcut.
        norm_free: normalisation-free residual blocks.
        batchnorm: BatchNorm after each convolution (ignored when ``norm_free``).
        init: ``"he"`` (He et al. 2015, fan-out, as torchvision does) or ``"default"`` (PyTorch's own
            initialisation of the convolutions, whose variance shrinks the signal at every ReLU layer).
    """

    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 16,
        plain: bool = False,
        norm_free: bool = False,
        batchnorm: bool = True,
        init: str = "he",
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"`depth` must be 6n + 2 with n >= 1 (8, 20, 32, 56, 110...), got {depth!r}")
        if plain and norm_free:
            raise ValueError(
                "`plain` and `norm_free` cannot both be True (the norm-free net needs shortcuts)"
            )
        if init not in ("he", "default"):
            raise ValueError(f"`init` must be 'he' or 'default', got {init!r}")
        n = (depth - 2) // 6
        conv: type[nn.Conv2d] = WSConv2d if norm_free else nn.Conv2d
        norm = batchnorm and not norm_free
        self.stem = conv(in_channels, width, 3, padding=1, bias=not norm)
        self.stem_bn: nn.Module = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.stem_act = nn.ReLU()
        blocks: list[nn.Module] = []
        cin = width
        for stage in range(3):
            cout = width * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, plain, norm_free, batchnorm=batchnorm))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final_act: nn.Module = nn.ReLU() if norm_free else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if init == "he" and isinstance(m, nn.Conv2d) and not isinstance(m, WSConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_act(self.stem_bn(self.stem(x)))
        x = self.final_act(self.blocks(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    import torchvision

    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class ResNetClassifier(RecipeModule):
    """Image classifier with a CIFAR ResNet (plain, residual or normalisation-free) or resnet18.

    Args:
        depth: ResNet depth ``6n + 2`` (ignored for resnet18).
        plain: remove the shortcuts.
        norm_free: normalisation-free residual blocks (for AGC).
        batchnorm: BatchNorm after each convolution of the CIFAR net.
        init: ``"he"`` or ``"default"`` initialisation of the CIFAR net's convolutions.
        backbone: ``"cifar"`` or ``"resnet18"``.
        width: channels of the first stage.
        in_channels: image channels (1 for the digits and MNIST, 3 for CIFAR-10).
        num_classes: output classes.
        optimizer, lr, momentum, weight_decay, warmup_steps: see :class:`~recipes.base.RecipeModule`.
    """

    def __init__(
        self,
        depth: int = 20,
        plain: bool = False,
        norm_free: bool = False,
        batchnorm: bool = True,
        init: str = "he",
        backbone: str = "cifar",
        width: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__("classification", optimizer, lr, momentum, weight_decay, warmup_steps)
        if backbone not in ("cifar", "resnet18"):
            raise ValueError(f"`backbone` must be 'cifar' or 'resnet18', got {backbone!r}")
        self.save_hyperparameters()
        self.net: nn.Module
        if backbone == "resnet18":
            self.net = _resnet18(in_channels, num_classes)
        else:
            self.net = CifarResNet(depth, in_channels, num_classes, width, plain, norm_free, batchnorm, init)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


# A 20-layer plain net without BatchNorm and with PyTorch's default initialisation: every ReLU layer
# shrinks the signal, so the first layer's gradient is ~1e-10 times the last one's and it stays at chance.
VANISHING = {"plain": True, "depth": 20, "batchnorm": False, "init": "default", "lr": 0.02}
NF_LR = 2.0
NF_CLIP = 0.02
# The normalisation-free residual net at a learning rate where plain SGD with momentum blows up.
NF_HIGH_LR = {"norm_free": True, "lr": NF_LR}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "plain",
            "pathology: the 32-layer ResNet without shortcuts (same layers, BatchNorm, He init) trains "
            "worse than its residual twin",
            {"plain": True},
        ),
        Variant(
            "residual",
            "the same net with identity shortcuts (He et al. 2016)",
            cures="plain",
        ),
        Variant(
            "plain_nobn",
            "pathology: a 20-layer plain net without BatchNorm, PyTorch's default init, SGD at lr 0.02: "
            "gradients vanish toward the input",
            dict(VANISHING),
        ),
        Variant(
            "plain_batchnorm",
            "plain_nobn with BatchNorm after every convolution (Ioffe & Szegedy 2015)",
            {**VANISHING, "batchnorm": True},
            cures="plain_nobn",
        ),
        Variant(
            "plain_initswap",
            "plain_nobn re-initialised by InitSwap('auto') at fit start (He init for the ReLU layers)",
            dict(VANISHING),
            lambda: [InitSwap(scheme="auto", when="fit_start", verbose=False)],
            cures="plain_nobn",
        ),
        Variant(
            "plain_lsuv",
            "plain_nobn re-initialised by InitSwap('lsuv') at fit start (Mishkin & Matas 2016)",
            dict(VANISHING),
            lambda: [InitSwap(scheme="lsuv", when="fit_start", verbose=False)],
            cures="plain_nobn",
        ),
        Variant(
            "autopilot",
            "plain_nobn with StabilityAutopilot: it sees the gradients vanish in the first steps and "
            "re-initialises the net",
            dict(VANISHING),
            lambda: [StabilityAutopilot(verbose=False)],
            cures="plain_nobn",
        ),
        Variant(
            "nf",
            f"pathology: normalisation-free residual net (WS convs, zero-init branches), SGD at lr {NF_LR}, "
            "no clipping",
            dict(NF_HIGH_LR),
        ),
        Variant(
            "nf_agc",
            f"nf with unit-wise adaptive gradient clipping, AGC({NF_CLIP}) (Brock et al. 2021)",
            dict(NF_HIGH_LR),
            lambda: [AGC(clip_factor=NF_CLIP)],
            cures="nf",
        ),
    ]
}


def _data_args(data: str) -> dict[str, Any]:
    channels = {"digits": 1, "mnist": 1, "fashion_mnist": 1, "cifar10": 3}
    if data not in channels:
        raise ValueError(f"resnet trains on {sorted(channels)}, not {data!r}")
    return {"in_channels": channels[data], "num_classes": 10}


RECIPE = Recipe(
    name="resnet",
    module=ResNetClassifier,
    variants=VARIANTS,
    presets={
        "cpu": Preset(
            max_steps=200,
            batch_size=64,
            data="digits",
            model={"depth": 32, "width": 8},
            log_every_n_steps=10,
            histogram_every_n_steps=100,
            val_every_n_steps=100,
            cpu_threads=1,
        ),
        "gpu": Preset(
            max_steps=8000,
            batch_size=128,
            data="digits",
            gpu_data="cifar10",
            model={"depth": 110, "width": 16},
            trainer={"accelerator": "auto", "precision": "bf16-mixed"},
            log_every_n_steps=50,
            histogram_every_n_steps=500,
            val_every_n_steps=1000,
        ),
    },
    divergence_bound=1e3,
    data_args=_data_args,
    flat=False,
)

cli_main = RECIPE.cli_main

if __name__ == "__main__":
    cli_main()
