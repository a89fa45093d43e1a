"""Faults in the data: each raises a DataError whose message names the column."""

from __future__ import annotations

import numpy as np
import pytest

import amortize as am
from amortize.errors import DataError


def test_datetime_response_is_refused_not_converted():
    when = np.array(["2020-01-01", "2020-01-02", "2020-01-03"], dtype="datetime64[ns]")
    frame = {"g": [0, 0, 1], "when": when}
    with pytest.raises(DataError, match=r"column 'when': dates or times \(dtype datetime64\[ns\]\)"):
        am.HierarchicalData.from_frame(frame, levels=["g"], response="when")
    with pytest.raises(DataError, match=r"column 'when': dates or times"):
        am.HierarchicalData.from_frame(frame, levels=["g"], response=None, covariates={"obs": ["when"]})


def test_datetime_response_from_pandas_is_refused():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"g": [0, 0, 1], "y": pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03"])})
    with pytest.raises(DataError, match=r"column 'y': dates or times"):
        am.HierarchicalData.from_frame(frame, levels=["g"], response="y")


@pytest.mark.parametrize("other", [True, 1.0])
def test_ids_equal_in_python_but_of_other_types_are_not_merged(other):
    frame = {"school": [1, 2, other, 2], "y": [0.1, 0.2, 0.3, 0.4]}
    with pytest.raises(DataError, match=rf"column 'school': ids 1 \(int, row 0\) and {other!r} .*row 2.*one group"):
        am.HierarchicalData.from_frame(frame, levels=["school"], response="y")
    ok = am.HierarchicalData.from_frame({"school": [1, 2, 3.5, 2], "y": [0.1, 0.2, 0.3, 0.4]}, ["school"], "y")
    assert ok.size("school") == 3  # mixed types that do not collide are distinct labels


def test_ids_of_a_csv_written_as_1_and_1_0_are_not_merged(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("school,y\n1,0.5\n1.0,0.7\n2,0.1\n")
    with pytest.raises(DataError, match=r"d\.csv: column 'school': ids 1 \(int, row 0\) and 1\.0 \(float, row 1\)"):
        am.HierarchicalData.from_csv(str(path), ["school"], "y")
