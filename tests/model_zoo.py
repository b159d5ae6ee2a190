"""Tiny configurations of models people train, as LightningModules on random data (no downloads).

torchvision resnet18, timm's ViT tiny, transformers' GPT-2, Lightning's demo Transformer and LSTM
language model (``LightningLSTM`` has no ``forward``), and a module without ``forward`` that calls
functional activations. Each takes ``compile_backend``: when set, its network is wrapped in
``torch.compile`` as a submodule, so its names carry ``_orig_mod`` as users' compiled models do.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import LightningLSTM, LightningTransformer, SimpleLSTM, Transformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 64


def _compiled(module: nn.Module, backend: str | None) -> nn.Module:
    return module if backend is None else torch.compile(module, backend=backend)  # type: ignore[return-value]


def _loader(*tensors: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


class ZooModule(pl.LightningModule):
    """Common parts: an SGD optimizer over every parameter and a random data loader."""

    lr = 0.01

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def loader(self, batches: int, seed: int = 0) -> DataLoader:
        raise NotImplementedError


class ResNet18(ZooModule):
    """torchvision resnet18 on 16x16 images, 10 classes."""

    def __init__(self, compile_backend: str | None = None) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.model = _compiled(resnet18(num_classes=10), compile_backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def loader(self, batches: int, seed: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        n = 2 * batches
        return _loader(
            torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g), batch_size=2
        )


class ViTTiny(ZooModule):
    """timm's ``vit_tiny_patch16_224`` at 32x32 with 8x8 patches and two blocks, 10 classes."""

    def __init__(self, compile_backend: str | None = None) -> None:
        super().__init__()
        import timm

        net = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
        )
        self.model = _compiled(net, compile_backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def loader(self, batches: int, seed: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        n = 2 * batches
        return _loader(
            torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), batch_size=2
        )


class GPT2Tiny(ZooModule):
    """transformers' ``GPT2LMHeadModel`` with two layers of width 64 (tied embedding and head)."""

    def __init__(self, compile_backend: str | None = None) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        config = GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        self.model = _compiled(GPT2LMHeadModel(config), compile_backend)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def loader(self, batches: int, seed: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        return _loader(torch.randint(0, VOCAB, (2 * batches, 16), generator=g), batch_size=2)


class DemoTransformer(LightningTransformer):
    """Lightning's demo ``LightningTransformer`` (``forward(inputs, target)``) on random tokens, its
    ``Transformer`` one encoder and one decoder layer of width 32."""

    def __init__(self, compile_backend: str | None = None) -> None:
        super().__init__(vocab_size=VOCAB)
        net = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=32, nlayers=1, dropout=0.0)
        self.model = _compiled(net, compile_backend)

    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here; these tests use random tokens
        pass

    def loader(self, batches: int, seed: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, VOCAB, (2 * batches, 9), generator=g)
        return _loader(tokens[:, :-1], tokens[:, 1:], batch_size=2)


class DemoLSTM(LightningLSTM):
    """Lightning's demo ``LightningLSTM``: no ``forward``, its hidden state carried across batches; its
    ``SimpleLSTM`` two layers of width 32."""

    def __init__(self, compile_backend: str | None = None) -> None:
        super().__init__(vocab_size=VOCAB)
        net = SimpleLSTM(vocab_size=VOCAB, ninp=32, nhid=32, nlayers=2, dropout=0.0)
        self.model = _compiled(net, compile_backend)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here; these tests use random tokens
        pass

    def loader(self, batches: int, seed: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, VOCAB, (2 * batches, 9), generator=g)
        return _loader(tokens[:, :-1], tokens[:, 1:], batch_size=2)


class NoForward(ZooModule):
    """No ``forward``: ``training_step`` runs the layers itself, with ``F.silu`` and ``torch.tanh``."""

    def __init__(self, compile_backend: str | None = None) -> None:
        super().__init__()
        self.encoder = _compiled(nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32)), compile_backend)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        h = F.silu(self.encoder(x))
        h = torch.tanh(self.hidden(h))
        return F.cross_entropy(self.head(h), y)

    def loader(self, batches: int, seed: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        n = 4 * batches
        return _loader(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g), batch_size=4)


MODELS: dict[str, type[Any]] = {
    "resnet18": ResNet18,
    "vit_tiny": ViTTiny,
    "gpt2_tiny": GPT2Tiny,
    "demo_transformer": DemoTransformer,
    "demo_lstm": DemoLSTM,
    "no_forward": NoForward,
}
