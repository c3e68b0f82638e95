"""Statistics of an evaluation (motionnft_core/eval_stats.py): win/tie/loss, bootstrap intervals, failed
rows."""

import math

import numpy as np
import pytest

from motionnft_core.config import EvalConfig
from motionnft_core.eval_stats import ALL, bootstrap_interval, estimate, outcomes, summarize

CFG = EvalConfig(bootstrap_samples=2000)


def _row(mas, base_mas, overall=None, base_overall=None, *, failed=False, category=None) -> dict:
    rubric = {"fidelity": overall, "preservation": overall, "coherence": overall, "overall": overall}
    base = {f"baseline_{k}": base_overall for k in rubric}
    return {"mas": mas, "baseline_mas": base_mas, **rubric, **base, "failed": failed, "category": category}


def test_outcomes_win_tie_loss_and_margin():
    assert outcomes([3.0, 2.0, 1.0], [2.0, 2.0, 2.0], margin=0.0).tolist() == [1.0, 0.5, 0.0]
    assert outcomes([2.4, 2.6, 1.6], [2.0, 2.0, 2.0], margin=0.5).tolist() == [0.5, 1.0, 0.5]
    with pytest.raises(ValueError, match="non-finite"):
        outcomes([math.nan], [1.0], margin=0.0)
    with pytest.raises(ValueError, match="shapes"):
        outcomes([1.0, 2.0], [1.0], margin=0.0)


def test_a_checkpoint_against_itself_wins_exactly_half():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 5, size=50).tolist()
    mas = rng.uniform(0, 100, size=50).tolist()
    rows = [_row(m, m, s, s, category=c) for m, s, c in zip(mas, scores, ["A", "B"] * 25, strict=True)]
    for group in summarize(rows, CFG).values():
        for name in ("win_overall", "win_mas"):
            e = group.metrics[name]
            assert (e.mean, e.low, e.high) == (0.5, 0.5, 0.5)
        assert group.metrics["mas"] == group.metrics["baseline_mas"]


def test_bootstrap_hand_computed_and_deterministic():
    # Two values 0 and 1: a resampled mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 % and
    # 97.5 % quantiles are 0 and 1.
    assert bootstrap_interval([0.0, 1.0], samples=4000, confidence=0.95, seed=0) == (0.0, 1.0)
    # An 80 % interval of the same: the 10 % and 90 % quantiles fall inside the 1/4 masses, 0 and 1 again; a 40 %
    # one (30 % / 70 %) inside the middle mass 0.5.
    assert bootstrap_interval([0.0, 1.0], samples=4000, confidence=0.4, seed=0) == (0.5, 0.5)
    assert bootstrap_interval([2.0] * 7, samples=10, confidence=0.95, seed=3) == (2.0, 2.0)
    x = np.random.default_rng(1).normal(size=40)
    first = bootstrap_interval(x, samples=2500, confidence=0.95, seed=7)  # crosses the 1000-resample blocks
    assert first == bootstrap_interval(x, samples=2500, confidence=0.95, seed=7)
    assert first != bootstrap_interval(x, samples=2500, confidence=0.95, seed=8)
    assert first[0] < x.mean() < first[1]
    # The normal approximation of the mean's interval, mean +- 1.96 * sd / sqrt(n), within 20 %.
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert (first[1] - first[0]) / 2 == pytest.approx(half, rel=0.2)


def test_empty_estimate_is_nan_not_zero():
    e = estimate([], CFG)
    assert e.n == 0 and all(math.isnan(v) for v in (e.mean, e.low, e.high))


def test_failed_rows_are_left_out_of_rubric_means_and_counted():
    rows = [
        _row(60.0, 50.0, 4.0, 3.0, category="Pose/Posture"),  # wins both
        _row(40.0, 50.0, 2.0, 3.0, category="Pose/Posture"),  # loses both
        _row(70.0, 50.0, None, None, failed=True, category="Locomotion/Distance"),  # judge failed: MAS only
        _row(50.0, 50.0, 3.0, 3.0, category="Locomotion/Distance"),  # ties both
    ]
    groups = summarize(rows, CFG)
    assert list(groups) == [ALL, "Locomotion/Distance", "Pose/Posture"]
    everything = groups[ALL]
    assert (everything.rows, everything.failed) == (4, 1)
    m = everything.metrics
    assert m["overall"].n == 3 and m["overall"].mean == pytest.approx(3.0)  # (4 + 2 + 3) / 3, not / 4
    assert m["baseline_overall"].mean == pytest.approx(3.0)
    assert m["win_overall"].n == 3 and m["win_overall"].mean == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["mas"].n == 4 and m["mas"].mean == pytest.approx(55.0)  # MAS does not need the judge
    assert m["win_mas"].mean == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    loco = groups["Locomotion/Distance"]
    assert (loco.rows, loco.failed, loco.metrics["win_overall"].n) == (2, 1, 1)
    only_failed = summarize([rows[2]], CFG)[ALL].metrics
    assert only_failed["win_overall"].n == 0 and math.isnan(only_failed["overall"].mean)


def test_rows_without_categories_give_one_group():
    rows = [_row(1.0, 0.0, 1.0, 0.0), _row(0.0, 1.0, 0.0, 1.0)]
    assert list(summarize(rows, CFG)) == [ALL]
