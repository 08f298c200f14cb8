"""Simulation-based calibration of the default posterior: over 20 simulated datasets whose
truths differ (intercept, slope and two random-effect scales drawn per dataset, Poisson
target, crossed grouping factors of 30 and 10 levels), the service's 90% intervals of the
global sites must hold the truth in at least 80% of the 80 cases.

Measured with ``benchmarks/coverage.py`` (the same datasets and fits): structured guide 88%,
mean-field 69%.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import coverage

DATASETS = 20


@pytest.mark.slow
def test_default_guide_intervals_hold_the_truth_in_80_percent_of_simulations(tmp_path):
    rng = np.random.default_rng(2026)  # the benchmark's seed: the same 20 truths
    missed = []
    for i in range(DATASETS):
        data = tmp_path / f"d{i}.parquet"
        truth = coverage.simulate(data, 3000, rng)
        intervals = coverage.fit(data, tmp_path / f"run{i}", "structured", 2000)
        for site, (lo, hi) in intervals.items():
            if not lo <= truth[site] <= hi:
                missed.append((i, site, round(truth[site], 3), round(lo, 3), round(hi, 3)))
    cases = DATASETS * len(coverage.SITES)
    assert 1 - len(missed) / cases >= 0.8, missed
