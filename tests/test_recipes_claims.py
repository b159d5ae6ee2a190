"""The recipes' "must hold" claims, on the embedded data with the CPU presets (slow; CI runs it).

- deep_mlp: ``sigmoid`` stays near chance and is flagged vanishing; ``relu_he``, ``batchnorm``,
  ``residual``, ``initswap`` and ``lsuv`` reach a validation accuracy of at least 0.85.
- lstm on the adding problem (T = 50): ``rnn`` does no better than the mean (MSE >= 0.1), ``lstm`` reaches
  MSE < 0.05, ``rnn_exploding`` diverges while ``rnn_autoclip`` and ``rnn_zclip`` finish finite.
- resnet: ``residual`` ends with a lower training loss than ``plain``.
- depth table: at depth 100 the plain sigmoid net's depth ratio is orders of magnitude below the
  residual net's.
- StabilityAutopilot: deep_mlp's ``autopilot`` (the sigmoid baseline plus the autopilot) reaches the
  accuracy of ``initswap``; lstm's ``autopilot`` (``rnn_exploding`` plus the autopilot) finishes finite
  with a validation MSE no worse than ``rnn_zclip``; resnet's ``autopilot`` (``plain`` plus the
  autopilot) takes no action and still trails ``residual``; one corrupted batch is rolled back and the
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


def _run(recipe: str, variant: str, tmp_path: Path) -> runner.RunResult:
    return runner.run_variant(recipe, variant, seed=SEED, log_dir=tmp_path, progress=False)


def _scalars(result: runner.RunResult, tag: str) -> list[float]:
    assert result.log_dir is not None
    values = scalars(load_events(result.log_dir), tag)
    assert values, f"{tag} was never logged"
    return [values[k] for k in sorted(values)]


def test_deep_mlp_claims(tmp_path: Path) -> None:
    sig = _run("deep_mlp", "sigmoid", tmp_path)
    assert sig.val_metric is not None and sig.val_metric <= 0.3
    assert sig.vanishing
    results = {}
    for name in ("relu_he", "batchnorm", "residual", "initswap", "lsuv"):
        r = results[name] = _run("deep_mlp", name, tmp_path)
        assert not r.diverged, name
        assert r.val_metric is not None and r.val_metric >= 0.85, (name, r.val_metric)
    pilot = _run("deep_mlp", "autopilot", tmp_path)
    initswap = results["initswap"].val_metric
    assert not pilot.diverged and pilot.val_metric is not None and initswap is not None
    assert pilot.val_metric >= initswap - ACC_TOL, (pilot.val_metric, initswap)
    assert _scalars(pilot, "autopilot/reinit")[-1] == 1.0  # it re-initialised the vanishing net


def test_lstm_claims(tmp_path: Path) -> None:
    rnn = _run("lstm", "rnn", tmp_path)
    assert rnn.val_metric is not None and rnn.val_metric >= 0.1
    lstm = _run("lstm", "lstm", tmp_path)
    assert lstm.val_metric is not None and lstm.val_metric < 0.05
    exploding = _run("lstm", "rnn_exploding", tmp_path)
    assert exploding.diverged
    results = {}
    for name in ("rnn_autoclip", "rnn_zclip", "autopilot"):
        r = results[name] = _run("lstm", name, tmp_path)
        assert not r.diverged, name
        assert r.val_metric is not None and math.isfinite(r.val_metric), name
        assert all(math.isfinite(v) for v in r.losses), name
    pilot, zclip = results["autopilot"].val_metric, results["rnn_zclip"].val_metric
    assert pilot is not None and zclip is not None and pilot <= zclip, (pilot, zclip)


def test_resnet_claim(tmp_path: Path) -> None:
    plain = _run("resnet", "plain", tmp_path)
    residual = _run("resnet", "residual", tmp_path)
    assert plain.final_train_loss is not None and residual.final_train_loss is not None
    assert residual.final_train_loss < plain.final_train_loss
    # the autopilot finds nothing to act on in the plain net, so the shortcuts still win
    pilot = _run("resnet", "autopilot", tmp_path)
    assert pilot.final_train_loss is not None and residual.final_train_loss < pilot.final_train_loss
    for key in ("autopilot/rollback", "autopilot/reinit", "autopilot/skipped"):
        assert set(_scalars(pilot, key)) == {0.0}, key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corrupted_batch_claim(tmp_path: Path, seed: int) -> None:
    res = corrupted_demo(seed=seed, log_dir=None, progress=False, echo=False)
    clean, bad, pilot = res["clean"], res["corrupted"], res["corrupted_autopilot"]
    assert not clean.diverged and clean.final_train_loss is not None
    assert pilot.rollbacks >= 1 and not pilot.diverged
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
