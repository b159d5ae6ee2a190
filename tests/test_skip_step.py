"""Skipping an outlier step before it lands: the robust test, the exact undo, and the autopilot's skip."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLPModule, count_host_syncs, make_trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stability_callbacks import StabilityAutopilot
from stability_callbacks.skip_step import OutlierStepTest, StepUndo
from stability_callbacks.stats import total_norm
from stability_callbacks.step_flags import StepFlags, read_step_flags

BAD = 25  # the step whose batch is corrupted


class ReferenceTest:
    """The rule of :class:`OutlierStepTest` in plain Python floats: median and MAD of the logs of the
    accepted values, the lower median of an even count (as ``torch.nanmedian``)."""

    def __init__(self, window: int, threshold: float, warmup: int, min_log_scale: float) -> None:
        self.window, self.threshold, self.warmup, self.floor = window, threshold, warmup, min_log_scale
        self.logs: list[list[float]] = [[], []]
        self.in_a_row = 0

    @staticmethod
    def _median(values: list[float]) -> float:
        return sorted(values)[(len(values) - 1) // 2]

    def judge(self, loss: float, norm: float, adapt_after: int | None = None) -> bool:
        x = [loss, norm]
        nonfinite = not all(math.isfinite(v) for v in x)
        scores = []
        for k in range(2):
            hist = self.logs[k][-self.window :]
            if len(self.logs[k]) < self.warmup or not (math.isfinite(x[k]) and x[k] > 0):
                scores.append(0.0)
                continue
            med = self._median(hist)
            mad = self._median([abs(v - med) for v in hist])
            scores.append((math.log(x[k]) - med) / max(1.4826 * mad, self.floor))
        outlier = nonfinite or scores[0] > self.threshold or (scores[1] > self.threshold and scores[0] >= 0)
        accept = not outlier or (not nonfinite and adapt_after is not None and self.in_a_row >= adapt_after)
        self.in_a_row = self.in_a_row + 1 if outlier else 0
        if accept:
            for k in range(2):
                if math.isfinite(x[k]) and x[k] > 0:
                    self.logs[k].append(math.log(x[k]))
        return outlier


def test_outlier_test_matches_a_plain_python_reference() -> None:
    g = torch.Generator().manual_seed(0)
    losses = (1.0 + 0.1 * torch.rand(60, generator=g)).tolist()
    norms = (2.0 + 0.3 * torch.rand(60, generator=g)).tolist()
    losses[20], norms[33], losses[40], norms[41] = 50.0, 400.0, math.nan, math.inf
    losses[33] = 1.1  # the loss above its median: the norm's rise counts
    losses[45] = -1.0  # a non-positive loss is not judged and not added
    losses[50], norms[50] = 0.5, 400.0  # the loss falls: a norm that rises with it is no outlier
    test = OutlierStepTest(window=8, threshold=4.0, warmup=5, min_log_scale=0.05, adapt_after=None)
    ref = ReferenceTest(window=8, threshold=4.0, warmup=5, min_log_scale=0.05)
    flags = []
    for loss, norm in zip(losses, norms, strict=True):
        d = test.judge(torch.tensor(loss), torch.tensor(norm))
        assert d.skip.dtype == torch.bool and d.skip.shape == ()
        assert bool(d.skip) == ref.judge(loss, norm)
        flags.append(bool(d.skip))
    assert [i for i, f in enumerate(flags) if f] == [20, 33, 40, 41]
    assert test.count is not None and test.count.tolist() == [len(ref.logs[0]), len(ref.logs[1])]


def test_a_level_that_moved_for_good_is_accepted_again() -> None:
    test = OutlierStepTest(window=8, warmup=4, adapt_after=3)
    flags = [bool(test.judge(torch.tensor(1.0 + 0.01 * (i % 2)), torch.tensor(1.0)).skip) for i in range(8)]
    flags += [bool(test.judge(torch.tensor(100.0), torch.tensor(1.0)).skip) for _ in range(12)]
    # three outliers, then the 4th high value is accepted (still flagged); the median moves up in time
    assert flags[:8] == [False] * 8 and flags[8:12] == [True] * 4 and not any(flags[-3:])


def test_warmup_and_nonfinite() -> None:
    test = OutlierStepTest(window=8, warmup=4)
    assert not bool(test.judge(torch.tensor(1.0), torch.tensor(1.0)).skip)
    assert not bool(test.judge(torch.tensor(1e6), torch.tensor(1.0)).skip)  # warm-up: not judged
    d = test.judge(torch.tensor(1.0), torch.tensor(math.nan))
    assert bool(d.skip) and bool(d.nonfinite)  # non-finite: always
    assert test.count is not None and test.count.tolist() == [2.0, 2.0]


def test_state_round_trip() -> None:
    test = OutlierStepTest(window=6, warmup=3)
    for v in [1.0, 1.1, 0.9, 1.05]:
        test.judge(torch.tensor(v), torch.tensor(v))
    other = OutlierStepTest(window=6, warmup=3)
    other.load_state_dict(test.state_dict())
    a, b = (
        test.judge(torch.tensor(30.0), torch.tensor(1.0)),
        other.judge(torch.tensor(30.0), torch.tensor(1.0)),
    )
    assert bool(a.skip) and bool(b.skip) and a.loss_score.item() == b.loss_score.item()
    fresh = OutlierStepTest(window=6, warmup=3)
    fresh.load_state_dict({})
    assert fresh.history is None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"window": 3}, "window"),
        ({"threshold": 0.0}, "threshold"),
        ({"warmup": 100}, "warmup"),
        ({"min_log_scale": -1.0}, "min_log_scale"),
        ({"adapt_after": 0}, "adapt_after"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        OutlierStepTest(**kwargs)


def _plain_run(optimizer: str, bad: bool) -> tuple[nn.Module, torch.optim.Optimizer, list[int]]:
    """40 steps of a plain loop with the skip; ``bad``: batch ``BAD`` is corrupted (x1e3 inputs, scrambled
    targets), else it is left out of the stream."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    test, undo = OutlierStepTest(warmup=8), StepUndo()
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 3, generator=g)  # a learnable task, so a corrupted batch stands out
    skipped = []
    for t in range(40):
        x = torch.randn(16, 8, generator=g)
        y = (x @ teacher).argmax(1)
        if t == BAD:
            if not bad:
                continue
            x, y = x * 1e3, y.roll(1)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        decision = test.judge(loss, total_norm([p.grad for p in model.parameters()]))
        undo.before_step(opt, decision.skip)
        opt.step()
        undo.after_step()
        opt.zero_grad()
        if decision.skip:
            skipped.append(t)
    return model, opt, skipped


def _assert_same_training_state(
    a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]
) -> None:
    for p, q in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = a[1].state_dict()["state"], b[1].state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            assert torch.equal(sa[k][key], sb[k][key]), (k, key)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_skipped_step_is_bit_identical_to_never_seeing_the_batch(optimizer: str) -> None:
    model, opt, skipped = _plain_run(optimizer, bad=True)
    clean_model, clean_opt, clean_skipped = _plain_run(optimizer, bad=False)
    assert skipped == [BAD] and clean_skipped == []
    _assert_same_training_state((model, opt), (clean_model, clean_opt))
    if optimizer == "adamw":  # Adam's step count did not advance on the skipped step
        assert all(s["step"].item() == 39 for s in opt.state.values())


def test_undo_on_an_accepted_step_changes_nothing() -> None:
    def run(with_undo: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Linear(5, 2)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        undo = StepUndo()
        for i in range(6):
            model(torch.full((3, 5), float(i))).square().mean().backward()
            if with_undo:
                undo.before_step(opt, torch.tensor(False))
            opt.step()
            undo.after_step()
            opt.zero_grad()
        return model, opt

    _assert_same_training_state(run(True), run(False))


# -- the autopilot ----------------------------------------------------------------------------------


class CorruptBatch(Callback):
    """At optimizer step ``step``, the batch's inputs x1e3 and its targets rolled by one, in place."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            x, y = batch
            x.mul_(1e3)
            y.copy_(y.roll(1))


class AdamMLP(MLPModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)


def _data(skip_batch: int | None) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16 * 41, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)  # a learnable task
    if skip_batch is not None:
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[16 * skip_batch : 16 * (skip_batch + 1)] = False
        x, y = x[keep], y[keep]
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _autopilot(**kwargs: Any) -> StabilityAutopilot:
    defaults: dict[str, Any] = dict(clipper=None, reinit=False, guard=False, skip_warmup=8, verbose=False)
    return StabilityAutopilot(**{**defaults, **kwargs})


@pytest.mark.parametrize("rollback", [False, True])
def test_autopilot_skips_a_bad_batch_exactly_as_if_it_never_came(tmp_path: Path, rollback: bool) -> None:
    torch.manual_seed(0)
    model, ap = AdamMLP(), _autopilot(rollback=rollback)
    make_trainer(tmp_path, callbacks=[CorruptBatch(BAD), ap]).fit(model, _data(None))
    torch.manual_seed(0)
    clean, clean_ap = AdamMLP(), _autopilot(rollback=rollback)
    make_trainer(tmp_path, callbacks=[clean_ap]).fit(clean, _data(BAD))
    assert ap.outlier_skips == 1 and clean_ap.outlier_skips == 0 and ap.rollbacks == 0
    opt, clean_opt = model.trainer.optimizers[0], clean.trainer.optimizers[0]
    _assert_same_training_state((model, opt), (clean, clean_opt))
    assert all(s["step"].item() == 40 for s in opt.state.values())
    if rollback:  # the step's one host read explains it, at that exact step
        assert len(ap.events) == 1 and ap.events[0].startswith(
            f"step {BAD + 1}: [skip] step {BAD} was an outlier"
        )


def test_no_host_read_while_skipping_without_rollback(tmp_path: Path) -> None:
    ap = _autopilot(rollback=False, clipper="zclip")
    hooks = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")
    calls: list[list[str]] = []
    with count_host_syncs() as counter:
        for hook in hooks:
            original = getattr(ap, hook)

            def counted(*args: Any, _original: Any = original) -> None:
                counter.calls, counter.active = [], True
                try:
                    _original(*args)
                finally:
                    counter.active = False
                    calls.append(list(counter.calls))

            setattr(ap, hook, counted)
        original_after = ap.undo.after_step

        def after() -> None:
            counter.active = True
            try:
                original_after()
            finally:
                counter.active = False

        ap.undo.after_step = after  # type: ignore[method-assign]
        torch.manual_seed(0)
        make_trainer(tmp_path, callbacks=[CorruptBatch(BAD), ap]).fit(AdamMLP(), _data(None))
    assert len(calls) == 4 * 41 and all(c == [] for c in calls)
    assert counter.calls == []
    assert ap.outlier_skips == 1


class RankSpike(AdamMLP):
    """The loss is x1e3 on global rank 1 alone at step ``BAD``."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e3 if self.global_step == BAD and self.global_rank == 1 else loss


class SaveWeights(Callback):
    """Records the steps each rank skipped; at the end, every rank's weights and skipped steps."""

    def __init__(self) -> None:
        self.skipped: list[int] = []
        self._seen = 0.0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        ap = next(cb for cb in trainer.callbacks if isinstance(cb, StabilityAutopilot))
        if ap.outlier_count.item() > self._seen:
            self._seen = ap.outlier_count.item()
            self.skipped.append(trainer.global_step - 1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        steps = torch.tensor(self.skipped + [-1] * (8 - len(self.skipped)), dtype=torch.float32)
        out = {"w": trainer.strategy.all_gather(flat), "skipped": trainer.strategy.all_gather(steps)}
        if trainer.is_global_zero:
            torch.save(out, Path(trainer.default_root_dir) / "w.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_a_spike_on_one_rank_is_skipped_on_every_rank(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer = make_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_steps=BAD + 3,
        max_epochs=None,
        callbacks=[_autopilot(rollback=False, skip_warmup=16), SaveWeights()],
    )
    trainer.fit(RankSpike(), _data(None))
    out = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(out["skipped"][0], out["skipped"][1])  # the same steps on both ranks
    assert BAD in out["skipped"][0].tolist()
    assert torch.equal(out["w"][0], out["w"][1])


def test_median_helper_matches_statistics() -> None:
    assert ReferenceTest._median([3.0, 1.0, 2.0]) == statistics.median([3.0, 1.0, 2.0])
    assert ReferenceTest._median([4.0, 1.0, 2.0, 3.0]) == statistics.median_low([4.0, 1.0, 2.0, 3.0])


class _TwoRanks:
    """A strategy whose ``reduce`` averages this rank's tensor with another rank's."""

    def __init__(self, other: Tensor) -> None:
        self.other = other
        self.calls = 0

    def reduce(self, tensor: Tensor, reduce_op: str = "mean") -> Tensor:
        assert reduce_op == "mean"
        self.calls += 1
        return (tensor + self.other) / 2


def test_step_flags_are_read_once_and_set_when_any_rank_sets_them() -> None:
    # the other rank saw a non-finite gradient and a spike; this one an outlier, scores 6 and 8
    other = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 6.0, 8.0])
    strategy = _TwoRanks(other)
    with count_host_syncs() as counter:
        counter.calls, counter.active = [], True
        flags = read_step_flags(
            strategy,  # type: ignore[arg-type]
            torch.device("cpu"),
            nonfinite=torch.tensor(False),
            outlier=torch.tensor(True),
            spiked=None,
            loss_score=torch.tensor(6.0),
            norm_score=torch.tensor(8.0),
        )
        counter.active = False
    assert counter.calls == ["tolist"] and strategy.calls == 1
    assert flags == StepFlags(nonfinite=True, outlier=True, spiked=True, loss_score=6.0, norm_score=8.0)
    with pytest.raises(TypeError, match="unknown flags"):
        read_step_flags(strategy, torch.device("cpu"), skipped=torch.tensor(True))  # type: ignore[arg-type]
