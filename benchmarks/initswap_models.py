"""Does ``InitSwap('auto')`` at fit start leave well-initialised models as good as they were?

Trains tiny configurations of three models that come with their own initialisation, each for a fixed
number of steps with and without ``InitSwap('auto')`` (``when="fit_start"``), from the same seed and
on the same batches, and prints the final training loss of both (the mean over the last 10 steps,
then over the seeds) and their ratio (with / without; at most about 1.0 means InitSwap did not make
training worse), with the ratio of each seed:

- torchvision ``resnet18`` (He fan-out convolutions) on 32x32 images of 10 classes, SGD with momentum;
- timm ``vit_tiny_patch16_224`` at ``img_size=32, patch_size=8`` (truncated-normal linears), AdamW;
- transformers ``GPT2LMHeadModel`` with ``GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256)``
  (N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), tied head), AdamW.

The data is synthetic with structure a model can learn: images are a class template plus noise, and
token sequences follow a fixed random successor table with 10% of the tokens replaced at random.
Nothing is downloaded; weights start from random initialisation.

    python benchmarks/initswap_models.py                  # 5 seeds, 60 steps, one thread
    python benchmarks/initswap_models.py --seeds 3 --steps 40 --models gpt2_tiny
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stability_callbacks import InitSwap

BATCH = 32
VOCAB = 256
SEQ = 32


class Task(pl.LightningModule):
    """A network, its loss and its optimizer; ``losses`` keeps the training loss of every step."""

    def __init__(self, net: nn.Module, loss: Callable[[nn.Module, Any], Tensor], optimizer: str) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss
        self.optimizer = optimizer
        self.losses: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss_fn(self.net, batch)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def final_loss(self, last: int = 10) -> float:
        return float(torch.stack(self.losses[-last:]).mean())


def image_data(n: int, seed: int) -> TensorDataset:
    """10 classes: a fixed random 3x32x32 template per class (seed 1234) plus unit Gaussian noise."""
    templates = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.5 * templates[y] + torch.randn(n, 3, 32, 32, generator=g)
    return TensorDataset(x, y)


def token_data(n: int, seed: int) -> TensorDataset:
    """Sequences that follow a fixed random successor table (seed 1234), 10% of tokens random."""
    successor = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, SEQ, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for i in range(1, SEQ):
        tokens[:, i] = successor[tokens[:, i - 1]]
    noise = torch.rand(n, SEQ, generator=g) < 0.1
    tokens[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
    return TensorDataset(tokens)


def classify(net: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


def language_model(net: nn.Module, batch: Any) -> Tensor:
    (tokens,) = batch
    return net(input_ids=tokens, labels=tokens).loss


def make_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def make_vit_tiny() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10
    )


def make_gpt2_tiny() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], TensorDataset], Any, str]] = {
    # name: (network, data, loss, optimizer)
    "resnet18": (make_resnet18, image_data, classify, "sgd"),
    "vit_tiny": (make_vit_tiny, image_data, classify, "adamw"),
    "gpt2_tiny": (make_gpt2_tiny, token_data, language_model, "adamw"),
}


def run(name: str, seed: int, steps: int, with_initswap: bool) -> tuple[float, int, float]:
    """Final training loss, parameters InitSwap changed, and seconds, for one model and seed."""
    factory, data, loss, optimizer = MODELS[name]
    pl.seed_everything(seed, verbose=False)
    task = Task(factory(), loss, optimizer)
    train = DataLoader(data(BATCH * steps, seed), batch_size=BATCH)
    swap = InitSwap("auto", when="fit_start", verbose=False)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            max_epochs=None,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[swap] if with_initswap else [],
        )
        start = time.perf_counter()
        trainer.fit(task, train)
        seconds = time.perf_counter() - start
    changed = len(swap.last_report.changed) if with_initswap and swap.last_report is not None else 0
    return task.final_loss(), changed, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seeds = f"seeds 0..{args.seeds - 1}"
    print(f"InitSwap('auto') at fit start, {args.steps} steps, {seeds}, torch {torch.__version__}")
    print("| model | parameters InitSwap changed | final loss without | final loss with | ratio |", end="")
    print(" ratio per seed |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for name in args.models.split(","):
        base, swapped, ratios, changed = [], [], [], 0
        for seed in range(args.seeds):
            without, _, _ = run(name, seed, args.steps, with_initswap=False)
            with_, changed, _ = run(name, seed, args.steps, with_initswap=True)
            base.append(without)
            swapped.append(with_)
            ratios.append(with_ / without)
        ratio = statistics.mean(swapped) / statistics.mean(base)
        worst = max(worst, ratio)
        print(
            f"| {name} | {changed} | {statistics.mean(base):.4f} | {statistics.mean(swapped):.4f} | "
            f"{ratio:.3f}x | {', '.join(f'{r:.3f}' for r in ratios)} |",
            flush=True,
        )
    print(f"worst ratio: {worst:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
