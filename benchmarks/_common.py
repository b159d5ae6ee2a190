"""Shared pieces of the benchmarks: the two models, a step timer, and the fit loop that times them."""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class Classifier(pl.LightningModule):
    """Wraps a network into a LightningModule trained with SGD on cross-entropy."""

    def __init__(self, net: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def deep_mlp(depth: int = 300, width: int = 32, in_features: int = 64) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(in_features, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (factory, input shape without batch, batch size)
    "resnet18": (resnet18, (3, 32, 32), 32),
    "mlp300": (deep_mlp, (64,), 64),
}


def loader(shape: tuple[int, ...], batch_size: int, steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batch_size * min(steps, 32)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# Asked once: on a CUDA build without a GPU each call costs tens of microseconds.
CUDA = torch.cuda.is_available()

# The per-step hooks of callbacks and of the LightningModule where the work under test happens
# (``configure_gradient_clipping`` is where ``Trainer(gradient_clip_val=...)`` clips).
CLOCKED_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "configure_gradient_clipping",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class StepTimer(Callback):
    """Wall time of the training steps after ``warmup`` steps (batch start to batch end, synchronised),
    and of the clocked hooks of each step (see :meth:`clock`; put this timer last among the callbacks)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self._t0 = 0.0
        self._in_hooks = 0.0

    def clock(self, obj: Any) -> None:
        """Time ``obj``'s per-step hooks (those of :data:`CLOCKED_HOOKS` it has) from now on."""
        for name in CLOCKED_HOOKS:
            inner = getattr(obj, name, None)
            if inner is None:
                continue

            def timed(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
                if CUDA:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = _inner(*args, **kwargs)
                if CUDA:
                    torch.cuda.synchronize()
                self._in_hooks += time.perf_counter() - t0
                return out

            setattr(obj, name, timed)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if CUDA:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if CUDA:
            torch.cuda.synchronize()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._t0)
            self.hook_times.append(self._in_hooks)
        self._in_hooks = 0.0  # the next step's hooks start with the callbacks' on_train_batch_start


def time_fit(
    model_name: str,
    callbacks: list[Callback],
    steps: int,
    module_cls: type[Classifier] = Classifier,
    trainer_kwargs: dict[str, Any] | None = None,
    warmup: int = 5,
) -> float:
    """Mean step time (seconds) of a fresh fit of ``steps`` steps after ``warmup``, TensorBoard logging."""
    return time_fit_and_hooks(model_name, callbacks, steps, module_cls, trainer_kwargs, warmup)[0]


def time_fit_and_hooks(
    model_name: str,
    callbacks: list[Callback],
    steps: int,
    module_cls: type[Classifier] = Classifier,
    trainer_kwargs: dict[str, Any] | None = None,
    warmup: int = 5,
) -> tuple[float, float]:
    """Mean step time and mean time per step in the callbacks' and the module's hooks (seconds).

    The hook time is what the work under test costs (the callbacks' per-step hooks, the module's, and
    Lightning's ``gradient_clip_val`` clipping), measured without the noise of the rest of the step,
    which on a shared CPU varies between fits by more than a callback costs.
    """
    factory, shape, batch_size = MODELS[model_name]
    torch.manual_seed(0)
    module = module_cls(factory())
    timer = StepTimer(warmup)
    for obj in (module, *callbacks):
        timer.clock(obj)
    with tempfile.TemporaryDirectory() as tmp:
        kwargs: dict[str, Any] = dict(
            accelerator="auto",
            devices=1,
            max_steps=steps + warmup,
            max_epochs=None,
            logger=TensorBoardLogger(tmp, name="bench"),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            log_every_n_steps=50,
            callbacks=[*callbacks, timer],
        )
        kwargs.update(trainer_kwargs or {})
        pl.Trainer(**kwargs).fit(module, loader(shape, batch_size, steps))
    return sum(timer.times) / len(timer.times), sum(timer.hook_times) / len(timer.hook_times)


def run_table(
    variants: dict[str, Callable[[str, int], float | tuple[float, float]]],
    models: list[str],
    steps: dict[str, int],
    repeats: int,
    baseline: str = "bare",
) -> list[dict[str, Any]]:
    """Time every variant on every model ``repeats`` times, interleaved; median step times and ratios.

    A variant returns its mean step time, or (from :func:`time_fit_and_hooks`) its mean step time and
    mean hook time; the rows then also hold ``hook_ms`` and ``hooks_ratio``, the ratio to the baseline
    that the hook times imply: ``(baseline step - baseline hooks + hooks) / baseline step``.
    """
    rows: list[dict[str, Any]] = []
    for model in models:
        samples: dict[str, list[float]] = {name: [] for name in variants}
        hooks: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, run in variants.items():
                result = run(model, steps[model])
                step, hook = result if isinstance(result, tuple) else (result, None)
                samples[name].append(step)
                if hook is not None:
                    hooks[name].append(hook)
        base = statistics.median(samples[baseline])
        base_hooks = statistics.median(hooks[baseline]) if hooks[baseline] else None
        for name in variants:
            med = statistics.median(samples[name])
            row = {"model": model, "variant": name, "step_ms": med * 1e3, "ratio": med / base}
            if hooks[name] and base_hooks is not None:
                hook = statistics.median(hooks[name])
                row["hook_ms"] = hook * 1e3
                row["hooks_ratio"] = (base - base_hooks + hook) / base
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], extra: list[str] | None = None) -> str:
    cols = ["model", "variant", "step_ms", "ratio", *(extra or [])]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    if CUDA:
        return f"GPU {torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"
