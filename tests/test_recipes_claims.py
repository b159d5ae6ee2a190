"""The recipes' "must hold" claims, on the embedded data with the CPU presets (slow; CI runs it).

- deep_mlp: every remedy cures the pathology it names (``Variant.cures``): the pathologies (``sigmoid``,
  ``tanh``, ``sigmoid_6``) stay near chance and are flagged vanishing, their remedies reach a validation
  accuracy of at least 0.75.
- lstm on the adding problem: at T = 50 ``rnn`` does no better than the mean (MSE >= 0.1) while ``lstm``,
  ``gru`` and ``lstm_init`` reach MSE < 0.05; at T = 10 ``rnn_exploding`` diverges while every clipper
  that names it in ``cures`` (the autopilot among them) clips, stays finite and ends at least 40% below
  the trivial predictor's MSE.
- resnet: ``residual`` beats ``plain`` by at least 0.1 in accuracy; ``plain_nobn`` (no BatchNorm, default
  init) is flagged vanishing and stays near chance while ``plain_batchnorm``, ``plain_initswap``,
  ``plain_lsuv`` and ``autopilot`` (which re-initialises it) gain at least 0.3; ``nf`` (the
  normalisation-free net at lr 2) diverges and ``nf_agc`` reaches 0.85.
- depth table: at depth 100 the plain sigmoid net's depth ratio is orders of magnitude below the
  residual net's.
- StabilityAutopilot: deep_mlp's ``autopilot`` (the sigmoid baseline plus the autopilot) reaches the
  accuracy of ``initswap``; one corrupted batch is skipped (or rolled back) and the
  run ends within 5% of the clean run's final loss, while without the autopilot it ends at least 1.5x
  worse or diverges (seeds 0, 1 and 2).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tb_events import load_events, scalars

from recipes import runner
from recipes.corrupted import corrupted_demo

pytestmark = pytest.mark.slow

SEED = 1  # the demo uses seed 0; the claims are checked on another seed
# The autopilot's accuracy may fall short of initswap's by at most 0.01, about 4 of the 360 validation
# digits: less than one seed's wobble of either run (initswap alone spans 0.87-0.93 over seeds 0-2), and
# far from the 0.10 the sigmoid baseline reaches without help.
ACC_TOL = 0.01
# A cured run's validation accuracy, far above the pathologies' 0.10. The weakest cure is RMSprop on
# sigmoid_6 (0.864, 0.767 and 0.842 on seeds 0, 1, 2); the others reach 0.85 to 0.97.
CURED = 0.75


def _run(recipe: str, variant: str, tmp_path: Path) -> runner.RunResult:
    return runner.run_variant(recipe, variant, seed=SEED, log_dir=tmp_path, progress=False)


def _scalars(result: runner.RunResult, tag: str) -> list[float]:
    assert result.log_dir is not None
    values = scalars(load_events(result.log_dir), tag)
    assert values, f"{tag} was never logged"
    return [values[k] for k in sorted(values)]


def test_deep_mlp_claims(tmp_path: Path) -> None:
    rec = runner.get_recipe("deep_mlp")
    pathologies = {v.cures for v in rec.variants.values() if v.cures}
    assert pathologies == {"sigmoid", "tanh", "sigmoid_6"}
    for name in sorted(pathologies):
        r = _run("deep_mlp", name, tmp_path)
        assert r.vanishing and r.val_metric is not None and r.val_metric <= 0.3, (name, r.val_metric)
    results = {}
    for name, var in rec.variants.items():
        if var.cures is not None:
            r = results[name] = _run("deep_mlp", name, tmp_path)
            assert not r.diverged and r.val_metric is not None and r.val_metric >= CURED, (name, r.val_metric)
    pilot, initswap = results["autopilot"].val_metric, results["initswap"].val_metric
    assert pilot is not None and initswap is not None
    assert pilot >= initswap - ACC_TOL, (pilot, initswap)
    assert _scalars(results["autopilot"], "autopilot/reinit")[-1] == 1.0  # it re-initialised the net


# Predicting the mean of the adding problem's target scores 1/6; a cured exploding RNN must do at least
# 40% better (NormClip, ZClip and the autopilot end at 0.02-0.06 over seeds 0-2).
ADDING_TRIVIAL = 1 / 6
CURED_MSE = 0.6 * ADDING_TRIVIAL


def test_lstm_claims(tmp_path: Path) -> None:
    rec = runner.get_recipe("lstm")
    rnn = _run("lstm", "rnn", tmp_path)
    assert rnn.val_metric is not None and rnn.val_metric >= 0.1
    for name in ("lstm", "gru", "lstm_init"):
        assert rec.variants[name].cures == "rnn", name
        r = _run("lstm", name, tmp_path)
        assert r.val_metric is not None and r.val_metric < 0.05, (name, r.val_metric)
    exploding = _run("lstm", "rnn_exploding", tmp_path)
    assert exploding.diverged
    clippers = [n for n, v in rec.variants.items() if v.cures == "rnn_exploding"]
    assert {"rnn_normclip", "autopilot"} <= set(clippers)
    for name in clippers:
        r = _run("lstm", name, tmp_path)
        assert not r.diverged and all(math.isfinite(v) for v in r.losses), name
        assert r.val_metric is not None and r.val_metric <= CURED_MSE, (name, r.val_metric)
        assert max(_scalars(r, "clip/clipped")) > 0.0, name  # it did clip


def test_resnet_claims(tmp_path: Path) -> None:
    rec = runner.get_recipe("resnet")
    # the degradation of a deep plain net: identity shortcuts win by a wide margin
    plain = _run("resnet", "plain", tmp_path)
    residual = _run("resnet", "residual", tmp_path)
    assert plain.val_metric is not None and residual.val_metric is not None
    assert residual.val_metric >= 0.9 and residual.val_metric >= plain.val_metric + 0.1
    # vanishing gradients without BatchNorm at PyTorch's default init; three cures and the autopilot
    nobn = _run("resnet", "plain_nobn", tmp_path)
    assert nobn.vanishing and nobn.val_metric is not None and nobn.val_metric <= 0.2
    for name in ("plain_batchnorm", "plain_initswap", "plain_lsuv", "autopilot"):
        assert rec.variants[name].cures == "plain_nobn", name
        r = _run("resnet", name, tmp_path)
        assert not r.diverged and r.val_metric is not None, name
        assert r.val_metric >= nobn.val_metric + 0.3, (name, r.val_metric)
        if name == "autopilot":
            assert _scalars(r, "autopilot/reinit")[-1] == 1.0  # it re-initialised the vanishing net
    # the normalisation-free net at a high learning rate diverges; AGC keeps it training
    nf = _run("resnet", "nf", tmp_path)
    assert nf.diverged
    agc = _run("resnet", "nf_agc", tmp_path)
    assert rec.variants["nf_agc"].cures == "nf"
    assert not agc.diverged and agc.val_metric is not None and agc.val_metric >= 0.85, agc.val_metric


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corrupted_batch_claim(tmp_path: Path, seed: int) -> None:
    res = corrupted_demo(seed=seed, log_dir=None, progress=False, echo=False)
    clean, bad, pilot = res["clean"], res["corrupted"], res["corrupted_autopilot"]
    assert not clean.diverged and clean.final_train_loss is not None
    assert any("[skip]" in e or "[rollback]" in e for e in pilot.events) and not pilot.diverged
    assert pilot.ratio is not None and pilot.ratio <= 1.05, pilot.ratio
    assert bad.rollbacks == 0
    assert bad.diverged or (bad.ratio is not None and bad.ratio >= 1.5), (bad.diverged, bad.ratio)


def test_depth_table_claim() -> None:
    rows = runner.depth_table(depths=[100], activations=["sigmoid"], seed=SEED, progress=False)
    plain, residual = (r for r in rows)
    assert not plain["residual"] and residual["residual"]
    for key in ("depth_ratio_init", "depth_ratio_final"):
        assert residual[key] is not None and residual[key] > 1e-2
        assert plain[key] is not None and plain[key] < 1e-3 * residual[key]
