"""qaclims.bench: the quick benchmark run gives a well-formed table with equal outputs."""
import numpy as np
import pytest

from qaclims.bench import (BENCHMARKS, COLUMNS, format_table, naive_sweep_confusions, run_benchmarks,
                           synthetic_cam_samples)
from qaclims.evaluate import sweep_confusions


def test_quick_run_table():
    table = run_benchmarks(quick=True)
    assert tuple(table.columns) == COLUMNS
    assert set(table["benchmark"]) == set(BENCHMARKS)
    assert table["same_output"].all()
    rates = table["benchmark"] == "synth_generation"  # a rate, with no baseline to compare with
    assert (table["seconds"] > 0).all() and (table.loc[~rates, "speedup"] > 0).all()
    assert table.loc[rates, "speedup"].isna().all() and table.loc[rates, "notes"].str.endswith("images/s").all()
    text = format_table(table)
    assert text.splitlines()[0].startswith("| benchmark | variant |") and len(text.splitlines()) == len(table) + 2


def test_sweep_equals_naive_on_synthetic_cams():
    samples = synthetic_cam_samples(4, 24, 32, seed=11)
    thresholds = np.round(np.arange(5, 61) / 100, 2)
    np.testing.assert_array_equal(sweep_confusions(samples, thresholds), naive_sweep_confusions(samples, thresholds))


def test_unknown_benchmark_is_an_error():
    with pytest.raises(ValueError, match="available"):
        run_benchmarks(["no_such_benchmark"], quick=True)
