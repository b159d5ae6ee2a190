"""Activation statistics (layer 1) and ActivationMonitor, with values read back from TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, count_host_syncs, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tb_events import load_events, scalars
from torch import Tensor, nn

from stability_callbacks.activations import (
    ActivationMonitor,
    activation_stats,
    dead_fraction,
    has_saturation,
    is_activation,
    saturated_fraction,
)

# -- layer 1: known answers --------------------------------------------------------------------------


def test_dead_fraction_counts_units_zero_for_the_whole_batch() -> None:
    y = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 3.0]])
    assert dead_fraction(y).item() == 0.5  # units 0 and 2 are zero in both rows
    conv = torch.zeros(2, 3, 2, 2)
    conv[1, 0, 0, 0] = 1.0  # one of the 12 positions is alive
    assert dead_fraction(conv).item() == pytest.approx(11 / 12)
    assert dead_fraction(torch.ones(5)).item() == 0.0


def test_saturated_fraction_per_activation() -> None:
    tanh = torch.tensor([0.995, -0.999, 0.5, 0.99])
    assert saturated_fraction(tanh, nn.Tanh()).item() == 0.5  # 0.99 itself is not beyond 0.99
    sig = torch.tensor([0.005, 0.5, 0.995, 0.01])
    assert saturated_fraction(sig, nn.Sigmoid()).item() == 0.5
    relu6 = torch.tensor([0.0, 3.0, 6.0, 6.0])
    assert saturated_fraction(relu6, nn.ReLU6()).item() == 0.75
    hardtanh = torch.tensor([-2.0, 0.0, 1.9, 2.0])
    assert saturated_fraction(hardtanh, nn.Hardtanh(-2.0, 2.0)).item() == 0.5
    elu = torch.tensor([-0.995, -0.5, 1.0, 2.0])
    assert saturated_fraction(elu, nn.ELU(alpha=1.0)).item() == 0.25
    assert saturated_fraction(torch.ones(3), nn.ReLU()) is None
    assert saturated_fraction(torch.ones(3), nn.GELU()) is None
    assert [has_saturation(m) for m in (nn.Tanh(), nn.Sigmoid(), nn.ReLU(), nn.SiLU())] == [
        True,
        True,
        False,
        False,
    ]


def test_activation_stats_vector() -> None:
    y = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    dead, sat, std = activation_stats(y, nn.ReLU()).tolist()
    assert dead == 0.5 and math.isnan(sat)
    assert std == pytest.approx(float(torch.tensor([0.0, 1.0, 0.0, 3.0]).std(correction=0)))
    dead, sat, std = activation_stats(torch.tensor([[0.0, 0.999]]).bfloat16(), nn.Tanh()).tolist()
    assert (dead, sat) == (0.5, 0.5)


def test_which_modules_are_activations() -> None:
    assert all(
        is_activation(m) for m in (nn.ReLU(), nn.LeakyReLU(), nn.GELU(), nn.SiLU(), nn.Tanh(), nn.ReLU6())
    )
    assert not any(is_activation(m) for m in (nn.Linear(2, 2), nn.Dropout(), nn.Sequential()))


# -- ActivationMonitor -------------------------------------------------------------------------------


class DeepSigmoid(MLPModule):
    """30 Linear+Sigmoid layers with large weights (std 3): deep layers saturate."""

    def __init__(self, depth: int = 30, width: int = 16) -> None:
        super().__init__(depth=2, width=width, lr=0.0)
        layers: list[nn.Module] = []
        features = 8
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.Sigmoid()]
            features = width
        layers.append(nn.Linear(width, 3))
        self.net = nn.Sequential(*layers)
        torch.manual_seed(0)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=3.0)
                nn.init.normal_(m.bias, std=1.0)


class DeadReLU(MLPModule):
    """Linear(8, 16) with bias -100, ReLU, Linear(16, 16), ReLU, Linear(16, 3)."""

    def __init__(self) -> None:
        super().__init__(depth=3, width=16, activation=nn.ReLU, lr=0.0)
        with torch.no_grad():
            self.net[0].bias.fill_(-100.0)


def fit_tb(tmp_path: Path, model: pl.LightningModule, callbacks: list[Callback], **kw: Any) -> str:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    args: dict[str, Any] = dict(max_steps=2, max_epochs=None, logger=logger, callbacks=callbacks)
    args.update(kw)
    make_trainer(tmp_path, **args).fit(model, make_loader())
    return str(logger.log_dir)


def batch(index: int) -> Tensor:
    return next(x for i, (x, _) in enumerate(make_loader()) if i == index)


def test_deep_sigmoid_net_shows_saturated_units(tmp_path: Path) -> None:
    model = DeepSigmoid()
    acc = load_events(fit_tb(tmp_path, model, [ActivationMonitor(every_n_steps=2)]))
    # naive reference: the logging step (optimizer step 1) ran on batch 1; lr = 0 keeps the weights
    h = batch(1)
    expected: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for i, layer in enumerate(model.net):
            h = layer(h)
            if isinstance(layer, nn.Sigmoid):
                sat = ((h < 0.01) | (h > 0.99)).float().mean().item()
                expected[f"net.{i}"] = (sat, h.std(correction=0).item())
    assert len(expected) == 30
    for name, (sat, std) in expected.items():
        assert scalars(acc, f"act/saturated/{name}") == {1: pytest.approx(sat, abs=1e-6)}
        assert scalars(acc, f"act/std/{name}")[1] == pytest.approx(std, rel=1e-5)
    deep = [expected[f"net.{2 * i + 1}"][0] for i in range(10, 30)]
    assert sum(deep) / len(deep) > 0.3 and min(deep) > 0.1  # saturation is what this net shows
    assert f"act/dead/net.{1}" in acc.Tags()["scalars"]


def test_relu_with_large_negative_bias_shows_dead_units(tmp_path: Path) -> None:
    model = DeadReLU()
    acc = load_events(fit_tb(tmp_path, model, [ActivationMonitor(every_n_steps=1)]))
    assert scalars(acc, "act/dead/net.1") == {0: 1.0, 1: 1.0}
    # the second ReLU sees only the bias of net.2: a unit is dead where that bias is <= 0
    expected = (model.net[2].bias <= 0).float().mean().item()
    assert scalars(acc, "act/dead/net.3") == {0: pytest.approx(expected), 1: pytest.approx(expected)}
    assert 0.0 < expected < 1.0
    assert "act/saturated/net.1" not in acc.Tags()["scalars"]  # ReLU has no saturated range


class HookSpy(Callback):
    def __init__(self) -> None:
        self.at_start: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.at_start.append(sum(len(m._forward_hooks) for m in pl_module.modules()))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        assert all(not m._forward_hooks for m in pl_module.modules())


def test_hooks_only_on_logging_steps_and_removed_after(tmp_path: Path) -> None:
    spy = HookSpy()
    model = MLPModule()
    log_dir = fit_tb(tmp_path, model, [ActivationMonitor(every_n_steps=2), spy], max_steps=4)
    n = len(list(model.modules()))  # each module has a hook on steps 1 and 3 only: the stack of calls
    assert spy.at_start == [0, n, 0, n]
    assert sorted(scalars(load_events(log_dir), "act/std/net.1")) == [1, 3]


def test_gradient_accumulation_hooks_the_first_micro_batch_only(tmp_path: Path) -> None:
    spy, model = HookSpy(), MLPModule()
    log_dir = fit_tb(tmp_path, model, [ActivationMonitor(every_n_steps=1), spy], accumulate_grad_batches=2)
    n = len(list(model.modules()))
    assert spy.at_start == [n, 0, n, 0]
    acc = load_events(log_dir)
    assert sorted(scalars(acc, "act/std/net.3")) == [0, 1]


def test_no_host_sync_on_steps_that_do_not_log(tmp_path: Path) -> None:
    class Window(Callback):
        def __init__(self, counter: Any) -> None:
            self.counter = counter
            self.by_step: dict[int, list[str]] = {}

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            self.counter.calls = []
            self.counter.active = True

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            self.counter.active = False
            self.by_step[trainer.global_step - 1] = list(self.counter.calls)

    with count_host_syncs() as counter:
        window = Window(counter)
        fit_tb(
            tmp_path,
            MLPModule(),
            [window, ActivationMonitor(every_n_steps=2)],
            max_steps=4,
            log_every_n_steps=100,
        )
    assert window.by_step == {0: [], 1: ["tolist"], 2: [], 3: ["tolist"]}


def test_chosen_modules_only(tmp_path: Path) -> None:
    acc = load_events(fit_tb(tmp_path, MLPModule(), [ActivationMonitor(every_n_steps=1, modules=["net.3"])]))
    assert sorted(acc.Tags()["scalars"]) == ["act/dead/net.3", "act/saturated/net.3", "act/std/net.3"]


def test_unknown_module_name_raises_at_setup(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[ActivationMonitor(modules=["net.9"])])
    with pytest.raises(ValueError, match=r"net\.9"):
        trainer.fit(MLPModule(), make_loader())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"modules": []}, "modules"),
        ({"modules": [3]}, "modules"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ActivationMonitor(**kwargs)


def test_state_key_tells_instances_apart() -> None:
    assert ActivationMonitor(modules=["a"]).state_key != ActivationMonitor(modules=["b"]).state_key


# -- models people train ----------------------------------------------------------------------------


class HFGeluMLP(MLPModule):
    """Linear, transformers' NewGELUActivation (torch.tanh inside it), Linear."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)
        hf = pytest.importorskip("transformers.activations")
        self.net = nn.Sequential(nn.Linear(8, 16), hf.NewGELUActivation(), nn.Linear(16, 3))


def test_activation_modules_of_transformers_are_watched_and_their_insides_are_not(tmp_path: Path) -> None:
    model = HFGeluMLP()
    acc = load_events(fit_tb(tmp_path, model, [ActivationMonitor(every_n_steps=2)]))
    with torch.no_grad():
        y = model.net[1](model.net[0](batch(1)))  # naive reference on the logging step's batch
    assert sorted(acc.Tags()["scalars"]) == ["act/dead/net.1", "act/std/net.1"]  # no key for its tanh
    assert scalars(acc, "act/std/net.1") == {1: pytest.approx(y.std(correction=0).item(), rel=1e-5)}


class EncoderLayerModule(MLPModule):
    """nn.TransformerEncoderLayer, which calls F.relu (a function, not a module), then a head."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)
        self.layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x.view(x.shape[0], 1, 8)).view(x.shape[0], 8))


def test_functional_activations_get_the_name_of_the_module_that_calls_them(tmp_path: Path) -> None:
    model = EncoderLayerModule()
    seen: list[Tensor] = []
    handle = model.layer.linear1.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    acc = load_events(fit_tb(tmp_path, model, [ActivationMonitor(every_n_steps=2)]))
    handle.remove()
    relu = seen[1].relu()  # the second step's linear1 output, through F.relu
    assert sorted(acc.Tags()["scalars"]) == ["act/dead/layer.relu", "act/std/layer.relu"]
    assert scalars(acc, "act/std/layer.relu") == {1: pytest.approx(relu.std(correction=0).item(), rel=1e-5)}
    units = relu.reshape(relu.shape[0], -1)
    dead = (units == 0).all(dim=0).float().mean().item()
    assert scalars(acc, "act/dead/layer.relu") == {1: pytest.approx(dead)}


class LSTMModule(MLPModule):
    def __init__(self) -> None:
        super().__init__(lr=0.0)
        self.rnn = nn.LSTM(2, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.view(x.shape[0], 4, 2))
        return self.head(out[:, -1])


def test_recurrent_layers_log_their_hidden_states_and_say_once_the_gates_are_hidden(tmp_path: Path) -> None:
    model = LSTMModule()
    with pytest.warns(UserWarning, match=r"gates of the recurrent layers \['rnn'\]") as caught:
        acc = load_events(fit_tb(tmp_path, model, [ActivationMonitor(every_n_steps=1)]))
    assert len([w for w in caught if "gates" in str(w.message)]) == 1
    with torch.no_grad():
        h, _ = model.rnn(batch(1).view(16, 4, 2))
    assert {"act/std/rnn", "act/saturated/rnn", "act/dead/rnn"} <= set(acc.Tags()["scalars"])
    assert scalars(acc, "act/std/rnn")[1] == pytest.approx(h.std(correction=0).item(), rel=1e-5)
    assert scalars(acc, "act/saturated/rnn")[1] == pytest.approx((h.abs() > 0.99).float().mean().item())


class CompiledMLP(MLPModule):
    def __init__(self, backend: str | None) -> None:
        super().__init__(lr=0.0, activation=nn.ReLU)
        if backend is not None:
            self.net = torch.compile(self.net, backend=backend)  # type: ignore[assignment]


def test_under_torch_compile_the_same_keys_and_values_as_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = CompiledMLP(None)
    compiled = CompiledMLP("eager")
    compiled.net._orig_mod.load_state_dict(eager.net.state_dict())  # type: ignore[union-attr]
    a = load_events(fit_tb(tmp_path / "a", eager, [ActivationMonitor(every_n_steps=1)]))
    b = load_events(fit_tb(tmp_path / "b", compiled, [ActivationMonitor(every_n_steps=1)]))
    keys = sorted(a.Tags()["scalars"])
    assert (
        keys
        == sorted(b.Tags()["scalars"])
        == ["act/dead/net.1", "act/dead/net.3", "act/std/net.1", "act/std/net.3"]
    )
    for key in keys:
        assert scalars(b, key) == {s: pytest.approx(v, rel=1e-5) for s, v in scalars(a, key).items()}


class NoActivation(MLPModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 3))


def test_a_model_without_activations_says_so_once(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="found no activation") as caught:
        fit_tb(tmp_path, NoActivation(), [ActivationMonitor(every_n_steps=1)], max_steps=3)
    assert len([w for w in caught if "ActivationMonitor" in str(w.message)]) == 1
