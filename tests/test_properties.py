"""Property tests of the tensor math against a float64 NumPy reference, on random awkward inputs.

Random lists of tensors in fp32/fp16/bf16/fp64, of shapes including 0-size and 1-element, with NaN,
inf and huge values: statistics agree with NumPy; clipping never increases a norm and never turns
finite gradients into NaN; histograms count every finite value exactly once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stability_callbacks import (
    adaptive_clip_grad_,
    clip_grad_norm_to,
    clip_grad_value_,
    tensor_histograms,
    tensor_stats,
    total_norm,
)

F32_MAX = torch.finfo(torch.float32).max
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SPECIAL = [0.0, 1.0, -1.0, 1e-30, 6e4, 1e20, -3e38, float("nan"), float("inf"), float("-inf")]

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@st.composite
def tensors(draw: st.DrawFn, finite: bool = False) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 0, 4), (4, 1, 3)]))
    n = math.prod(shape)
    specials = [v for v in SPECIAL if not finite or math.isfinite(v)]
    values = draw(
        st.lists(
            st.one_of(st.floats(-1e3, 1e3, allow_nan=False), st.sampled_from(specials)),
            min_size=n,
            max_size=n,
        )
    )
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype != torch.float64:  # saturate to the dtype's range, as a cast of real gradients would
        info = torch.finfo(dtype)
        t = torch.where(t.isfinite(), t.clamp(info.min, info.max), t)
    return t.to(dtype)


def reference(t: torch.Tensor) -> dict[str, float]:
    x = t.double().numpy().ravel()
    with np.errstate(all="ignore"):
        return {
            "l2": float(np.sqrt(np.sum(np.square(x)))) if x.size else 0.0,
            "max_abs": float(np.max(np.abs(x))) if x.size else 0.0,
            "mean_abs": float(np.mean(np.abs(x))) if x.size else 0.0,
            "nonfinite": float(np.sum(~np.isfinite(x))),
        }


def close(a: float, b: float, rel: float) -> bool:
    if math.isnan(b):
        return math.isnan(a)
    if math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-30)


@given(st.lists(tensors(), min_size=1, max_size=6))
def test_statistics_agree_with_float64_numpy(ts: list[torch.Tensor]) -> None:
    stats = tensor_stats(ts)
    for i, t in enumerate(ts):
        ref = reference(t)
        has_nan = bool(torch.isnan(t).any())
        l2 = stats.l2[i].item()
        if ref["l2"] > F32_MAX:  # only a norm beyond float32's range may be inf
            assert math.isinf(l2)
        elif not (has_nan and math.isinf(ref["l2"])):
            assert close(l2, ref["l2"], 1e-5), (t, l2, ref)
        if not has_nan:
            assert close(stats.max_abs[i].item(), ref["max_abs"], 1e-6)
        assert stats.nonfinite[i].item() == ref["nonfinite"]
        if ref["mean_abs"] * t.numel() < F32_MAX:  # the mean comes from a float32 L1 norm
            assert close(stats.mean_abs[i].item(), ref["mean_abs"], 1e-5)


@given(st.lists(tensors(finite=True), min_size=1, max_size=6), st.floats(1e-3, 1e3))
def test_norm_clipping_never_increases_a_norm_nor_makes_nan(ts: list[torch.Tensor], max_norm: float) -> None:
    grads = [t.float() for t in ts]  # clipping works on float32 gradients here
    before = total_norm(grads).item()
    decision = clip_grad_norm_to(grads, max_norm)
    after = total_norm(grads).item()
    assert all(torch.isfinite(g).all() for g in grads)
    if math.isfinite(before):
        assert after <= before * (1 + 1e-5) + 1e-30
        assert after <= max(max_norm * (1 + 1e-4), before * (1 + 1e-5))
    else:  # a norm that overflows float32 is reported as non-finite and the step is left alone
        assert not bool(decision.finite)


@given(st.lists(tensors(finite=True), min_size=1, max_size=4), st.floats(1e-3, 1e3))
def test_value_clipping_bounds_every_element(ts: list[torch.Tensor], max_value: float) -> None:
    grads = [t.float() for t in ts]
    before = [g.abs().clone() for g in grads]
    clip_grad_value_(grads, max_value)
    for g, b in zip(grads, before, strict=True):
        assert torch.isfinite(g).all()
        assert (g.abs() <= max_value).all()
        assert (g.abs() <= b).all()


@given(st.lists(st.sampled_from([(3, 4), (5,), (2, 3, 2)]), min_size=1, max_size=4), st.integers(0, 2**16))
def test_agc_never_increases_a_unit_norm(shapes: list[tuple[int, ...]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 10
    before = [p.grad.clone() for p in params]
    adaptive_clip_grad_(params, clip_factor=0.01)
    for p, b in zip(params, before, strict=True):
        assert torch.isfinite(p.grad).all()
        if p.ndim > 1:
            assert (p.grad.flatten(1).norm(dim=1) <= b.flatten(1).norm(dim=1) * (1 + 1e-6)).all()
        else:
            assert p.grad.norm() <= b.norm() * (1 + 1e-6)


@given(st.lists(tensors(), min_size=1, max_size=5), st.sampled_from([1, 8, 64]))
def test_histograms_count_every_finite_value_once(ts: list[torch.Tensor], bins: int) -> None:
    for t, h in zip(ts, tensor_histograms(ts, bins=bins), strict=True):
        finite = t[torch.isfinite(t)].float().double()  # histograms are binned in float32
        if t.numel() == 0:
            assert h is None
            continue
        assert h is not None
        assert sum(h.bucket_counts) == finite.numel() == h.num
        assert h.nonfinite == t.numel() - finite.numel()
        if finite.numel():
            assert h.min == finite.min().item() and h.max == finite.max().item()
