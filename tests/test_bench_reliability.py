"""`make bench BENCH=reliability` counts the bad-input corpus from pytest's JUnit report."""

from __future__ import annotations

from affordvla.bench.reliability import count_cases

# laid out as pytest's --junitxml writes it: one <testcase> per case, a child element for anything but a pass
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="3.1"
 timestamp="2026-12-03T17:00:00" hostname="ci">
<testcase classname="tests.bad_inputs.test_data_inputs" name="test_missing_root" time="1.0" />
<testcase classname="tests.bad_inputs.test_data_inputs" name="test_truncated_png" time="1.0" />
<testcase classname="tests.bad_inputs.test_model_inputs" name="test_partial_ckpt" time="0.5">
<failure message="AssertionError: Traceback printed">assert ...</failure></testcase>
<testcase classname="tests.bad_inputs.test_model_inputs" name="test_other_family" time="0.5">
<error message="failed on setup">fixture error</error></testcase>
<testcase classname="tests.bad_inputs.test_eval_inputs" name="test_no_store" time="0.1">
<skipped type="pytest.skip" message="needs a GPU">skipped</skipped></testcase>
</testsuite></testsuites>
"""


def test_cases_are_counted_tried_and_clear(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT)
    assert count_cases(report) == (5, 2)
