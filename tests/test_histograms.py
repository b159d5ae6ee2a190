"""Device-side histograms (layer 1) and HistogramLogger (events read back with EventAccumulator)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import MLPModule, count_host_syncs, make_loader, make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tb_events import histograms, load_events, scalars
from tensorboard import data_compat
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary
from tensorboard.util import tensor_util
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from stability_callbacks._trainer import StabilityCallback
from stability_callbacks.histogram_math import _CHUNK_CPU, _bucket_counts
from stability_callbacks.histograms import (
    Histogram,
    HistogramLogger,
    grad_flow_image,
    grad_flow_stats,
    histogram_stats,
    tensor_histograms,
    to_histograms,
    write_histograms,
)
from stability_callbacks.stats import LayerIndex

# -- layer 1: known answers --------------------------------------------------------------------------


def one(t: Tensor, bins: int = 64) -> Histogram:
    h = tensor_histograms([t], bins)[0]
    assert h is not None
    return h


def test_arange_has_the_expected_buckets() -> None:
    h = one(torch.arange(10.0), bins=5)
    # edges 0, 1.8, 3.6, 5.4, 7.2, 9: two integers in each bucket
    assert h.bucket_counts == [2.0] * 5
    assert h.bucket_limits == pytest.approx([1.8, 3.6, 5.4, 7.2, 9.0], abs=1e-12)
    assert h.bucket_limits[-1] == 9.0
    assert (h.min, h.max, h.num, h.nonfinite, h.lower_edge) == (0.0, 9.0, 10, 0, 0.0)
    assert h.sum == 45.0
    assert h.sum_squares == 285.0

    h64 = one(torch.arange(64.0), bins=64)
    assert h64.bucket_counts == [1.0] * 64


def test_narrow_range_far_from_zero_keeps_its_resolution() -> None:
    x = 2.0**20 + torch.arange(16.0) / 4  # float32 spacing at 2**20 is 1/8; x * bins / width would round
    h = one(x, bins=16)
    assert h.bucket_counts == [1.0] * 16
    assert (h.min, h.max) == (2.0**20, 2.0**20 + 3.75)


def test_non_finite_values_are_counted_apart() -> None:
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 3.0, 2.0])
    h = one(x, bins=4)
    assert (h.min, h.max, h.num, h.nonfinite) == (1.0, 3.0, 3, 3)
    assert h.bucket_counts == [1.0, 0.0, 1.0, 1.0]  # 1 | (1.5, 2] holds 2 | 3
    assert (h.sum, h.sum_squares) == (6.0, 14.0)


def test_all_nan_empty_and_none() -> None:
    out = tensor_histograms([torch.full((5,), float("nan")), torch.empty(0), None, torch.ones(2)], bins=8)
    all_nan, empty, none, ones = out
    assert all_nan is not None and (all_nan.num, all_nan.nonfinite) == (0, 5)
    assert sum(all_nan.bucket_counts) == 0
    assert empty is None and none is None
    assert ones is not None and ones.num == 2


def test_constant_tensor_goes_to_the_middle_bucket() -> None:
    for value in (7.0, -1e10, 0.0):
        h = one(torch.full((3,), value), bins=4)
        assert h.bucket_counts == [0.0, 0.0, 3.0, 0.0]
        assert (h.min, h.max) == (value, value)
        assert h.lower_edge == value - 0.5
        assert h.bucket_limits == pytest.approx([value - 0.25, value, value + 0.25, value + 0.5])


def test_extreme_values_do_not_overflow() -> None:
    x = torch.tensor([3e38, -3e38, 1.0])
    h = one(x, bins=4)
    assert h.num == 3 and h.nonfinite == 0
    assert h.bucket_counts == [1.0, 1.0, 0.0, 1.0]
    assert h.min == float(torch.tensor(-3e38)) and h.max == float(torch.tensor(3e38))
    assert np.isfinite(h.sum_squares)
    assert h.sum_squares == pytest.approx(2 * float(torch.tensor(3e38)) ** 2 + 1, rel=1e-6)


def near_edge(x: np.ndarray, lo: float, hi: float, bins: int) -> int:
    """How many values lie within 1e-4 of a bucket boundary, where float32 rounding may move them."""
    pos = (x.astype(np.float64) - lo) / (hi - lo) * bins
    return int((np.abs(pos - np.round(pos)) < 1e-4).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(1000,), (7, 13, 11), (3, 257)])
def test_matches_numpy_histogram(seed: int, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g) * 10**seed, torch.rand(shape, generator=g) + 5]
    for t, h in zip(tensors, tensor_histograms(tensors, bins=64), strict=True):
        assert h is not None
        x = t.numpy().ravel().astype(np.float64)
        counts, edges = np.histogram(x, bins=64)
        assert (h.min, h.max) == (float(x.min()), float(x.max()))  # exact
        assert h.num == x.size == sum(h.bucket_counts)
        assert np.abs(np.array(h.bucket_counts) - counts).sum() <= 2 * near_edge(x, x.min(), x.max(), 64)
        np.testing.assert_allclose(h.bucket_limits, edges[1:], rtol=1e-12)
        assert h.sum == pytest.approx(float(x.sum()), rel=1e-5, abs=1e-3)
        assert h.sum_squares == pytest.approx(float((x**2).sum()), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64])
def test_other_dtypes_are_binned_in_float32(dtype: torch.dtype) -> None:
    t = (torch.randn(500, generator=torch.Generator().manual_seed(0)) * 20).to(dtype)
    got, ref = tensor_histograms([t, t.float()], bins=32)
    assert got == ref


def test_sparse_tensors_use_their_values() -> None:
    # uncoalesced: index 1 appears twice (1 + 2 = 3 after coalescing)
    coo = torch.sparse_coo_tensor(torch.tensor([[1, 1, 4]]), torch.tensor([1.0, 2.0, -5.0]), (10,))
    h = one(coo, bins=4)
    assert (h.num, h.min, h.max) == (2, -5.0, 3.0)
    assert h.bucket_counts == [1.0, 0.0, 0.0, 1.0]
    csr = torch.tensor([[0.0, 2.0], [4.0, 0.0]]).to_sparse_csr()
    assert one(csr, bins=2).bucket_counts == [1.0, 1.0]


def test_many_tensors_keep_their_order_and_match_single_calls() -> None:
    g = torch.Generator().manual_seed(3)
    tensors: list[Tensor | None] = [
        torch.randn(30, generator=g),
        None,
        torch.randn(4, 5, generator=g).bfloat16(),
        torch.empty(0),
        torch.randn(100, generator=g) * 1e-3,
    ]
    together = tensor_histograms(tensors, bins=16)
    alone = [None if t is None or t.numel() == 0 else one(t, 16) for t in tensors]
    assert together == alone


def test_histc_path_counts_like_bincount() -> None:
    """Accelerators count with ``histc`` (``bincount`` would sync there); both give the same buckets."""
    bins = 8
    y = torch.tensor([0.0, 0.0, 0.5, 1.0, 3.999, 7.9, 8.0, 8.0, 9.0, 9.0, 9.0, 2.5])
    ints = torch.empty(y.numel(), dtype=torch.int32)
    by_bincount = _bucket_counts(y.clone(), bins, ints)
    by_histc = _bucket_counts(y.clone(), bins, None)
    expected = torch.tensor([3, 1, 1, 1, 0, 0, 0, 1, 2, 3])  # bucket 8: x == max, bucket 9: non-finite
    assert torch.equal(by_bincount.long(), expected)
    assert torch.equal(by_histc.long(), expected)


def naive_histogram(t: Tensor, bins: int) -> tuple[float, float, int, float, float, int, np.ndarray]:
    """Min, max, count, sum, sum of squares, non-finite count and bucket counts by obvious NumPy code:
    the values rounded to float32 (as they are binned), sums in float64, ``np.histogram`` buckets."""
    x = t.detach().reshape(-1).float().numpy().astype(np.float64)
    finite = x[np.isfinite(x)]
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
        counts = np.zeros(bins)
        counts[bins // 2] = finite.size
    else:
        counts = np.histogram(finite, bins=bins, range=(lo, hi))[0].astype(np.float64)
    total, squares = float(finite.sum()), float(np.square(finite).sum())
    return lo, hi, finite.size, total, squares, x.size - finite.size, counts


def test_hard_cases_match_a_naive_reference() -> None:
    """The one binning path (the same tensor code on every device) on the cases that need care."""
    torch.manual_seed(0)
    tensors = [
        torch.randn(_CHUNK_CPU + 37_856),  # two chunks
        torch.randn(40, 50).to(torch.bfloat16),
        torch.randn(1000).half(),
        torch.randn(1000, dtype=torch.float64) * 1e5,
        torch.randint(-5, 6, (777,)),
        1e6 + torch.rand(5000),  # narrow range far from zero
        torch.full((9,), -2.5),  # constant
        torch.tensor([1.0]),
        torch.tensor([-3e38, 3e38]),  # range overflows float32
        torch.tensor([1e30, -2e30, 5.0]),  # sum of squares overflows float32
        torch.tensor([float("nan"), 1.0, float("-inf"), 4.0]),
        torch.zeros(1000).exponential_().pow(8),  # long tail
    ]
    assert histogram_stats(tensors, bins=7).dtype == torch.float64
    for bins in (1, 7, 64, 8191):
        for t, h in zip(tensors, tensor_histograms(tensors, bins), strict=True):
            assert h is not None
            lo, hi, num, total, squares, nonfinite, counts = naive_histogram(t, bins)
            assert (h.min, h.max, h.num, h.nonfinite) == (lo, hi, num, nonfinite), (t.dtype, t.numel())
            assert sum(h.bucket_counts) == num
            assert h.lower_edge == (lo - 0.5 if lo == hi else lo)
            assert h.bucket_limits[-1] == (hi + 0.5 if lo == hi else hi)
            x = t.reshape(-1).float().numpy().astype(np.float64)
            x = x[np.isfinite(x)]
            moved = 0 if lo == hi else 2 * near_edge(x, lo, hi, bins)
            assert np.abs(np.array(h.bucket_counts) - counts).sum() <= moved, (t.dtype, t.numel(), bins)
            magnitude = float(np.abs(x).sum())
            assert h.sum == pytest.approx(total, rel=1e-6, abs=1e-6 * magnitude)
            assert h.sum_squares == pytest.approx(squares, rel=1e-6)


def test_one_host_transfer_for_many_tensors() -> None:
    tensors = [torch.randn(50, 20) for _ in range(40)] + [torch.tensor([float("nan"), 1.0])]
    with count_host_syncs() as counter:
        counter.active = True
        stats = histogram_stats(tensors, bins=64)
        counter.active = False
        assert counter.calls == []  # computing stays on the device
        counter.active = True
        hists = to_histograms(stats)
        counter.active = False
    assert counter.calls == ["tolist"]
    assert len(hists) == 41 and stats.shape == (41, 7 + 64)


def test_invalid_bins_raise() -> None:
    with pytest.raises(ValueError, match="bins"):
        histogram_stats([torch.ones(3)], bins=0)
    with pytest.raises(TypeError, match="complex"):
        histogram_stats([torch.ones(3, dtype=torch.complex64)])


# -- TensorBoard records -----------------------------------------------------------------------------


def test_written_records_are_what_tensorboard_reads(tmp_path: Path) -> None:
    x = torch.arange(10.0)
    x_nan = torch.tensor([1.0, float("nan"), 2.0])
    writer = SummaryWriter(str(tmp_path))
    hists = dict(
        zip(
            ["a", "b", "nan", "none"],
            tensor_histograms([x, x_nan, torch.full((3,), float("nan")), None], 5),
            strict=True,
        )
    )
    assert write_histograms(writer, hists, global_step=7) == 2  # the all-NaN and None entries are skipped
    writer.add_histogram("reference", x.numpy(), 7, bins=5)
    writer.close()
    acc = load_events(str(tmp_path))
    assert sorted(acc.Tags()["histograms"]) == ["a", "b", "reference"]
    a = histograms(acc, "a")[7]
    ref = histograms(acc, "reference")[7]
    assert (a.min, a.max, a.num, a.sum, a.sum_squares) == (
        ref.min,
        ref.max,
        ref.num,
        ref.sum,
        ref.sum_squares,
    )
    assert list(a.bucket) == [2.0] * 5
    # add_histogram's layout (an empty bucket at the left) holds the same non-empty buckets and limits
    assert [c for c in ref.bucket if c] == list(a.bucket)
    assert list(ref.bucket_limit)[1:] == pytest.approx(list(a.bucket_limit))

    # TensorBoard's own conversion to [left, right, count] buckets gives sensible, ordered buckets
    proto = HistogramProto(
        min=a.min,
        max=a.max,
        num=a.num,
        sum=a.sum,
        sum_squares=a.sum_squares,
        bucket_limit=a.bucket_limit,
        bucket=a.bucket,
    )
    value = Summary.Value(tag="a", histo=proto)
    buckets = tensor_util.make_ndarray(data_compat.migrate_value(value).tensor)
    assert buckets[:, 2].sum() == 10
    assert buckets[0, 0] == 0.0 and buckets[-1, 1] == 9.0
    assert (buckets[:, 0] <= buckets[:, 1]).all()
    np.testing.assert_allclose(buckets[:, 1], [1.8, 3.6, 5.4, 7.2, 9.0], rtol=1e-6)


# -- gradient-flow picture ---------------------------------------------------------------------------


def test_grad_flow_stats_known_values() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1, bias=False), nn.Linear(1, 1))
    index = LayerIndex.build(model)  # layers "0" (weight, bias), "2" (weight), "3" (weight, bias)
    grads: list[Tensor | None] = [
        torch.tensor([[1.0, -2.0], [3.0, -4.0]]),
        torch.tensor([5.0, -6.0]),
        torch.tensor([[0.5, -0.25]]),
        None,
        None,
    ]
    flow = grad_flow_stats(grads, index)
    assert index.layer_names == ["0", "2", "3"]
    assert torch.allclose(flow[0], torch.tensor([21.0 / 6, 0.375, 0.0]))  # mean |g|
    assert torch.equal(flow[1], torch.tensor([6.0, 0.5, 0.0]))  # max |g|
    assert torch.equal(flow[2], torch.tensor([6.0, 2.0, 0.0]))  # values per layer


def test_grad_flow_image_is_rgb() -> None:
    img = grad_flow_image(["a", "b", "c"], [1e-6, 0.0, float("nan")], [1e-3, 0.0, float("inf")])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10  # something was drawn


# -- HistogramLogger ---------------------------------------------------------------------------------


class GradSpy(Callback):
    """Records the gradients as they are in ``on_before_optimizer_step`` (placed after the logger)."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, Tensor]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.grads[trainer.global_step] = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


class HookSpy(Callback):
    """Counts forward hooks at batch start and asserts that none remain at batch end (after the logger)."""

    def __init__(self) -> None:
        self.at_start: list[int] = []

    @staticmethod
    def count(module: nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.at_start.append(self.count(pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        assert self.count(pl_module) == 0


def fit_tb(
    tmp_path: Path, callbacks: list[Callback], model: pl.LightningModule | None = None, **kw: Any
) -> str:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    args: dict[str, Any] = dict(max_steps=4, max_epochs=None, logger=logger, callbacks=callbacks)
    args.update(kw)
    make_trainer(tmp_path, **args).fit(model or MLPModule(), make_loader())
    return str(logger.log_dir)


PARAMS = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"]


def test_logger_writes_weights_grads_activations_and_picture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spy = GradSpy()
    cb = HistogramLogger(every_n_steps=2, activations=True, bins=16, figure_every_n_steps=2)
    # Lightning clips after on_before_optimizer_step: the histograms must show the unclipped gradients
    log_dir = fit_tb(tmp_path, [cb, spy], gradient_clip_val=1e-6)
    acc = load_events(log_dir)
    tags = set(acc.Tags()["histograms"])
    expected = {f"weights/{p}" for p in PARAMS} | {f"grads/{p}" for p in PARAMS}
    expected |= {f"activations/net.{i}" for i in range(5)}
    assert tags == expected
    for tag in expected:
        assert sorted(histograms(acc, tag)) == [1, 3]
    assert [e.step for e in acc.Images("grad_flow")] == [1, 3]

    for step in (1, 3):
        for name in PARAMS:
            g = spy.grads[step][name]
            rec = histograms(acc, f"grads/{name}")[step]
            ref = one(g, bins=16)
            assert (rec.min, rec.max, rec.num) == (float(g.min()), float(g.max()), g.numel())
            assert list(rec.bucket) == ref.bucket_counts
            assert sum(rec.bucket) == g.numel()
            assert list(rec.bucket_limit) == ref.bucket_limits
    assert (
        max(abs(histograms(acc, "grads/net.0.weight")[1].min), histograms(acc, "grads/net.0.weight")[1].max)
        > 1e-4
    )


def test_include_exclude_and_max_tensors(tmp_path: Path) -> None:
    cb = HistogramLogger(every_n_steps=1, include=r"^grads/", exclude=r"\.bias$", max_tensors=2)
    acc = load_events(fit_tb(tmp_path, [cb], max_steps=1))
    assert sorted(acc.Tags()["histograms"]) == ["grads/net.0.weight", "grads/net.4.weight"]


def test_hooks_only_on_the_first_micro_batch_of_logging_steps(tmp_path: Path) -> None:
    spy = HookSpy()
    cb = HistogramLogger(
        every_n_steps=2, activations=True, weights=False, grads=False, figure_every_n_steps=0
    )
    log_dir = fit_tb(tmp_path, [cb, spy], accumulate_grad_batches=2, max_steps=2)
    # optimizer steps 0 and 1 take two batches each; step 1 is the logging step
    assert spy.at_start == [0, 0, 5, 0]
    acc = load_events(log_dir)
    assert sorted(histograms(acc, "activations/net.1")) == [1]
    assert histograms(acc, "activations/net.1")[1].num == 16 * 16  # one micro-batch of 16 x width 16


def test_no_host_sync_on_steps_that_do_not_log(tmp_path: Path) -> None:
    every = 3

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
        cb = HistogramLogger(every_n_steps=every, activations=True, figure_every_n_steps=every)
        fit_tb(tmp_path, [window, cb], max_steps=6, log_every_n_steps=100)
    for step, calls in window.by_step.items():
        if (step + 1) % every:
            assert calls == [], (step, calls)
        else:
            assert calls == ["tolist"], (step, calls)  # one transfer for every histogram and the picture


def test_without_tensorboard_warns_once_and_skips(tmp_path: Path) -> None:
    cb = HistogramLogger(every_n_steps=1, activations=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(
            tmp_path, max_steps=3, max_epochs=None, logger=CSVLogger(tmp_path), callbacks=[cb]
        )
        trainer.fit(MLPModule(), make_loader())
    ours = [str(w.message) for w in caught if str(w.message).startswith("HistogramLogger")]
    assert len(ours) == 1 and "TensorBoardLogger" in ours[0]
    assert trainer.global_step == 3


def test_without_matplotlib_warns_and_keeps_the_histograms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    cb = HistogramLogger(every_n_steps=1, figure_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_dir = fit_tb(tmp_path, [cb], max_steps=3)
    assert len([w for w in caught if "matplotlib" in str(w.message)]) == 1
    acc = load_events(log_dir)
    assert acc.Tags()["images"] == []
    assert sorted(histograms(acc, "grads/net.0.weight")) == [0, 1, 2]


class NaNGrad(Callback):
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            pl_module.net[0].weight.grad[0, :3] = float("nan")
            pl_module.net[0].bias.grad.fill_(float("inf"))


def test_non_finite_gradients_are_counted_apart(tmp_path: Path) -> None:
    model = MLPModule(lr=0.0)
    acc = load_events(fit_tb(tmp_path, [NaNGrad(), HistogramLogger(every_n_steps=1)], model, max_steps=1))
    rec = histograms(acc, "grads/net.0.weight")[0]
    assert rec.num == 16 * 8 - 3 == sum(rec.bucket)
    assert scalars(acc, "nonfinite/grads/net.0.weight") == {0: 3.0}
    assert "grads/net.0.bias" not in acc.Tags()["histograms"]  # all infinite: nothing to draw
    assert scalars(acc, "nonfinite/grads/net.0.bias") == {0: 16.0}


def test_bf16_mixed_precision_activations(tmp_path: Path) -> None:
    cb = HistogramLogger(every_n_steps=1, activations=True)
    acc = load_events(fit_tb(tmp_path, [cb], max_steps=2, precision="bf16-mixed"))
    rec = histograms(acc, "activations/net.0")[1]
    assert rec.num == 16 * 16 == sum(rec.bucket)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"bins": 0}, "bins"),
        ({"bins": 2.5}, "bins"),
        ({"include": "("}, "include"),
        ({"exclude": 3}, "exclude"),
        ({"max_tensors": 0}, "max_tensors"),
        ({"figure_every_n_steps": -1}, "figure_every_n_steps"),
        ({"weights": "yes"}, "weights"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        HistogramLogger(**kwargs)


def test_flat_shards_are_refused_and_dtensor_shards_accepted_at_setup() -> None:
    """FSDP1's flat shards are refused; ModelParallelStrategy's DTensors are counted whole
    (``test_sharded.py`` compares them with an unsharded run)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    cb = HistogramLogger()
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[cb])
    with pytest.raises(ValueError, match=r"FSDPStrategy.*ModelParallelStrategy"):
        cb.setup(trainer, MLPModule(), "fit")  # type: ignore[arg-type]
    trainer.strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    cb.setup(trainer, MLPModule(), "fit")  # type: ignore[arg-type]  # no error


class ZeroGrads(StabilityCallback):
    """A gradient-modifying callback: zeroes every gradient in ``on_before_optimizer_step``."""

    modifies_gradients = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.zero_()


def test_placed_after_a_gradient_modifier_raises_a_clear_error_at_setup(tmp_path: Path) -> None:
    assert HistogramLogger.reads_gradients
    cb = HistogramLogger(every_n_steps=1)
    callbacks: list[Callback] = [ZeroGrads(), cb]
    trainer = make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=callbacks)
    with pytest.raises(MisconfigurationException, match=r"HistogramLogger .* must come before ZeroGrads"):
        trainer.fit(MLPModule(), make_loader())
    assert trainer.global_step == 0
    names = [type(c).__name__ for c in trainer.callbacks]  # type: ignore[attr-defined]
    assert names.index("ZeroGrads") < names.index("HistogramLogger")  # left where the user put it


def test_placed_before_a_gradient_modifier_it_sees_the_gradients_first(tmp_path: Path) -> None:
    acc = load_events(fit_tb(tmp_path, [HistogramLogger(every_n_steps=1), ZeroGrads()], max_steps=1))
    rec = histograms(acc, "grads/net.0.weight")[0]
    assert rec.num == 16 * 8
    assert max(abs(rec.min), abs(rec.max)) > 0.0  # the gradients before ZeroGrads zeroed them


def test_picture_cadence_defaults_to_every_fifth_histogram_step(tmp_path: Path) -> None:
    assert HistogramLogger(every_n_steps=100).figure_every_n_steps == 500
    acc = load_events(fit_tb(tmp_path, [HistogramLogger(every_n_steps=1)], max_steps=6))
    assert [e.step for e in acc.Images("grad_flow")] == [4]
    assert sorted(histograms(acc, "weights/net.0.weight")) == [0, 1, 2, 3, 4, 5]


def test_state_key_tells_instances_apart() -> None:
    assert HistogramLogger(bins=32).state_key != HistogramLogger(bins=64).state_key
    assert HistogramLogger().state_key == HistogramLogger().state_key


def test_gradients_are_logged_as_the_optimizer_sees_them(tmp_path: Path) -> None:
    """Once per optimizer step, the sum of the accumulated micro-batches, unscaled by the GradScaler."""

    class Seen(Callback):
        def __init__(self) -> None:
            self.maxes: list[float] = []

        def on_before_optimizer_step(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any
        ) -> None:
            self.maxes.append(float(pl_module.net[0].weight.grad.max()))  # type: ignore[index,union-attr]

    seen = Seen()
    cb = HistogramLogger(every_n_steps=1, weights=False, figure_every_n_steps=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    log_dir = fit_tb(
        tmp_path,
        [cb, seen],
        max_steps=2,
        accumulate_grad_batches=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    )
    logged = histograms(load_events(log_dir), "grads/net.0.weight")
    assert sorted(logged) == [0, 1]
    assert [logged[step].max for step in (0, 1)] == pytest.approx(seen.maxes, rel=1e-6)
    assert max(seen.maxes) < 100.0  # unscaled: the scaled gradients would be 4096 times larger
