"""The InitSwap callback: fit start, resume, vanishing-triggered re-initialisation, DDP, logging."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, count_host_syncs, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from stability_callbacks._trainer import UnsupportedStrategyError
from stability_callbacks.init import InitSwap
from stability_callbacks.monitor import GradientMonitor


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


class Snapshot(Callback):
    """Records the weights and the optimizer's parameters at train start, after the callbacks before it."""

    def __init__(self) -> None:
        self.weights: Tensor | None = None
        self.same_objects = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = flat(pl_module).clone()
        in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.same_objects = in_optimizer == {id(p) for p in pl_module.parameters()}


# -- fit start --------------------------------------------------------------------------------------


def test_fit_start_reinitialises_in_place_before_the_first_step_and_reports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLPModule(depth=4, width=64, activation=nn.ReLU)
    before = flat(model).clone()
    swap, snap = InitSwap(), Snapshot()
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[swap, snap], logger=logger)
    trainer.fit(model, make_loader())
    assert snap.weights is not None and not torch.equal(snap.weights, before)
    assert snap.same_objects  # the optimizer still holds the model's parameters
    report = swap.last_report
    assert report is not None and swap.applied and swap.reinit_step == 0
    assert report["net.0.weight"].scheme == "he_normal"
    assert report["net.0.bias"].scheme == "zeros"
    first = slice(0, 64 * 8)  # net.0.weight in the flattened parameters
    assert report["net.0.weight"].old_std == pytest.approx(before[first].std(correction=0).item(), rel=1e-5)
    assert report["net.0.weight"].new_std == pytest.approx(
        snap.weights[first].std(correction=0).item(), rel=1e-5
    )
    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert "init/report/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("init/report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "net.0.weight" in text and "he_normal" in text
    assert [(e.step, e.value) for e in events.Scalars("init/reinit")] == [(0, 1.0)]


def test_fit_start_applies_once_per_callback(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLPModule()
    swap, snap = InitSwap(), Snapshot()
    make_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[swap]).fit(model, make_loader())
    after_first = flat(model).clone()
    make_trainer(tmp_path, max_steps=4, max_epochs=None, callbacks=[swap, snap]).fit(model, make_loader())
    assert snap.weights is not None and torch.equal(snap.weights, after_first)


@pytest.mark.parametrize("with_state", [True, False])
def test_resume_from_checkpoint_leaves_weights_bit_identical(tmp_path: Path, with_state: bool) -> None:
    torch.manual_seed(0)
    callbacks: list[Callback] = [InitSwap()] if with_state else []
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=callbacks)
    model = MLPModule(activation=nn.ReLU)
    trainer.fit(model, make_loader())
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    saved = torch.cat([v.flatten() for v in checkpoint["state_dict"].values()])
    if with_state:
        assert checkpoint["callbacks"][InitSwap().state_key]["applied"] is True

    swap, snap = InitSwap(), Snapshot()
    resumed = make_trainer(tmp_path, max_epochs=2, callbacks=[swap, snap])
    resumed.fit(MLPModule(activation=nn.ReLU), make_loader(), ckpt_path=path)
    assert snap.weights is not None and torch.equal(snap.weights, saved)
    assert swap.last_report is None and swap.applied  # remembered for the next checkpoint


def test_lsuv_takes_its_batch_from_the_train_dataloader(tmp_path: Path) -> None:
    seen: list[Tensor] = []

    def get_input(batch: Any) -> Tensor:
        seen.append(batch[0])
        return batch[0]

    class LinearOutputStds(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            h, self.stds = torch.cat(seen), []
            with torch.no_grad():
                for m in pl_module.net:
                    h = m(h)
                    if isinstance(m, nn.Linear):
                        self.stds.append(h.std().item())

    torch.manual_seed(0)
    model = MLPModule(depth=12, width=32, activation=nn.Tanh)
    swap, probe = InitSwap(scheme="lsuv", lsuv_batches=2, get_input=get_input), LinearOutputStds()
    make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[swap, probe]).fit(model, make_loader())
    assert [x.shape[0] for x in seen] == [16, 16]
    assert len(probe.stds) == 12 and max(abs(s - 1.0) for s in probe.stds) <= 0.1
    assert swap.last_report is not None and len(swap.last_report.lsuv) == 12


class DictModule(MLPModule):
    """Batches are dicts, and ``forward`` is never called with a batch: nothing to guess the input from."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])


class StepOutputStds(Callback):
    """Output std of every Linear layer in the first training step, on that step's batch, and the loss
    and gradients of that step (for an independent forward and backward on the final weights)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.stds: list[float] = []
        self.batch: Any = None
        self.grads: list[Tensor] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        if trainer.global_step == 0:
            self.batch = batch
            for m in pl_module.net:
                if isinstance(m, nn.Linear):
                    hook = lambda mod, args, out: self.stds.append(out.detach().std().item())  # noqa: E731
                    self.handles.append(m.register_forward_hook(hook))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if trainer.global_step == 0:
            self.grads = [p.grad.clone() for p in pl_module.parameters()]
            self.weights = [p.detach().clone() for p in pl_module.parameters()]


def test_lsuv_without_get_input_measures_inside_the_first_training_step(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(
        [{"x": torch.randn(8), "y": torch.tensor(i % 3)} for i in range(64)], batch_size=16
    )
    torch.manual_seed(0)
    model = DictModule(depth=12, width=32, activation=nn.Tanh)
    swap, probe = InitSwap(scheme="lsuv"), StepOutputStds()
    make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[swap, probe]).fit(model, loader)
    report = swap.last_report
    assert report is not None and report.traced_by == "fx" and len(report.lsuv) == 12
    assert all(r.converged for r in report.lsuv.values())
    assert swap.reinit_step == 0 and "in 1 tries" in report["net.0.weight"].reason
    # the probe hooks run after LSUV's: each layer's output on the step's own batch has unit std
    assert len(probe.stds) == 12 and max(abs(s - 1.0) for s in probe.stds) <= 0.1
    # the step's gradients are those of the re-initialised model on that batch
    check = DictModule(depth=12, width=32, activation=nn.Tanh)
    with torch.no_grad():
        for p, w in zip(check.parameters(), probe.weights, strict=True):
            p.copy_(w)
    check.training_step(probe.batch, 0).backward()
    for p, g in zip(check.parameters(), probe.grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


# -- vanishing gradients -----------------------------------------------------------------------------


def sigmoid_run(tmp_path: Path, callbacks: list[Callback], steps: int = 60) -> tuple[MLPModule, float]:
    """A 30-layer sigmoid MLP under PyTorch's default initialisation, trained with plain SGD."""
    torch.manual_seed(0)
    model = MLPModule(depth=30, width=32, activation=nn.Sigmoid, lr=0.1)
    loader = make_loader(n=64, batch_size=16)
    trainer = make_trainer(tmp_path, max_steps=steps, max_epochs=None, callbacks=callbacks)
    trainer.fit(model, loader)
    x, y = loader.dataset.tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(x), y).item()
    return model, loss


def test_on_vanishing_reinitialises_a_deep_sigmoid_mlp_that_then_trains(tmp_path: Path) -> None:
    untreated_monitor = GradientMonitor(log_every_n_steps=1, warn=False)
    _, untreated_loss = sigmoid_run(tmp_path / "a", [untreated_monitor])
    d = untreated_monitor.last_diagnosis
    assert d is not None and d.vanishing  # the monitor flags it, to the end

    first_batch = lambda batch: batch[0]  # noqa: E731  LSUV measures the first train batch
    swap = InitSwap(scheme="lsuv", when="on_vanishing", patience=3, watch_steps=10, get_input=first_batch)
    monitor = GradientMonitor(log_every_n_steps=1, warn=False)
    with pytest.warns(UserWarning, match="InitSwap: gradients vanished for 3 consecutive steps"):
        _, treated_loss = sigmoid_run(tmp_path / "b", [swap, monitor])
    assert swap.reinit_step == 2  # three vanishing steps: 0, 1, 2
    d = monitor.last_diagnosis
    assert d is not None and not d.vanishing and d.depth_ratio is not None and d.depth_ratio > 1e-3
    assert treated_loss < untreated_loss  # measured 0.77 vs 1.08


def test_on_vanishing_without_verbose_acts_silently(tmp_path: Path) -> None:
    swap = InitSwap(scheme="lsuv", when="on_vanishing", patience=3, watch_steps=10, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigmoid_run(tmp_path, [swap])
    assert swap.reinit_step == 2
    assert not [w for w in caught if "InitSwap" in str(w.message)]


def test_on_vanishing_resets_optimizer_state_and_drops_that_steps_gradients(tmp_path: Path) -> None:
    class AdamSigmoid(MLPModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    model = AdamSigmoid(depth=30, width=32, activation=nn.Sigmoid)
    swap = InitSwap(scheme="lsuv", when="on_vanishing", patience=2, watch_steps=10)
    trainer = make_trainer(tmp_path, max_steps=7, max_epochs=None, callbacks=[swap])
    trainer.fit(model, make_loader())
    assert swap.reinit_step == 1
    optimizer = trainer.optimizers[0]
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert steps == {7 - swap.reinit_step - 1}  # fresh moments from the step after the re-initialisation
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_on_vanishing_leaves_a_healthy_model_alone(tmp_path: Path) -> None:
    def run(callbacks: list[Callback]) -> Tensor:
        torch.manual_seed(0)
        model = MLPModule()
        make_trainer(tmp_path, max_steps=6, max_epochs=None, callbacks=callbacks).fit(model, make_loader())
        return flat(model)

    swap = InitSwap(when="on_vanishing", watch_steps=4)
    assert torch.equal(run([swap]), run([]))
    assert not swap.applied and swap.reinit_step == -1


class CountingSwap(InitSwap):
    """Counts host syncs in the callback's hooks outside the watch window."""

    def __init__(self, counter: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.counter = counter
        self.quiet_steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.counter.active = not self._watching(trainer)
        super().on_train_batch_start(trainer, *args)
        self.counter.active = False

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        quiet = not self._watching(trainer)
        self.quiet_steps += quiet
        self.counter.active = quiet
        super().on_before_optimizer_step(trainer, *args)
        self.counter.active = False


@pytest.mark.parametrize("when", ["fit_start", "on_vanishing"])
def test_no_host_sync_outside_the_watch_window(tmp_path: Path, when: str) -> None:
    with count_host_syncs() as counter:
        swap = CountingSwap(counter, when=when, watch_steps=3)
        make_trainer(tmp_path, max_steps=8, max_epochs=None, callbacks=[swap]).fit(MLPModule(), make_loader())
    assert swap.quiet_steps == (8 if when == "fit_start" else 5)
    assert counter.calls == []


def test_reinit_is_logged_once(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    swap = InitSwap(scheme="lsuv", when="on_vanishing", patience=2, watch_steps=10)
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_steps=5, max_epochs=None, callbacks=[swap], logger=logger)
    trainer.fit(MLPModule(depth=30, width=32, activation=nn.Sigmoid), make_loader())
    rows = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("init/reinit")
    logged = [(r.split(",")[rows[0].split(",").index("step")], r.split(",")[column]) for r in rows[1:]]
    assert [(s, v) for s, v in logged if v] == [("1", "1.0")]


# -- state, arguments ----------------------------------------------------------------------------------


def test_state_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    swap = InitSwap(scheme="lsuv", when="on_vanishing", patience=2, watch_steps=10)
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_steps=3, max_epochs=None, callbacks=[swap])
    trainer.fit(MLPModule(depth=30, width=32, activation=nn.Sigmoid), make_loader())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"][swap.state_key]
    restored = InitSwap(scheme="lsuv", when="on_vanishing")
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.applied and restored.reinit_step == 1
    mine, theirs = restored.state_dict(), swap.state_dict()
    assert mine.keys() == theirs.keys() and mine["diagnostician"].keys() == theirs["diagnostician"].keys()
    for key, value in theirs["diagnostician"].items():
        other = mine["diagnostician"][key]
        if isinstance(value, Tensor):  # NaN marks an empty slot
            torch.testing.assert_close(other, value, rtol=0, atol=0, equal_nan=True)
        else:
            assert other == value, key
    fresh = InitSwap()
    fresh.load_state_dict({})
    assert not fresh.applied and fresh.reinit_step == -1
    assert InitSwap(when="fit_start").state_key != InitSwap(when="on_vanishing").state_key


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"scheme": "kaiming"}, "scheme"),
        ({"when": "later"}, "when"),
        ({"patience": 0}, "patience"),
        ({"watch_steps": -1}, "watch_steps"),
        ({"lsuv_batches": 1.5}, "lsuv_batches"),
        ({"overrides": {"net.*": "nope"}}, "overrides"),
        ({"lsuv_tol": 0}, "lsuv_tol"),
        ({"get_input": 3}, "get_input"),
        ({"vanishing_ratio": -1.0}, "vanishing_ratio"),
        ({"patience": True}, "patience"),
        ({"lsuv_max_iters": 2.0}, "lsuv_max_iters"),
        ({"lsuv_tol": True}, "lsuv_tol"),
        ({"lsuv_center": 1}, "lsuv_center"),
        ({"verbose": "yes"}, "verbose"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        InitSwap(**kwargs)


def test_override_matching_nothing_fails_at_setup(tmp_path: Path) -> None:
    swap = InitSwap(overrides={"enc*": "keep"})
    trainer = make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[swap])
    with pytest.raises(ValueError, match="enc"):
        trainer.fit(MLPModule(), make_loader())


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])  # FSDP2 and TP: test_sharded.py
def test_sharded_strategies_are_refused_at_setup(strategy: type) -> None:
    trainer: Any = SimpleNamespace(strategy=object.__new__(strategy))
    with pytest.raises(
        UnsupportedStrategyError, match=rf"InitSwap .*{strategy.__name__}.*init_swap\(model\)"
    ):
        InitSwap().setup(trainer, MLPModule(), "fit")
    assert issubclass(UnsupportedStrategyError, ValueError)
    InitSwap().setup(trainer, MLPModule(), "validate")  # only a fit re-initialises


def test_the_watch_measures_what_the_monitor_measures(tmp_path: Path) -> None:
    """The watch window and GradientMonitor share one measurement: the same totals, step by step."""
    swap = InitSwap(when="on_vanishing", watch_steps=4)
    monitor = GradientMonitor(log_every_n_steps=1, warn=False)
    torch.manual_seed(0)
    make_trainer(tmp_path, max_steps=4, max_epochs=None, callbacks=[swap, monitor]).fit(
        MLPModule(), make_loader()
    )
    watched = swap.diagnostician.state_dict()["history"]
    assert len(watched) == 4 and all(v > 0 for v in watched)
    assert watched == monitor.diagnostician.state_dict()["history"]


# -- DDP -----------------------------------------------------------------------------------------------


class RankWeights(Callback):
    """Each rank saves the first input batch it trained on and its weights after the fit (one step: LSUV
    measured on that batch, then the optimizer step)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.first: Tensor | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        if self.first is None:
            self.first = batch[0]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = {"weights": flat(pl_module), "batch": self.first}
        torch.save(data, self.path / f"rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        max_steps=1,
        max_epochs=None,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[InitSwap(scheme="lsuv", verbose=False), RankWeights(tmp_path)],
    )
    trainer.fit(MLPModule(depth=6, width=32), make_loader())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["batch"], r1["batch"])  # each rank measured LSUV on its own data ...
    assert torch.equal(r0["weights"], r1["weights"])  # ... and rank zero's weights won everywhere


# -- models whose forward cannot be guessed ---------------------------------------------------------------


class SigmoidNoForward(pl.LightningModule):
    """A 30-layer sigmoid MLP run by training_step itself: no forward to call, nothing for fx to trace."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(30):
            layers += [nn.Linear(8 if i == 0 else 32, 32), nn.Sigmoid()]
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(32, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.layers(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_demo_lstm_without_forward_is_reinitialised_from_its_first_step(tmp_path: Path) -> None:
    from lightning.pytorch.demos import LightningLSTM, SimpleLSTM

    class DemoLSTM(LightningLSTM):
        def prepare_data(self) -> None:  # no download: random tokens below
            pass

    def model_and_data() -> tuple[DemoLSTM, Any]:
        torch.manual_seed(0)
        model = DemoLSTM(vocab_size=32)
        model.model = SimpleLSTM(vocab_size=32, ninp=16, nhid=16, nlayers=2)
        tokens = torch.randint(0, 32, (8, 9))
        data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
        return model, torch.utils.data.DataLoader(data, batch_size=2)

    # SimpleLSTM initialises itself (init_weights): 'auto' keeps all of it, and no step is dropped
    model, loader = model_and_data()
    before = flat(model).clone()
    swap = InitSwap(verbose=False)
    make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[swap]).fit(model, loader)
    report = swap.last_report
    assert report is not None and report.traced_by == "training step" and not report.modified
    assert "SimpleLSTM (model) initialises itself (init_weights)" in report["model.rnn.weight_hh_l0"].reason
    assert not torch.equal(flat(model), before)  # the step trained as usual

    # asked to re-initialise every layer: learnt from the first step, whose gradients are dropped
    model, loader = model_and_data()
    swap = InitSwap(keep_custom=False, verbose=False)
    make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[swap]).fit(model, loader)
    report = swap.last_report
    assert report is not None and report.traced_by == "training step" and swap.reinit_step == 0
    rnn = model.model.rnn
    assert torch.equal(rnn.bias_ih_l0[16:32], torch.ones(16))  # forget gate 1
    assert report["model.rnn.weight_hh_l0"].scheme == "orthogonal"
    assert report["model.decoder.weight"].scheme == "xavier_uniform"  # log_softmax follows: no gain
    now = rnn.weight_hh_l0.std(correction=0).item()  # SGD at lr 20 would have moved it
    assert report["model.rnn.weight_hh_l0"].new_std == pytest.approx(now, rel=1e-6)


def test_demo_transformer_with_two_forward_arguments_is_reinitialised(tmp_path: Path) -> None:
    from lightning.pytorch.demos import LightningTransformer, Transformer

    class Demo(LightningTransformer):
        def prepare_data(self) -> None:
            pass

    torch.manual_seed(0)
    model = Demo(vocab_size=32)
    model.model = Transformer(vocab_size=32, ninp=16, nhead=2, nhid=16, nlayers=1)
    tokens = torch.randint(0, 32, (8, 9))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2
    )
    swap = InitSwap(verbose=False)
    make_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[swap]).fit(model, loader)
    report = swap.last_report
    assert report is not None and report.traced_by == "training step"
    linear1 = "model.transformer.encoder.layers.0.linear1.weight"
    assert report[linear1].scheme == "kept"  # nn.Transformer's own Xavier
    assert report["model.decoder.weight"].scheme == "xavier_uniform"  # it was at PyTorch's default
    assert all(torch.isfinite(p).all() for p in model.parameters())
    every = InitSwap(keep_custom=False, verbose=False)
    make_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[every]).fit(model, loader)
    assert every.last_report is not None
    record = every.last_report[linear1]  # the encoder layer's F.relu follows linear1: He
    assert record.scheme == "he_normal" and "torch.nn.functional.relu" in record.reason


def test_on_vanishing_reinitialises_a_model_without_forward_mid_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SigmoidNoForward()
    swap = InitSwap(when="on_vanishing", patience=3, watch_steps=10, verbose=False)
    make_trainer(tmp_path, max_steps=6, max_epochs=None, callbacks=[swap]).fit(model, make_loader())
    report = swap.last_report
    assert swap.reinit_step == 2 and report is not None and report.traced_by == "training step"
    # every layer is followed by a sigmoid: Xavier with gain 1, including those the model initialised
    assert (
        report["layers.0.weight"].scheme == "xavier_uniform" and "sigmoid" in report["layers.0.weight"].reason
    )
    assert (
        report["head.weight"].scheme == "xavier_uniform" and "no activation" in report["head.weight"].reason
    )


def test_the_autopilot_reinitialises_a_model_without_forward_mid_fit(tmp_path: Path) -> None:
    from stability_callbacks import StabilityAutopilot

    torch.manual_seed(0)
    model = SigmoidNoForward()
    pilot = StabilityAutopilot(reinit_watch_steps=10, rollback=False, verbose=False)
    make_trainer(tmp_path, max_steps=6, max_epochs=None, callbacks=[pilot]).fit(model, make_loader())
    reinit = pilot.children["reinit"]
    assert isinstance(reinit, InitSwap) and reinit.applied and pilot.reinit_done
    assert reinit.last_report is not None and reinit.last_report.traced_by == "training step"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lsuv_on_a_model_without_forward_measures_in_the_step_after_the_one_it_learnt_from(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = SigmoidNoForward()
    swap = InitSwap(scheme="lsuv", verbose=False)
    make_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[swap]).fit(model, make_loader())
    report = swap.last_report
    assert swap.reinit_step == 0 and report is not None and report.traced_by == "training step"
    assert len(report.lsuv) == 31 and all(r.called and r.converged for r in report.lsuv.values())
    assert not report.lsuv_pending and "unit output std" in report["layers.0.weight"].reason


def test_gpt2_under_initswap_auto_trains_bit_for_bit_as_without_it(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()

    class GPT2(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = transformers.GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
            )
            self.model = transformers.GPT2LMHeadModel(config)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens), batch_size=2)

    def run(callbacks: list[Callback]) -> Tensor:
        pl.seed_everything(0, verbose=False)
        model = GPT2()
        make_trainer(tmp_path, max_steps=3, max_epochs=None, callbacks=callbacks).fit(model, loader)
        return flat(model)

    swap = InitSwap(verbose=False)
    assert torch.equal(run([swap]), run([]))  # its own scheme is kept and no step is dropped
    assert swap.last_report is not None and not swap.last_report.modified
