"""The recipes' "must hold" claims, on the embedded data with the CPU presets (slow; CI runs it).

- deep_mlp: ``sigmoid`` stays near chance and is flagged vanishing; ``relu_he``, ``batchnorm``,
  ``residual``, ``initswap`` and ``lsuv`` reach a validation accuracy of at least 0.85.
- lstm on the adding problem (T = 50): ``rnn`` does no better than the mean (MSE >= 0.1), ``lstm`` reaches
  MSE < 0.05, ``rnn_exploding`` diverges while ``rnn_autoclip`` and ``rnn_zclip`` finish finite.
- resnet: ``residual`` ends with a lower training loss than ``plain``.
- depth table: at depth 100 the plain sigmoid net's depth ratio is orders of magnitude below the
  residual net's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from recipes import runner

pytestmark = pytest.mark.slow

SEED = 1  # the demo uses seed 0; the claims are checked on another seed


def _run(recipe: str, variant: str, tmp_path: Path) -> runner.RunResult:
    return runner.run_variant(recipe, variant, seed=SEED, log_dir=tmp_path, progress=False)


def test_deep_mlp_claims(tmp_path: Path) -> None:
    sig = _run("deep_mlp", "sigmoid", tmp_path)
    assert sig.val_metric is not None and sig.val_metric <= 0.3
    assert sig.vanishing
    for name in ("relu_he", "batchnorm", "residual", "initswap", "lsuv"):
        r = _run("deep_mlp", name, tmp_path)
        assert not r.diverged, name
        assert r.val_metric is not None and r.val_metric >= 0.85, (name, r.val_metric)


def test_lstm_claims(tmp_path: Path) -> None:
    rnn = _run("lstm", "rnn", tmp_path)
    assert rnn.val_metric is not None and rnn.val_metric >= 0.1
    lstm = _run("lstm", "lstm", tmp_path)
    assert lstm.val_metric is not None and lstm.val_metric < 0.05
    exploding = _run("lstm", "rnn_exploding", tmp_path)
    assert exploding.diverged
    for name in ("rnn_autoclip", "rnn_zclip"):
        r = _run("lstm", name, tmp_path)
        assert not r.diverged, name
        assert r.val_metric is not None and math.isfinite(r.val_metric), name
        assert all(math.isfinite(v) for v in r.losses), name


def test_resnet_claim(tmp_path: Path) -> None:
    plain = _run("resnet", "plain", tmp_path)
    residual = _run("resnet", "residual", tmp_path)
    assert plain.final_train_loss is not None and residual.final_train_loss is not None
    assert residual.final_train_loss < plain.final_train_loss


def test_depth_table_claim() -> None:
    rows = runner.depth_table(depths=[100], activations=["sigmoid"], seed=SEED, progress=False)
    plain, residual = (r for r in rows)
    assert not plain["residual"] and residual["residual"]
    for key in ("depth_ratio_init", "depth_ratio_final"):
        assert residual[key] is not None and residual[key] > 1e-2
        assert plain[key] is not None and plain[key] < 1e-3 * residual[key]
