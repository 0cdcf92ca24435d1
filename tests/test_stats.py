"""The paired statistics of `tla report --by-arm` (tla_jobs/jobs/stats.py, written by hand so that the
CLI does not need scipy), checked against scipy."""

from __future__ import annotations

import random

import pytest
from scipy import stats as S

from tla_jobs.jobs import stats


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 200])
def test_t_quantile_and_tail_match_scipy(df):
    assert stats.t_quantile(0.975, df) == pytest.approx(S.t.ppf(0.975, df), rel=1e-9)
    for t in (0.0, 0.3, 1.7, 2.5, 8.0):
        assert stats.t_two_sided_p(t, df) == pytest.approx(2 * S.t.sf(t, df), rel=1e-8, abs=1e-14)


def test_paired_matches_scipy_ttest_and_an_exact_permutation_test():
    rng = random.Random(0)
    for n in (2, 3, 5, 8):
        diffs = [rng.gauss(0.5, 1.0) for _ in range(n)]
        res = stats.paired(diffs)
        ref = S.ttest_1samp(diffs, 0.0)
        ci = ref.confidence_interval(0.95)
        assert res["n"] == n and res["mean"] == pytest.approx(sum(diffs) / n)
        assert res["t"] == pytest.approx(ref.statistic) and res["p_t"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert (res["ci95_low"], res["ci95_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        # the sign-flip test enumerates all 2^n patterns: scipy's exact permutation test does the same
        perm = S.permutation_test((diffs,), lambda x: x.mean(), permutation_type="samples", n_resamples=10_000)
        assert res["p_sign_flip"] == pytest.approx(perm.pvalue)


def test_sign_flip_bounds_and_degenerate_cases():
    assert stats.sign_flip_p([1.0] * 5) == pytest.approx(2 / 32)  # the smallest p with 5 pairs
    assert stats.sign_flip_p([1.0, -1.0]) == 1.0
    one = stats.paired([0.7])
    assert one["mean"] == 0.7 and one["ci95_low"] is None and one["p_t"] is None
    same = stats.paired([0.4, 0.4, 0.4])  # no spread: the interval is the point, the t-test certain
    assert same["ci95_low"] == same["ci95_high"] == pytest.approx(0.4) and same["p_t"] == 0.0
    zero = stats.paired([0.0, 0.0])
    assert zero["p_t"] == 1.0 and zero["p_sign_flip"] == 1.0
