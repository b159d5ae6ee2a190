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

from stability_callbacks.activation_graph import ForwardRecorder, module_activation
from stability_callbacks.init import (
    SCHEMES,
    Activation,
    activation_gain,
    following_activations,
    init_swap,
    init_tensor_,
    lsuv_,
)
from stability_callbacks.init_schemes import default_init, matches_default

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


@pytest.mark.slow
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
    kept = init_swap(copy.deepcopy(model))  # 'auto' keeps what the model set itself ...
    assert {r.scheme for r in kept.records} == {"kept"} and not kept.modified
    report = init_swap(model, keep_custom=False)  # ... unless asked to re-initialise every layer
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


# -- models people train: torch, timm and transformers ---------------------------------------------------


def test_activation_classes_of_torch_timm_and_transformers_are_recognised() -> None:
    hf = pytest.importorskip("transformers.activations")
    timm_acts = pytest.importorskip("timm.layers.activations")
    timm_me = pytest.importorskip("timm.layers.activations_me")
    expected = {
        nn.GELU(approximate="tanh"): "gelu",
        nn.SiLU(): "silu",
        nn.Mish(): "mish",
        nn.Hardswish(): "hardswish",
        hf.NewGELUActivation(): "gelu",
        hf.GELUActivation(): "gelu",
        hf.FastGELUActivation(): "gelu",
        hf.QuickGELUActivation(): "gelu",
        hf.SiLUActivation(): "silu",
        hf.MishActivation(): "mish",
        timm_acts.Swish(): "silu",
        timm_acts.GELUTanh(): "gelu",
        timm_acts.QuickGELU(): "gelu",
        timm_acts.Tanh(): "tanh",
        timm_acts.HardSigmoid(): "sigmoid",
        timm_me.HardSwishMe(): "hardswish",
        timm_me.MishMe(): "mish",
    }
    for module, kind in expected.items():
        act = module_activation(module)
        assert act is not None and act.kind == kind, type(module).__name__
    for other in (hf.LinearActivation(), nn.Dropout(), nn.Softmax(dim=-1), nn.Linear(2, 2), nn.LogSigmoid()):
        assert module_activation(other) is None, type(other).__name__


class NewGELUMLP(nn.Module):
    """Linear, transformers' NewGELUActivation (which calls torch.tanh inside), Linear; untraceable."""

    def __init__(self) -> None:
        super().__init__()
        hf = pytest.importorskip("transformers.activations")
        self.up = nn.Linear(64, 256)
        self.act = hf.NewGELUActivation()
        self.down = nn.Linear(256, 64)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace this
            x = self.down(self.act(self.up(x)))
        return x


def test_a_function_called_inside_an_activation_module_is_part_of_it() -> None:
    acts, method = following_activations(NewGELUMLP(), torch.randn(4, 64))
    assert method == "hooks"
    assert kinds(acts) == {"up": "gelu", "down": None}  # not torch.tanh's "tanh"
    recorder = ForwardRecorder()
    model = NewGELUMLP()
    with recorder.start(model):
        model(torch.randn(4, 64)).sum().backward()  # a real step: train mode, gradients on
    assert kinds(recorder.following()) == {"up": "gelu", "down": None}
    assert recorder.activations() == ["act"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.manual_seed(0)
    report = init_swap(model, "he_normal", activations=(recorder.following(), "training step"))
    assert model.up.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert "gelu" in report["up.weight"].reason


def test_functional_activations_inside_torch_layers_are_seen_in_a_training_step() -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    recorder = ForwardRecorder()
    with recorder.start(layer):
        layer(torch.randn(2, 5, 16)).sum().backward()
    acts = recorder.following()
    assert kinds(acts)["linear1"] == "relu"  # F.relu, called by the encoder layer's own forward
    assert acts["linear1"] is not None and "in the model" in acts["linear1"].via
    assert kinds(acts)["linear2"] is None
    assert recorder.activations() == ["relu"]


def gpt2(n_layer: int = 2) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=64, n_head=2, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def gpt2_structure(model: nn.Module) -> tuple[dict[str, Activation | None], str]:
    recorder = ForwardRecorder()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with recorder.start(model):
        model(input_ids=tokens, labels=tokens).loss.backward()
    model.zero_grad()
    return recorder.following(), "training step"


def test_gpt2_keeps_its_own_scheme_lists_the_tied_embedding_once_and_reads_new_gelu_as_gelu() -> None:
    model = gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    structure = gpt2_structure(model)
    assert structure[0]["transformer.h.0.mlp.c_fc"] is not None
    assert structure[0]["transformer.h.0.mlp.c_fc"].kind == "gelu"  # NewGELUActivation, not torch.tanh
    report = init_swap(model, activations=structure)
    assert not report.modified and not report.changed  # a well-initialised model is left as it is
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    names = [r.param for r in report.records]
    assert "lm_head.weight" not in names and names.count("transformer.wte.weight") == 1
    assert "tied: also lm_head.weight" in report["transformer.wte.weight"].reason
    # GPT-2 scales its residual projections by 1/sqrt(2 n_layer): 0.02 / 2 = 0.01, and keeps them
    assert report["transformer.h.0.attn.c_proj.weight"].new_std == pytest.approx(0.01, rel=0.05)
    assert report["transformer.h.0.attn.c_proj.weight"].scheme == "kept"
    # asked to re-initialise everything: He for the GELU layer, on the (in, out) layout of Conv1D
    report = init_swap(model, activations=structure, keep_custom=False)
    assert report["transformer.h.0.mlp.c_fc.weight"].scheme == "he_normal"
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (64, 256)  # fan_in 64, not 256
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_fresh_torch_layers_hold_pytorchs_default_and_custom_ones_do_not() -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = [
        nn.Linear(300, 200),
        nn.Linear(3, 2),
        nn.Conv2d(16, 32, 3),
        nn.ConvTranspose2d(16, 8, 4),
        nn.Conv1d(4, 4, 1),
        nn.Bilinear(5, 6, 7),
        nn.LSTM(16, 32, num_layers=2),
        nn.GRU(8, 8),
        nn.MultiheadAttention(32, 4),
        nn.LayerNorm(10),
        nn.BatchNorm2d(3),
        nn.Embedding(100, 16),
    ]
    for layer in layers:
        for name, p in layer.named_parameters(recurse=False):
            spec = default_init(layer, name, p)
            t = p.detach().float()
            std, low, high = t.std(correction=0).item(), t.min().item(), t.max().item()
            assert spec is not None and matches_default(spec, p.numel(), std, low, high), (layer, name)
    custom = nn.Linear(300, 200)
    nn.init.normal_(custom.weight, std=0.02)  # GPT-2 / timm style
    t = custom.weight.detach()
    spec = default_init(custom, "weight", custom.weight)
    assert spec is not None
    assert not matches_default(spec, t.numel(), t.std().item(), t.min().item(), t.max().item())
    nn.init.kaiming_normal_(custom.weight, mode="fan_out", nonlinearity="relu")  # torchvision's conv init
    assert not matches_default(spec, t.numel(), t.std().item(), t.min().item(), t.max().item())


def test_torchvision_resnet_keeps_its_he_fan_out_convolutions_and_only_its_default_head_changes() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = init_swap(model)
    assert report.traced_by == "fx"
    changed = {r.param for r in report.changed}
    assert changed == {"fc.weight", "fc.bias"}  # the only layer left at PyTorch's default
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in changed)
    assert "the model's own initialisation" in report["conv1.weight"].reason
    assert report["fc.weight"].scheme == "xavier_uniform"  # nothing follows the classifier


class CachesOnSelf(nn.Module):
    """Caches a tensor on ``self`` before a data-dependent branch: a symbolic trace stores a proxy, then
    fails."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is None:
            self.scale = x.new_ones(4) * 2.0  # a proxy under symbolic tracing
        y = self.lin(x) * self.scale
        return y if y.sum() > -1e9 else -y


def test_tracing_leaves_no_proxy_behind_in_a_model_that_caches_on_self() -> None:
    unprotected = CachesOnSelf()
    with pytest.raises(Exception):  # noqa: B017  any error of symbolic tracing
        torch.fx.Tracer().trace(unprotected)
    assert isinstance(unprotected.scale, torch.fx.Proxy)  # what a bare trace leaves behind
    model = CachesOnSelf()
    _, method = following_activations(model)
    assert method == "registration"
    assert model.scale is None  # the failed trace cached nothing
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_vit_class_token_and_position_table_are_not_layer_weights() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=4)
    cls_token = model.cls_token.detach().clone()
    kept = init_swap(model)  # 'auto': timm's ViT initialises itself, so all of it is kept
    assert (
        not kept.modified
        and "VisionTransformer initialises itself (_init_weights)" in kept["cls_token"].reason
    )
    report = init_swap(model, "xavier_uniform")  # an explicit scheme: every layer weight changes ...
    assert report["blocks.0.mlp.fc1.weight"].scheme == "xavier_uniform"
    assert report["cls_token"].scheme == "kept" and "not a layer weight" in report["cls_token"].reason
    assert torch.equal(model.cls_token, cls_token)  # ... but not the class token
