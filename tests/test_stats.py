"""Fused statistics against hand-computed values and naive per-tensor loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stability_callbacks import stats as stats_module
from stability_callbacks._trainer import forward_order
from stability_callbacks.stats import (
    LayerIndex,
    gradient_norms,
    layer_norms,
    nonfinite_counts,
    tensor_norms,
    tensor_stats,
    total_norm,
)


def test_hand_computed_norm_of_two_parameter_model() -> None:
    model = nn.Linear(1, 1)
    model.weight.grad = torch.tensor([[3.0]])
    model.bias.grad = torch.tensor([4.0])
    assert total_norm(p.grad for p in model.parameters()).item() == pytest.approx(5.0)
    norms = gradient_norms(model, per="parameter")
    assert norms["weight"].item() == pytest.approx(3.0)
    assert norms["bias"].item() == pytest.approx(4.0)
    assert gradient_norms(model)["weight"].item() == pytest.approx(3.0)  # root-owned params keep their names


def test_tensor_stats_known_values() -> None:
    a = torch.tensor([3.0, -4.0])
    s = tensor_stats([a, None, torch.empty(0), torch.tensor([1.0, float("nan"), float("inf")])])
    assert s.l2.tolist()[:3] == pytest.approx([5.0, 0.0, 0.0])
    assert s.max_abs[0].item() == 4.0
    assert s.mean_abs[0].item() == 3.5
    assert s.numel.tolist() == [2.0, 0.0, 0.0, 3.0]
    assert s.nonfinite.tolist() == [0, 0, 0, 2]
    assert math.isnan(s.l2[3].item())
    assert s.l2.dtype == torch.float32


def test_per_layer_norms_match_naive_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    model(torch.randn(11, 7)).pow(2).sum().backward()
    fused = gradient_norms(model)
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        naive = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in own))
        assert fused[name].item() == pytest.approx(naive, rel=1e-6)
    per_param = gradient_norms(model, per="parameter")
    for name, p in model.named_parameters():
        assert per_param[name].item() == pytest.approx(p.grad.norm().item(), rel=1e-6)


def test_total_norm_matches_torch_and_inf_norm() -> None:
    torch.manual_seed(1)
    grads = [torch.randn(5, 3), torch.randn(4), torch.randn(2, 2, 2).double()]
    expected = torch.nn.utils.get_total_norm(grads, 2.0).item()
    assert total_norm(grads).item() == pytest.approx(expected, rel=1e-6)
    assert total_norm(grads, math.inf).item() == pytest.approx(max(g.abs().max().item() for g in grads))
    assert total_norm(grads, 1.0).item() == pytest.approx(sum(g.abs().sum().item() for g in grads), rel=1e-6)


def test_mixed_dtypes_keep_input_order() -> None:
    tensors = [
        torch.full((4,), 2.0, dtype=torch.bfloat16),
        torch.full((9,), 1.0),
        torch.full((1,), 7.0).half(),
    ]
    assert tensor_norms(tensors).tolist() == pytest.approx([4.0, 3.0, 7.0])


@pytest.fixture(params=["float64", "no float64"])
def norm_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Devices with float64 accumulate in it; on those without (MPS, XLA: emulated here on the CPU) each
    tensor is divided by its largest magnitude before the sum of squares."""
    if request.param == "no float64":
        monkeypatch.setattr(stats_module, "_NO_FLOAT64", frozenset({"cpu"}))
        assert stats_module.wide_dtype(torch.device("cpu")) == torch.float32
    return str(request.param)


def test_norms_equal_float64_norms(norm_path: str) -> None:
    torch.manual_seed(0)
    tensors = [
        torch.randn(1000),
        torch.full((10,), 1e20),  # the float32 sum of squares overflows
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("inf"), 1.0]),
        torch.randn(50).half() * 1000,
        torch.randn(50).bfloat16(),
    ]
    for norm_type in (1.0, 2.0):
        fast = tensor_norms(tensors, norm_type)
        expected = torch.stack([torch.linalg.vector_norm(t.double(), norm_type).float() for t in tensors])
        torch.testing.assert_close(fast, expected, rtol=1e-5, atol=0.0, equal_nan=True)
        assert torch.isfinite(fast[:2]).all() and not torch.isfinite(fast[2:4]).any()


def test_huge_finite_values_do_not_overflow(norm_path: str) -> None:
    g = torch.full((1000,), 1e20)
    norm = tensor_norms([g])[0].item()
    assert math.isfinite(norm)
    assert norm == pytest.approx(1e20 * math.sqrt(1000), rel=1e-5)
    assert total_norm([g, g]).item() == pytest.approx(1e20 * math.sqrt(2000), rel=1e-5)
    half = torch.full((4096,), 60000.0, dtype=torch.float16)  # sum of squares far above fp16's range
    assert tensor_norms([half])[0].item() == pytest.approx(60000.0 * 64, rel=1e-3)


def test_tiny_finite_values_do_not_underflow(norm_path: str) -> None:
    g = torch.full((1000,), 1e-25)  # each square (1e-50) is below float32's smallest subnormal
    assert tensor_norms([g])[0].item() == pytest.approx(1e-25 * math.sqrt(1000), rel=1e-5)
    assert total_norm([g, g]).item() == pytest.approx(1e-25 * math.sqrt(2000), rel=1e-5)
    mixed = [torch.full((4,), 1e-25), torch.full((4,), 1e20)]
    assert tensor_norms(mixed).tolist() == pytest.approx([2e-25, 2e20], rel=1e-5)


def test_sparse_gradients_use_coalesced_values() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 1, 4])).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    dense = emb.weight.grad.to_dense()
    assert tensor_norms([emb.weight.grad])[0].item() == pytest.approx(dense.norm().item(), rel=1e-6)
    assert nonfinite_counts([emb.weight.grad]).tolist() == [0]


def test_layer_index_orders_and_groups() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)  # registered first, runs last
            self.body = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    model = Reversed()
    with forward_order(model) as order:
        model(torch.randn(2, 3))
    assert order == ["body", "head"]
    assert not model.body._forward_pre_hooks  # hooks removed
    index = LayerIndex.build(model).reorder(order)
    assert index.layer_names == ["body", "head"]
    model(torch.randn(2, 3)).sum().backward()
    norms = layer_norms(tensor_norms([p.grad for p in index.params]), index)
    expected_body = math.sqrt(model.body.weight.grad.norm() ** 2 + model.body.bias.grad.norm() ** 2)
    assert norms[0].item() == pytest.approx(expected_body, rel=1e-6)


def test_frozen_and_gradless_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    assert LayerIndex.build(model).layer_names == ["1"]
    assert LayerIndex.build(model, trainable_only=False).layer_names == ["0", "1"]
    assert gradient_norms(model) == {}  # no backward yet: no layer has a gradient
    with pytest.raises(ValueError, match="per"):
        LayerIndex.build(model, per="block")
