"""GradientMonitor on the labelled suite of ``diagnosis_runs.py``: every run diagnosed as its truths.

Fourteen short CPU runs (healthy, vanishing, exploding, diverging; their truths computed from the run's
own loss curve and float64 gradient norms, not by the library), each watched on the same gradients by
the default monitor logging every step and every 50 steps, and by one whose rules see every 10th step.
Checked for the default: no false alarm and no miss, no flag before its truth's onset, the first flag of
a run is its earliest truth, and the same flags at the same steps whatever the logging cadence; for the
sampled rules: no false alarm, no flag before its truth.
``python benchmarks/diagnosis_suite.py`` prints the same runs as precision and recall per category.
"""

from __future__ import annotations

import statistics

import pytest
from diagnosis_runs import CASES, MONITORS, PATHOLOGIES, Result, run_case, scores

DEFAULT = ("log every step", "log every 50")  # GradientMonitor's default rules, two logging cadences


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("suite")
    return {case.name: run_case(case, str(root)) for case in CASES}


def test_the_suite_covers_every_category() -> None:
    counts = {c: sum(case.category == c for case in CASES) for c in ("healthy", *PATHOLOGIES)}
    assert len(CASES) >= 12 and min(counts.values()) >= 2, counts


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_each_run_is_flagged_with_its_truths_and_nothing_else(results: dict[str, Result], name: str) -> None:
    r = results[name]
    if r.case.category == "healthy":  # the run is what it was designed to be
        assert r.truths == {} and r.learned, (r.truths, r.learned)
    else:
        assert r.case.category in r.truths, r.truths
    for monitor in MONITORS:
        flagged = r.first_flagged[monitor]
        assert set(flagged) <= set(r.truths), (monitor, flagged, r.truths)  # no false alarm
        assert all(flagged[k] >= r.truths[k] for k in flagged), (monitor, flagged, r.truths)
        if monitor not in DEFAULT:
            continue
        assert set(flagged) == set(r.truths), (monitor, flagged, r.truths)  # no miss
        if flagged:  # the first flag (or one of those raised at the same step) is the earliest truth
            first = min(flagged.values())
            earliest = min(r.truths.values())
            assert any(r.truths[k] == earliest for k, v in flagged.items() if v == first), (monitor, flagged)


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_the_cadence_does_not_change_the_flags(results: dict[str, Result], name: str) -> None:
    r = results[name]
    every, sparse = r.flags["log every step"], r.flags["log every 50"]
    assert sorted(sparse) == list(range(49, r.case.steps, 50))
    assert len(every) == r.case.steps
    for step, flags in sparse.items():
        assert flags == every[step], step
    assert r.first_flagged["log every step"] == r.first_flagged["log every 50"]


def test_precision_and_recall_are_one_per_category(results: dict[str, Result]) -> None:
    for monitor in MONITORS:
        for s in scores(list(results.values()), monitor):
            assert s.precision == 1.0, (monitor, s)
            assert s.recall == 1.0 or monitor not in DEFAULT, (monitor, s)


def test_what_fooled_the_former_rules_is_in_the_suite(results: dict[str, Result]) -> None:
    # a ReLU MLP converging to near-zero loss
    assert statistics.fmean(results["relu_mlp_to_zero_loss"].losses[-10:]) < 0.01
    # an autoencoder with reduction="sum": gradient norms above the former absolute bound of 1e4
    assert statistics.median(results["autoencoder_sum_reduction"].norms[:50]) > 1e4
    # an LSTM breaking off its plateau: the norm jumps over 10x its running median while the loss falls
    lstm = results["lstm_plateau_break_off"]
    norms, losses = lstm.norms, lstm.losses
    jumps = [t for t in range(50, len(norms)) if norms[t] > 10 * statistics.median(norms[t - 50 : t])]
    assert jumps
    assert statistics.fmean(losses[-20:]) < 0.1 * statistics.fmean(losses[20:60])
    # Adam diverging without a gradient explosion: only the loss shows it
    assert set(results["transformer_adam_lr_jump"].truths) == {"diverging"}
    # nn.MultiheadAttention.out_proj never runs as a module, so the depth ratio ends at the head
    assert results["transformer_adam"].ends == ("net.embed", "net.head")
