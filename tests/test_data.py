import math

import numpy as np
import pytest
import torch

import amortize as am
from amortize import DataError


def frame():
    return {
        "district": ["a", "a", "a", "b", "b", "b"],
        "school": [1, 1, 2, 3, 3, 4],
        "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "u": [0.1, 0.1, 0.2, 0.3, 0.3, 0.4],
        "x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    }


def test_from_frame_levels_indices_covariates():
    d = am.HierarchicalData.from_frame(
        frame(), levels=["district", "school"], response="y", covariates={"school": ["u"], "obs": ["x"]}
    )
    assert d.sizes == {"district": 2, "school": 4}
    assert d.index("school").tolist() == [0, 0, 1, 2, 2, 3]
    assert d.index("district").tolist() == [0, 0, 0, 1, 1, 1]
    assert d.parent_index("school").tolist() == [0, 0, 1, 1]
    assert d.counts("district", at="school").tolist() == [2, 2]
    assert torch.allclose(d.x["u"], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert d.labels["district"] == ["a", "b"]
    assert d.y.shape == (6,)


def test_from_frame_pandas_and_nested_ids():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"district": ["a", "a", "b", "b"], "school": [1, 2, 1, 2], "y": [0.0, 1.0, 2.0, 3.0]})
    with pytest.raises(DataError, match="column 'school'.*2 different 'district'"):
        am.HierarchicalData.from_frame(df, levels=["district", "school"], response="y")
    d = am.HierarchicalData.from_frame(df, levels=["district", "school"], response="y", nested_ids=True)
    assert d.size("school") == 4
    assert d.labels["school"] == ["a/1", "a/2", "b/1", "b/2"]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"y": [1.0, float("nan"), 3.0, 4.0, 5.0, 6.0]}, "column 'y'.*NaN"),
        ({"y": [1.0, math.inf, 3.0, 4.0, 5.0, 6.0]}, "column 'y'.*infinite"),
        ({"y": [1.0, "high", 3.0, 4.0, 5.0, 6.0]}, "column 'y': non-numeric value 'high'"),
        ({"u": [0.1, 0.2, 0.2, 0.3, 0.3, 0.4]}, "column 'u'.*constant within each 'school'"),
        ({"school": [1, 1, None, 3, 3, 4]}, "column 'school': missing id in row 2"),
        ({"y": [1.0, 2.0]}, "different lengths"),
    ],
)
def test_from_frame_errors_name_the_column(change, match):
    f = {**frame(), **change}
    with pytest.raises(DataError, match=match):
        am.HierarchicalData.from_frame(f, levels=["district", "school"], response="y", covariates={"school": ["u"]})


def test_unknown_column_and_level():
    with pytest.raises(DataError, match="column 'yy' is not in the data"):
        am.HierarchicalData.from_frame(frame(), levels=["school"], response="yy")
    with pytest.raises(DataError, match="unknown level 'county'"):
        am.HierarchicalData.from_frame(frame(), levels=["school"], response="y", covariates={"county": ["u"]})


def test_from_arrays_dense_ids_and_empty_groups():
    with pytest.raises(DataError, match="level 'school': group 1 has no observations"):
        am.HierarchicalData(["school"], {}, [0, 0, 2], y=[1.0, 2.0, 3.0])
    with pytest.raises(DataError, match="level 'school': index 5 points to no group"):
        am.HierarchicalData(
            ["district", "school"], {"school": [0, 5]}, [0, 1], y=[1.0, 2.0], labels={"district": ["a"]}
        )
    with pytest.raises(DataError, match="negative index"):
        am.HierarchicalData(["school"], {}, [0, -1], y=[1.0, 2.0])
    with pytest.raises(DataError, match="expected shape"):
        am.HierarchicalData(["school"], {}, [0, 1], y=[1.0, 2.0, 3.0])
    with pytest.raises(DataError, match="reserved"):
        am.HierarchicalData(["obs"], {}, [0, 1])


def test_csv_roundtrip_and_malformed(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("school,y,x\nA,1.5,0\nA,2.5,1\nB,0.5,1\n")
    d = am.HierarchicalData.from_csv(str(p), levels=["school"], response="y", covariates={"obs": ["x"]})
    assert d.size("school") == 2 and d.labels["school"] == ["A", "B"]
    bad = tmp_path / "bad.csv"
    bad.write_text("school,y\nA,1.0\nB,2.0,3.0\n")
    with pytest.raises(DataError, match="line 3 has 3 fields"):
        am.HierarchicalData.from_csv(str(bad), levels=["school"], response="y")
    with pytest.raises(DataError, match="no such data file"):
        am.HierarchicalData.from_csv(str(tmp_path / "missing.csv"), levels=["school"], response="y")


def test_batch_and_with_response_share_structure():
    d = am.HierarchicalData(["g"], {}, np.array([0, 0, 1]), y=[1.0, 2.0, 3.0])
    b = d.with_response(torch.zeros(4, 3))
    assert b.batch_size == 4 and d.batch_size is None
    assert b.index("g") is d.index("g")
