"""train/segments.py: a run's steps in segments, with the service's hooks. The segments
themselves run in every training test (tests/test_loop.py, tests/test_nonfinite.py for the
rollback between segments); here, what a segment tells the user."""

from __future__ import annotations

from train import segments


def test_input_bound_runs_are_told_so():
    assert segments.input_bound_hint(0.1, dedicated=False) is None
    line = segments.input_bound_hint(0.45, dedicated=False)
    assert line.startswith("the data pipeline held training up 45% of the time")
    # these tests run on 8 CPU devices, where dedicated cores do not apply
    assert "dedicated_cores" not in line
