"""The labelled diagnosis suite: short runs with a known pathology, their truths, and GradientMonitor's flags.

Each run is a small model trained for a few hundred optimizer steps on CPU with a designed pathology:
healthy, vanishing, exploding or diverging. Its truths are computed here from the run itself, never from
the library:

- **vanishing**: the float64 gradient norm of the case's first layer is below 1e-3 times its last
  layer's for 3 consecutive steps;
- **exploding**: the float64 total gradient norm (a plain loop over the gradients) is above 10 times
  its median over the (up to) 50 steps before for 3 consecutive steps, and the mean loss of the 20
  steps from there is not 20% below that of the 20 steps before;
- **diverging**: the training loss becomes non-finite, or stays for 3 consecutive steps above twice the
  lowest 10-step mean loss seen before, by more than a tenth of its starting level;
- **healthy**: none of these; the run also has to learn (final loss below 60% of the starting loss).

The onset of a truth is the first step of its first such episode. Every run trains with the monitors
of :data:`MONITORS` at once, on the same gradients: the default ``GradientMonitor`` logging every step
and every 50 steps, so the flags can be compared step by step, and one whose rules see every 10th step
only (``sample_every_n_steps=10``).

Used by ``tests/test_diagnosis_suite.py`` and ``benchmarks/diagnosis_suite.py``.
"""

from __future__ import annotations

import itertools
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stability_callbacks import GradientMonitor

CATEGORIES = ("healthy", "vanishing", "exploding", "diverging")
PATHOLOGIES = ("vanishing", "exploding", "diverging")
MONITORS: dict[str, dict[str, Any]] = {
    "log every step": {"log_every_n_steps": 1},
    "log every 50": {"log_every_n_steps": 50},
    "log every 50, rules every 10 steps": {"log_every_n_steps": 50, "sample_every_n_steps": 10},
}
"""The monitors of every run, by name: their ``GradientMonitor`` arguments (besides ``warn=False``)."""


# -- models and data ------------------------------------------------------------------------------------


class Net(pl.LightningModule):
    """A network, its loss and its optimizer; ``first`` and ``last`` name the ends for the vanishing truth."""

    def __init__(
        self,
        net: nn.Module,
        loss: Callable[[Tensor, Tensor], Tensor],
        optimizer: Callable[[Any], torch.optim.Optimizer],
        first: str,
        last: str,
        lr_at: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss
        self.make_optimizer = optimizer
        self.first, self.last = first, last
        self.lr_at = lr_at

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = self.make_optimizer(self.parameters())
        if self.lr_at is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def mlp(sizes: Sequence[int], act: type[nn.Module], init_std: float | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b)
        if init_std is not None:
            nn.init.normal_(lin.weight, 0.0, init_std)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 3)
        for m in [self.inp, *self.blocks]:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.inp(x))
        for block in self.blocks:
            x = x + torch.relu(block(x)) / len(self.blocks) ** 0.5
        return self.out(x)


class Recurrent(nn.Module):
    """An RNN/LSTM reading a sequence, then a linear head on the last hidden state."""

    def __init__(
        self, cell: str, hidden: int, recurrent_gain: float | None = None, quiet_head: bool = False
    ) -> None:
        super().__init__()
        kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "relu_rnn": nn.RNN}[cell]
        kw = {"nonlinearity": "relu"} if cell == "relu_rnn" else {}
        self.rnn = kind(2, hidden, batch_first=True, **kw)
        self.head = nn.Linear(hidden, 1)
        if quiet_head:  # start on the plateau: predict the mean sum (1.0), with a small readout
            with torch.no_grad():
                self.head.bias.fill_(1.0)
                self.head.weight.mul_(0.01)
        if recurrent_gain is not None:
            with torch.no_grad():
                w = self.rnn.weight_hh_l0
                nn.init.orthogonal_(w)
                w.mul_(recurrent_gain)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


class Transformer(nn.Module):
    """A small encoder over token embeddings, mean-pooled, then a classifier."""

    def __init__(self, vocab: int = 16, d: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def classification(n: int, features: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Labels of a random teacher network: learnable to near-zero loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    return x, (x @ teacher).argmax(1)


def adding_problem(n: int, length: int, seed: int) -> tuple[Tensor, Tensor]:
    """Hochreiter & Schmidhuber's adding problem: the sum of the two marked values of a sequence."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, length, generator=g)
    marks = torch.zeros(n, length)
    first = torch.randint(0, length // 2, (n,), generator=g)
    second = torch.randint(length // 2, length, (n,), generator=g)
    marks[torch.arange(n), first] = 1.0
    marks[torch.arange(n), second] = 1.0
    return torch.stack([values, marks], -1), (values * marks).sum(1)


def token_task(n: int, length: int, vocab: int, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class = the most frequent residue of the tokens modulo ``classes``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    counts = torch.stack([(x % classes == c).sum(1) for c in range(classes)], 1)
    return x, counts.argmax(1)


# -- the runs -------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One labelled run: its category, how to build it, and how long it trains."""

    name: str
    category: str
    build: Callable[[], tuple[Net, tuple[Tensor, Tensor]]]
    steps: int = 200
    batch_size: int = 64


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.mse_loss(out, y)


def _sgd(lr: float, momentum: float = 0.0) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum)


def _adam(lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    return lambda p: torch.optim.Adam(p, lr=lr)


def _relu_mlp() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = mlp([8, 64, 64, 3], nn.ReLU)
    return Net(net, _ce, _adam(1e-2), "net.0", "net.4"), classification(512, 8, 3, 0)


def _sum_autoencoder() -> tuple[Net, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 32, generator=g) * 3.0  # rank 8
    net = mlp([32, 16, 32], nn.ReLU)

    def loss(out: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(out, y, reduction="sum")

    return Net(net, loss, _adam(1e-2), "net.0", "net.2"), (x, x)


def _lstm_breakoff() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = Recurrent("lstm", 32, quiet_head=True)
    return Net(net, _mse, _adam(1e-2), "net.rnn", "net.head"), adding_problem(4096, 15, 2)


def _residual() -> tuple[Net, tuple[Tensor, Tensor]]:
    return Net(Residual(32, 18), _ce, _sgd(0.02), "net.inp", "net.out"), classification(512, 8, 3, 3)


def _transformer() -> tuple[Net, tuple[Tensor, Tensor]]:
    return Net(Transformer(), _ce, _adam(3e-3), "net.embed", "net.head"), token_task(2048, 12, 16, 4, 4)


def _tanh_regression() -> tuple[Net, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(512, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    return Net(mlp([4, 32, 32, 1], nn.Tanh), _mse, _adam(1e-2), "net.0", "net.4"), (x, y)


def _deep_sigmoid() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = mlp([8] + [32] * 19 + [3], nn.Sigmoid)
    return Net(net, _ce, _sgd(0.1), "net.0", "net.38"), classification(512, 8, 3, 6)


def _deep_tanh_small_init() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = mlp([8] + [32] * 15 + [3], nn.Tanh, init_std=0.05)
    return Net(net, _ce, _sgd(0.05), "net.0", "net.30"), classification(512, 8, 3, 7)


def _growing(rate: float) -> Callable[[int], float]:
    return lambda s: rate**s


def _jump(at: int, factor: float) -> Callable[[int], float]:
    return lambda s: factor if s >= at else 1.0


def _tanh_rnn_lr_growth() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = Recurrent("rnn", 32, 1.0)
    return Net(net, _mse, _sgd(0.02), "net.rnn", "net.head", _growing(1.03)), adding_problem(4096, 30, 8)


def _tanh_rnn_lr_jump() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = Recurrent("rnn", 32, 1.0)
    return Net(net, _mse, _sgd(0.05), "net.rnn", "net.head", _jump(60, 20.0)), adding_problem(4096, 30, 9)


def _mlp_sgd_lr_growth() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = mlp([8, 64, 64, 1], nn.Tanh)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, :4] * x[:, 4:]).sum(1, keepdim=True)
    return Net(net, _mse, _sgd(0.01, 0.9), "net.0", "net.4", _growing(1.04)), (x, y)


def _transformer_lr_jump() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = Transformer()
    return Net(net, _ce, _adam(3e-3), "net.embed", "net.head", _jump(100, 30.0)), token_task(
        2048, 12, 16, 4, 10
    )


def _mlp_adam_lr_jump() -> tuple[Net, tuple[Tensor, Tensor]]:
    net = mlp([8, 64, 64, 3], nn.ReLU)
    return Net(net, _ce, _adam(3e-3), "net.0", "net.4", _jump(100, 300.0)), classification(512, 8, 3, 12)


def _regression_adam_lr_growth() -> tuple[Net, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(13)
    x = torch.randn(512, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    net = mlp([4, 32, 32, 1], nn.Tanh)
    return Net(net, _mse, _adam(1e-3), "net.0", "net.4", _growing(1.04)), (x, y)


CASES = [
    Case("relu_mlp_to_zero_loss", "healthy", _relu_mlp),
    Case("autoencoder_sum_reduction", "healthy", _sum_autoencoder),
    Case("lstm_plateau_break_off", "healthy", _lstm_breakoff, steps=300),
    Case("residual_relu_20_layers", "healthy", _residual),
    Case("transformer_adam", "healthy", _transformer),
    Case("tanh_regression_to_zero", "healthy", _tanh_regression),
    Case("sigmoid_20_layers", "vanishing", _deep_sigmoid),
    Case("tanh_16_layers_small_init", "vanishing", _deep_tanh_small_init),
    Case("tanh_rnn_sgd_lr_growth", "exploding", _tanh_rnn_lr_growth, steps=100),
    Case("tanh_rnn_sgd_lr_jump_at_60", "exploding", _tanh_rnn_lr_jump, steps=100),
    Case("tanh_mlp_momentum_lr_growth", "exploding", _mlp_sgd_lr_growth, steps=150),
    Case("transformer_adam_lr_jump", "diverging", _transformer_lr_jump),
    Case("relu_mlp_adam_lr_jump", "diverging", _mlp_adam_lr_jump),
    Case("tanh_regression_adam_lr_growth", "diverging", _regression_adam_lr_growth, steps=150),
]


# -- recording ------------------------------------------------------------------------------------------


class Recorder(Callback):
    """The run's own record, per optimizer step: the loss, and float64 gradient norms (a plain loop) of all
    parameters and of the two end layers the case names."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.depth: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        def norm(params: Any) -> float:
            return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None))

        mods = dict(pl_module.named_modules())
        self.norms.append(norm(pl_module.parameters()))
        first = norm(mods[pl_module.first].parameters(recurse=False))
        last = norm(mods[pl_module.last].parameters(recurse=False))
        self.depth.append(first / last if last > 0 else math.nan)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


class FlagReader(Callback):
    """After each optimizer step, the flags of each monitor that diagnosed that step."""

    def __init__(self, monitors: dict[str, GradientMonitor]) -> None:
        self.monitors = monitors
        self.flags: dict[str, dict[int, dict[str, bool]]] = {name: {} for name in monitors}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step - 1
        for name, monitor in self.monitors.items():
            d = monitor.last_diagnosis
            if d is not None and d.step == step:
                self.flags[name][step] = d.flags()


@dataclass
class Result:
    """A run's truths (with their onsets) and, per monitor of :data:`MONITORS`, its first flag steps."""

    case: Case
    truths: dict[str, int]  # pathology -> onset step
    learned: bool
    first_flagged: dict[str, dict[str, int]]  # monitor -> pathology -> first flagged step
    flags: dict[str, dict[int, dict[str, bool]]]  # monitor -> logged step -> flags
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    ends: tuple[str | None, str | None] = (None, None)  # the depth ratio's layers, as the monitor chose
    seconds: float = 0.0


def _first_run_of(flags: Sequence[bool], length: int = 3) -> int | None:
    """The first step that starts ``length`` consecutive true flags."""
    for t in range(len(flags) - length + 1):
        if all(flags[t : t + length]):
            return t
    return None


def truths_of(rec: Recorder) -> tuple[dict[str, int], bool]:
    """The pathologies the record shows, each with its onset step, and whether the run learned."""
    losses, norms = rec.losses, rec.norms
    start = statistics.fmean(losses[:10])
    found = {
        # the first layer's float64 gradient norm below 1e-3 times the last layer's
        "vanishing": _first_run_of([r < 1e-3 for r in rec.depth]),
        # the norm above 10x its median over the (up to) 50 steps before, for 3 steps, while the loss
        # does not improve by 20% from the 20 steps before to the 20 steps after
        "exploding": next(
            (
                t
                for t in range(10, len(norms) - 2)
                if all(not g <= 10 * statistics.median(norms[max(0, t - 50) : t]) for g in norms[t : t + 3])
                and not statistics.fmean(losses[t : t + 20]) < 0.8 * statistics.fmean(losses[t - 20 : t])
            ),
            None,
        ),
        # the loss non-finite, or above twice its lowest 10-step mean so far, by a tenth of its start
        "diverging": _first_run_of(
            [
                not math.isfinite(x)
                or (
                    t >= 10
                    and x > 2 * (low := min(statistics.fmean(losses[s - 10 : s]) for s in range(10, t + 1)))
                    and x - low > 0.1 * start
                )
                for t, x in enumerate(losses)
            ]
        ),
    }
    end = statistics.fmean(losses[-10:])
    learned = math.isfinite(end) and end < 0.6 * start
    return {k: v for k, v in found.items() if v is not None}, learned


def run_case(case: Case, root: str, **monitor_kw: Any) -> Result:
    """Train one case with the monitors of :data:`MONITORS`; return its truths and their flags."""
    import time

    torch.manual_seed(0)
    model, (x, y) = case.build()
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=case.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    monitors = {
        name: GradientMonitor(per_layer=False, warn=False, **kw, **monitor_kw)
        for name, kw in MONITORS.items()
    }
    rec = Recorder()
    reader = FlagReader(monitors)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=case.steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        callbacks=[*monitors.values(), rec, reader],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and steady on a shared machine
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, loader)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    truths, learned = truths_of(rec)
    first = {}
    for c, m in monitors.items():
        d = m.last_diagnosis
        first[c] = dict(d.first_flagged) if d is not None else {}
    last = next(iter(monitors.values())).last_diagnosis
    ends = (last.first_layer, last.last_layer) if last is not None else (None, None)
    return Result(case, truths, learned, first, reader.flags, rec.losses, rec.norms, ends, seconds)


# -- scores ---------------------------------------------------------------------------------------------


@dataclass
class Score:
    """Precision and recall of one category for one monitor, and the delays from onset to first flag."""

    category: str
    runs: int  # runs whose truth has this category
    flagged: int  # runs the monitor flagged with it
    hits: int  # both
    delays: list[int] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.hits / self.flagged if self.flagged else 1.0

    @property
    def recall(self) -> float:
        return self.hits / self.runs if self.runs else 1.0


def scores(results: Sequence[Result], monitor: str) -> list[Score]:
    """Per category, over the runs: how often the monitor's verdict matches the truth ("healthy": no
    truth, and no flag)."""
    out = []
    for category in CATEGORIES:
        s = Score(category, 0, 0, 0)
        for r in results:
            flagged = r.first_flagged[monitor]
            if category == "healthy":
                truth, flag = not r.truths, not flagged
            else:
                truth, flag = category in r.truths, category in flagged
            s.runs += truth
            s.flagged += flag
            s.hits += truth and flag
            if truth and flag and category != "healthy":
                s.delays.append(flagged[category] - r.truths[category])
        out.append(s)
    return out
