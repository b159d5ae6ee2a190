"""Layer 1 of stability_callbacks.init: schemes, activation discovery, LSUV and init_swap."""

from __future__ import annotations

import copy
import math
from typing import Any

import lsuv
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stability_callbacks.init import (
    SCHEMES,
    Activation,
    activation_gain,
    following_activations,
    init_swap,
    init_tensor_,
    lsuv_,
)

WIDTH = 256


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """These deep, narrow matmuls run fastest on one thread, and much slower on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def deep_mlp(activation: type[nn.Module], depth: int = 100, width: int = WIDTH) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), activation()]
    return nn.Sequential(*layers)


def activation_stds(model: nn.Sequential, x: Tensor) -> list[float]:
    """Std of the output of every activation module, by a plain loop over the layers."""
    stds = []
    with torch.no_grad():
        for m in model:
            x = m(x)
            if not isinstance(m, nn.Linear):
                stds.append(x.std().item())
    return stds


def linear_output_stds(model: nn.Sequential, x: Tensor) -> list[float]:
    stds = []
    with torch.no_grad():
        for m in model:
            x = m(x)
            if isinstance(m, nn.Linear):
                stds.append(x.std().item())
    return stds


def batch(n: int = 128, width: int = WIDTH, seed: int = 1) -> Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# -- variance preservation in deep MLPs --------------------------------------------------------------


def test_deep_tanh_mlp_loses_scale_by_default_and_auto_restores_it() -> None:
    torch.manual_seed(0)
    model = deep_mlp(nn.Tanh)
    x = batch()
    stds = activation_stds(model, x)
    default_ratio = stds[-1] / stds[0]
    assert default_ratio < 0.1  # measured 0.092: the signal decays to the scale of the default biases
    report = init_swap(model)
    assert report.traced_by == "fx"
    assert report["0.weight"].scheme == "xavier_uniform" and "gain 1.667" in report["0.weight"].reason
    stds = activation_stds(model, x)
    assert 0.5 <= stds[-1] / stds[0] <= 2.0  # measured 0.86


def test_deep_relu_mlp_loses_scale_by_default_and_auto_restores_it_on_average() -> None:
    x = batch()
    ratios = []
    for seed in range(8):
        torch.manual_seed(seed)
        model = deep_mlp(nn.ReLU)
        if seed == 0:
            stds = activation_stds(model, x)
            assert stds[-1] / stds[0] < 0.1  # measured 0.064
        report = init_swap(model)
        assert report["0.weight"].scheme == "he_normal"
        stds = activation_stds(model, x)
        ratios.append(stds[-1] / stds[0])
    geometric_mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    assert 0.5 <= geometric_mean <= 2.0  # measured 0.59
    # He preserves the variance only in expectation: single 100-layer nets drift log-normally
    # (measured here 0.077 ... 2.6 over these 8 seeds), hence the geometric mean above.
    assert max(ratios) / min(ratios) > 5.0


def test_he_and_xavier_weight_stds_have_the_textbook_values() -> None:
    torch.manual_seed(0)
    relu_net = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 200), nn.LeakyReLU(0.2))
    tanh_net = nn.Sequential(
        nn.Linear(400, 300), nn.Tanh(), nn.Linear(300, 200), nn.Sigmoid(), nn.Linear(200, 10)
    )
    init_swap(relu_net)
    init_swap(tanh_net)
    expected = {
        relu_net[0].weight: math.sqrt(2 / 400),
        relu_net[2].weight: math.sqrt(2 / (1 + 0.2**2)) / math.sqrt(300),
        tanh_net[0].weight: 5 / 3 * math.sqrt(2 / 700),
        tanh_net[2].weight: math.sqrt(2 / 500),
        tanh_net[4].weight: math.sqrt(2 / 210),  # no activation after it: Xavier, gain 1
    }
    for w, std in expected.items():
        assert w.std().item() == pytest.approx(std, rel=0.03)
    for m in [*relu_net, *tanh_net]:
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s not in ("auto", "lsuv")])
def test_every_tensor_scheme_has_its_variance(scheme: str) -> None:
    w = torch.empty(300, 200)
    init_tensor_(w, scheme, gain=2.0, generator=torch.Generator().manual_seed(0))
    fan_in, fan_out = 200, 300
    expected = {
        "normal": 0.02,
        "uniform": 1 / math.sqrt(fan_in) / math.sqrt(3),
        "xavier_uniform": 2.0 * math.sqrt(2 / (fan_in + fan_out)),
        "xavier_normal": 2.0 * math.sqrt(2 / (fan_in + fan_out)),
        "he_uniform": 2.0 / math.sqrt(fan_in),
        "he_normal": 2.0 / math.sqrt(fan_in),
        "orthogonal": 2.0 / math.sqrt(fan_out),  # 200 orthogonal columns of norm 2 in 300 dimensions
    }[scheme]
    assert w.std().item() == pytest.approx(expected, rel=0.03)
    if scheme == "orthogonal":
        torch.testing.assert_close(w.T @ w, 4.0 * torch.eye(200), atol=1e-4, rtol=0)
    else:
        assert w.mean().abs().item() < 0.1 * expected


def test_activation_gains_match_torch() -> None:
    assert activation_gain(None) == 1.0
    assert activation_gain(Activation("relu")) == pytest.approx(nn.init.calculate_gain("relu"))
    assert activation_gain(Activation("leaky_relu", 0.2)) == pytest.approx(
        nn.init.calculate_gain("leaky_relu", 0.2)
    )
    assert activation_gain(Activation("tanh")) == pytest.approx(5 / 3)
    assert activation_gain(Activation("sigmoid")) == 1.0
    assert activation_gain(Activation("gelu")) == pytest.approx(math.sqrt(2))


# -- LSUV --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_lsuv_gives_unit_output_std_in_every_layer_of_a_deep_mlp(activation: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = deep_mlp(activation)
    x = batch(64)
    before = linear_output_stds(model, x)
    assert min(before) < 0.1
    report = init_swap(model, "lsuv", sample_input=x)
    stds = linear_output_stds(model, x)  # measured again, independently of what LSUV reports
    assert len(stds) == 100
    assert max(abs(s - 1.0) for s in stds) <= 0.1
    assert all(r.converged and r.tries <= 10 for r in report.lsuv.values())
    assert list(report.lsuv) == [f"{2 * i}" for i in range(100)]  # forward order


def test_lsuv_without_centring_matches_the_lsuv_package_weight_for_weight() -> None:
    torch.manual_seed(0)
    model = deep_mlp(nn.Tanh, depth=20)
    reference = copy.deepcopy(model)
    x = batch(64)
    torch.manual_seed(5)
    results = lsuv_(model, x, center=False)
    torch.manual_seed(5)  # the same orthogonal draws, in the same order
    lsuv.lsuv_with_singlebatch(reference, x, verbose=False)
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    assert max(abs(s - 1.0) for s in linear_output_stds(reference, x)) <= 0.1
    assert all(r.converged for r in results.values())


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_lsuv_package_on_the_same_deep_mlp_and_batch(activation: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = deep_mlp(activation)
    reference = copy.deepcopy(model)
    x = batch(64)
    init_swap(model, "lsuv", sample_input=x)
    lsuv.lsuv_with_singlebatch(reference, x, verbose=False)
    assert max(abs(s - 1.0) for s in linear_output_stds(model, x)) <= 0.1
    assert max(abs(s - 1.0) for s in linear_output_stds(reference, x)) <= 0.1


def test_centred_lsuv_zeroes_every_unit_mean() -> None:
    torch.manual_seed(0)
    model = deep_mlp(nn.Sigmoid, depth=10, width=32)
    x = torch.randn(64, 32)
    lsuv_(model, x)
    with torch.no_grad():
        h = x
        for m in model:
            h = m(h)
            if isinstance(m, nn.Linear):
                assert h.mean(0).abs().max().item() <= 0.1
                assert abs(h.std().item() - 1.0) <= 0.1


class Probe(nn.Module):
    """Conv net with BatchNorm and Dropout, one submodule deliberately left in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(F.relu(self.bn(self.conv(x))))
        return self.head(x.flatten(1))


def test_lsuv_restores_every_module_mode_removes_its_hooks_and_keeps_running_stats() -> None:
    torch.manual_seed(0)
    model = Probe().train()
    model.drop.eval()
    running = model.bn.running_mean.clone()
    x = torch.randn(16, 3, 4, 4)
    results = lsuv_(model, x)
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model.bn.running_mean, running)  # measured in eval mode: no BN update
    assert list(results) == ["conv", "head"]
    assert all(r.converged for r in results.values())


def test_lsuv_hooks_are_removed_when_the_forward_pass_fails() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 2))  # the second layer cannot take the first's output
    with pytest.raises(RuntimeError):
        lsuv_(model, torch.randn(8, 4))
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training


def test_lsuv_reports_layers_the_forward_pass_never_reaches() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    results = lsuv_(Partial(), torch.randn(32, 4))
    assert results["used"].converged and results["used"].called
    assert not results["unused"].called


# -- recurrent and normalisation layers ----------------------------------------------------------------


def test_lstm_forget_bias_is_one_and_recurrent_weights_are_orthogonal_per_gate() -> None:
    torch.manual_seed(0)
    hidden = 16
    model = nn.LSTM(8, hidden, num_layers=2)
    report = init_swap(model)
    for layer in range(2):
        b_ih, b_hh = getattr(model, f"bias_ih_l{layer}"), getattr(model, f"bias_hh_l{layer}")
        total = b_ih + b_hh
        assert torch.equal(total[hidden : 2 * hidden], torch.ones(hidden))  # forget gate
        assert torch.count_nonzero(total[:hidden]) == 0 and torch.count_nonzero(total[2 * hidden :]) == 0
        w_hh = getattr(model, f"weight_hh_l{layer}")
        for gate in w_hh.detach().chunk(4):
            torch.testing.assert_close(gate @ gate.T, torch.eye(hidden), atol=1e-5, rtol=0)
        assert report[f"weight_hh_l{layer}"].scheme == "orthogonal"
        assert report[f"weight_ih_l{layer}"].scheme == "xavier_uniform"
    fan_in = 8
    assert model.weight_ih_l0.std().item() == pytest.approx(math.sqrt(2 / (fan_in + hidden)), rel=0.1)


def test_gru_recurrent_weights_are_orthogonal_per_gate_and_biases_zero() -> None:
    torch.manual_seed(0)
    model = nn.GRU(4, 12, batch_first=True)
    init_swap(model)
    for gate in model.weight_hh_l0.detach().chunk(3):
        torch.testing.assert_close(gate @ gate.T, torch.eye(12), atol=1e-5, rtol=0)
    assert torch.count_nonzero(model.bias_ih_l0) == 0 and torch.count_nonzero(model.bias_hh_l0) == 0


def test_norm_layers_get_weight_one_bias_zero_and_fresh_running_stats() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.LayerNorm(4 * 6 * 6),
        nn.Linear(4 * 6 * 6, 3),
        nn.BatchNorm1d(3),
    )
    for m in model.modules():
        for p in m.parameters(recurse=False):
            nn.init.normal_(p, 3.0, 1.0)
    model(torch.randn(4, 3, 8, 8))  # moves the running statistics
    report = init_swap(model)
    for index in (1, 3, 5, 7):
        norm = model[index]
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
        assert report[f"{index}.weight"].scheme == "ones"
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    assert torch.equal(model[1].running_var, torch.ones(4))
    # the conv is followed (through BatchNorm) by a ReLU: He
    assert report["0.weight"].scheme == "he_normal"


# -- finding the following activation ---------------------------------------------------------------------


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)
        self.d = nn.Linear(64, 64)
        self.e = nn.Linear(64, 64)
        self.out = nn.Linear(64, 2)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.a(x))
        x = torch.tanh(self.drop(self.b(x)))  # through a dropout
        x = self.c(x).sigmoid()
        x = x + F.leaky_relu(self.d(x), 0.2)  # residual
        x = F.gelu(self.e(x).view(-1, 64))  # through a view
        return self.out(x)


EXPECTED_KINDS = {"a": "relu", "b": "tanh", "c": "sigmoid", "d": "leaky_relu", "e": "gelu", "out": None}


def kinds(acts: dict[str, Activation | None]) -> dict[str, str | None]:
    return {k: None if v is None else v.kind for k, v in acts.items()}


def test_functional_activations_are_found_by_tracing() -> None:
    acts, method = following_activations(Functional())
    assert method == "fx"
    assert kinds(acts) == EXPECTED_KINDS
    assert acts["d"] is not None and acts["d"].slope == pytest.approx(0.2)
    torch.manual_seed(0)
    model = Functional()
    report = init_swap(model)
    assert model.a.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert "relu" in report["a.weight"].reason
    assert report["b.weight"].scheme == "xavier_uniform" and "gain 1.667" in report["b.weight"].reason


class Untraceable(Functional):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            return super().forward(x)
        return x


def test_untraceable_models_fall_back_to_the_forward_pass_and_then_to_registration_order() -> None:
    acts, method = following_activations(Untraceable(), torch.randn(4, 64))
    assert method == "hooks"
    assert kinds(acts) == EXPECTED_KINDS
    assert acts["d"] is not None and acts["d"].slope == pytest.approx(0.2)

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x) if x.sum() > -1e9 else x

    acts, method = following_activations(Wrapped())
    assert method == "registration"
    assert kinds(acts) == {"net.0": "relu", "net.2": "tanh", "net.4": None}
    report = init_swap(Wrapped(), sample_input=torch.randn(3, 4))
    assert report.traced_by == "hooks"


def test_hook_fallback_leaves_no_hooks_and_keeps_modes() -> None:
    model = Untraceable().train()
    following_activations(model, torch.randn(4, 64))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


# -- init_swap as a whole ------------------------------------------------------------------------------


def test_init_swap_is_in_place_and_keeps_frozen_and_embedding_weights() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "frozen": nn.Linear(8, 8), "head": nn.Linear(8, 2)})
    model["frozen"].requires_grad_(False)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    report = init_swap(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert any(p is model["head"].weight for p in opt.param_groups[0]["params"])
    assert torch.equal(model["emb"].weight, before["emb.weight"])
    assert torch.equal(model["frozen"].weight, before["frozen.weight"])
    assert report["frozen.weight"].scheme == "kept" and report["frozen.weight"].reason == "frozen"
    assert not torch.equal(model["head"].weight, before["head.weight"])
    assert report["head.weight"].old_std == pytest.approx(before["head.weight"].std(correction=0).item())
    assert report["head.weight"].new_std == pytest.approx(model["head"].weight.std(correction=0).item())


def test_overrides_choose_per_name_and_keep() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    kept = model[4].weight.clone()
    report = init_swap(model, overrides={"0": "orthogonal", "4.*": "keep"})
    w = model[0].weight.detach()
    torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(64), atol=1e-4, rtol=0)  # orthogonal, ReLU gain
    assert "override '0'" in report["0.weight"].reason
    assert torch.equal(model[4].weight, kept)
    assert report["2.weight"].scheme == "he_normal"


def test_report_table_and_markdown_list_every_parameter() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    report = init_swap(model)
    table = report.table()
    assert str(report) == table
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert name in table and f"| {name} |" in report.markdown()
    assert "tanh" in table and "xavier_uniform" in table


def test_half_precision_weights_are_initialised() -> None:
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU()).to(torch.bfloat16)
    init_swap(model)
    assert model[0].weight.dtype == torch.bfloat16
    assert model[0].weight.float().std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)


# -- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_raises_value_error_naming_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match=r"scheme.*'kaiming'"):
        init_swap(model, "kaiming")
    with pytest.raises(ValueError, match=r"overrides.*'encoder\.\*'"):
        init_swap(model, overrides={"encoder.*": "he_normal"})
    with pytest.raises(ValueError, match="overrides"):
        init_swap(model, overrides={"0": "bogus"})
    with pytest.raises(ValueError, match="sample_input"):
        init_swap(model, "lsuv")
    no_linear: Any = nn.Sequential(nn.LayerNorm(4), nn.Tanh())
    with pytest.raises(ValueError, match="Linear"):
        init_swap(no_linear, "lsuv", sample_input=torch.randn(2, 4))
    with pytest.raises(ValueError, match="Linear"):
        lsuv_(nn.LSTM(4, 4), torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="tol"):
        lsuv_(model, torch.randn(2, 4), tol=0)
    with pytest.raises(ValueError, match="max_iters"):
        lsuv_(model, torch.randn(2, 4), max_iters=True)  # a bool is not a number
    with pytest.raises(ValueError, match="forget_bias"):
        init_swap(model, forget_bias=float("nan"))
    with pytest.raises(ValueError, match="dimensions"):
        init_tensor_(torch.empty(4), "he_normal")
