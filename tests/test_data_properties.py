"""Malformed input never gives a silent answer or a raw traceback: named malformed inputs for data,
config and posterior calls, then hypothesis properties over generated frames, index arrays, CSV
bytes and config documents (each input either builds a consistent object or raises the library's
own error)."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amortize as am
from amortize.config import load_config
from amortize.errors import ConfigError, DataError
from amortize.experiment import build_sampler

from .conftest import normal_known

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
LEVELS = ["district", "school"]


def frame(**change):
    base = {
        "district": ["a", "a", "a", "b", "b", "b"],
        "school": [1, 1, 2, 3, 3, 4],
        "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "u": [0.1, 0.1, 0.2, 0.3, 0.3, 0.4],
        "x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    }
    return {**base, **change}


def build(f=None, levels=LEVELS, response="y", covariates=None):
    covariates = {"school": ["u"], "obs": ["x"]} if covariates is None else covariates
    return lambda tmp: am.HierarchicalData.from_frame(
        frame() if f is None else f, levels=levels, response=response, covariates=covariates
    )


def csv(text: str | bytes, **kwargs):
    def make(tmp: Path):
        p = tmp / "d.csv"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return am.HierarchicalData.from_csv(str(p), levels=["school"], response="y", **kwargs)

    return make


def direct(*args, **kwargs):
    return lambda tmp: am.HierarchicalData(*args, **kwargs)


def config(text: str | bytes, overrides=(), sampler=False):
    def make(tmp: Path):
        p = tmp / "c.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        cfg = load_config(p, list(overrides))
        return build_sampler(cfg) if sampler else cfg

    return make


def pd_frame(**columns):
    return lambda tmp: am.HierarchicalData.from_frame(pd.DataFrame(columns), levels=["school"], response="y")


NAN, INF = float("nan"), float("inf")

# (id, builder, error type, words the message must contain)
MALFORMED = [
    # ---- values: NaN / inf / strings in numeric columns / huge
    ("nan-response", build(frame(y=[1.0, NAN, 3, 4, 5, 6])), DataError, ["column 'y'", "NaN"]),
    ("inf-response", build(frame(y=[1.0, INF, 3, 4, 5, 6])), DataError, ["column 'y'", "infinite"]),
    ("neg-inf-covariate", build(frame(x=[1.0, 2, -INF, 4, 5, 6])), DataError, ["column 'x'", "infinite"]),
    ("nan-level-covariate", build(frame(u=[NAN] * 6)), DataError, ["column 'u'", "NaN"]),
    ("string-in-response", build(frame(y=[1.0, "high", 3, 4, 5, 6])), DataError, ["column 'y'", "'high'"]),
    ("string-in-covariate", build(frame(x=[1.0, 2, 3, "n/a", 5, 6])), DataError, ["column 'x'", "'n/a'"]),
    ("none-in-response", build(frame(y=[1.0, None, 3, 4, 5, 6])), DataError, ["column 'y'", "NaN"]),
    ("complex-response", build(frame(y=np.array([1, 2, 3, 4, 5, 6j]))), DataError, ["column 'y'", "complex"]),
    ("huge-response", build(frame(y=[1.0, 2, 3, 4, 5, 1e30])), DataError, ["'y'", "too large", "float32"]),
    ("huge-covariate-f64", build(frame(x=[1e300] * 6)), DataError, ["column 'x'", "too large"]),
    ("list-in-response", build(frame(y=[[1.0, 2.0]] * 6)), DataError, ["column 'y'", "one number per row"]),
    # ---- ids: missing, unhashable, broken nesting
    ("none-id", build(frame(school=[1, 1, None, 3, 3, 4])), DataError, ["column 'school'", "missing id in row 2"]),
    ("nan-id", build(frame(district=["a", NAN, "a", "b", "b", "b"])), DataError, ["'district'", "row 1"]),
    ("blank-id", build(frame(district=["a", "a", " ", "b", "b", "b"])), DataError, ["'district'", "row 2"]),
    ("numpy-nan-id", build(frame(school=np.array([1, 1, 2, 3, 3, np.nan], dtype=np.float32))), DataError, ["row 5"]),
    ("pandas-na-id", pd_frame(school=pd.array([1, pd.NA], dtype="Int64"), y=[1.0, 2.0]), DataError, ["row 1"]),
    ("unhashable-id", build(frame(school=[1, 1, [2], 3, 3, 4])), DataError, ["'school'", "list in row 2"]),
    ("broken-nesting", build(frame(school=[1, 1, 2, 2, 3, 4])), DataError, ["'school'", "2 different 'district'"]),
    ("not-constant-in-group", build(frame(u=[0.1, 0.2, 0.2, 0.3, 0.3, 0.4])), DataError, ["'u'", "constant"]),
    # ---- columns, levels: missing, duplicated, wrong kind
    ("missing-level-column", build(levels=["county", "school"]), DataError, ["column 'county' is not in the data"]),
    ("missing-response-column", build(response="yy"), DataError, ["column 'yy' is not in the data"]),
    ("missing-covariate-column", build(covariates={"obs": ["z"]}), DataError, ["column 'z' is not in the data"]),
    ("covariate-unknown-level", build(covariates={"county": ["u"]}), DataError, ["unknown level 'county'"]),
    ("no-levels", build(levels=[]), DataError, ["at least one grouping level"]),
    ("levels-as-string", build(levels="school"), DataError, ["levels", "list of names", "'school'"]),
    ("level-name-not-string", build(levels=[0]), DataError, ["names must be strings", "int"]),
    ("level-reserved-obs", build(frame(obs=[1] * 6), levels=["obs"], covariates={}), DataError, ["'obs' is reserved"]),
    ("covariates-as-string", build(covariates={"obs": "x"}), DataError, ["covariates of level 'obs'", "'x'"]),
    ("covariates-not-mapping", build(covariates=["x"]), DataError, ["covariates", "level"]),
    ("column-used-twice", build(response="school", covariates={}), DataError, ["['school'] used twice"]),
    ("duplicate-level", build(levels=["school", "school"], covariates={}), DataError, ["used twice"]),
    (
        "duplicate-pandas-columns",
        lambda tmp: am.HierarchicalData.from_frame(
            pd.DataFrame([[1, 1.0, 2.0], [2, 3.0, 4.0]], columns=["school", "y", "y"]), levels=["school"], response="y"
        ),
        DataError,
        ["['y'] appear more than once"],
    ),
    (
        "names-collide-as-strings",
        lambda tmp: am.HierarchicalData.from_frame(
            {1: [1, 2], "1": [1, 2], "school": [1, 2], "y": [1.0, 2.0]}, levels=["school"], response="y"
        ),
        DataError,
        ["collide"],
    ),
    ("different-lengths", build(frame(y=[1.0, 2.0])), DataError, ["different lengths"]),
    ("scalar-column", build(frame(x=3.0)), DataError, ["column 'x'", "one value per row", "float"]),
    ("string-column", build(frame(x="123456")), DataError, ["column 'x'", "one value per row", "str"]),
    ("2d-array-column", build(frame(x=np.zeros((6, 2)))), DataError, ["column 'x'", "shape (6, 2)"]),
    (
        "not-a-table",
        lambda tmp: am.HierarchicalData.from_frame([{"school": 1, "y": 1.0}], ["school"]),
        DataError,
        ["DataFrame or a dict of columns", "list"],
    ),
    # ---- empty frames
    ("empty-dict-frame", build({k: [] for k in frame()}), DataError, ["no rows"]),
    (
        "empty-pandas-frame",
        lambda tmp: am.HierarchicalData.from_frame(pd.DataFrame({"school": [], "y": []}), ["school"], response="y"),
        DataError,
        ["no rows"],
    ),
    ("no-columns", lambda tmp: am.HierarchicalData.from_frame({}, ["school"]), DataError, ["'school' is not in"]),
    # ---- CSV files
    ("csv-ragged-row", csv("school,y\nA,1.0\nB,2.0,3.0\n"), DataError, ["d.csv", "line 3 has 3 fields"]),
    ("csv-duplicate-header", csv("school,y,y\nA,1.0,2.0\n"), DataError, ["d.csv", "['y'] appear more than once"]),
    ("csv-not-utf8", csv(b"school,y\n\xff\xfe,1\n"), DataError, ["d.csv", "not a readable CSV"]),
    ("csv-empty-file", csv(""), DataError, ["d.csv", "empty file"]),
    ("csv-header-only", csv("school,y\n"), DataError, ["d.csv", "no rows"]),
    ("csv-nan-cell", csv("school,y\nA,nan\n"), DataError, ["d.csv", "column 'y'", "NaN"]),
    ("csv-missing-id", csv("school,y\nA,1\n,2\n"), DataError, ["d.csv", "missing id in row 1"]),
    (
        "csv-is-a-directory",
        lambda tmp: am.HierarchicalData.from_csv(str(tmp), ["school"]),
        DataError,
        ["cannot be read"],
    ),
    # ---- index arrays (HierarchicalData(...) directly)
    ("ids-with-gap", direct(["school"], {}, [0, 0, 2], y=[1.0, 2, 3]), DataError, ["group 1 has no observations"]),
    ("huge-id", direct(["school"], {}, [0, 10**12], y=[1.0, 2]), DataError, ["group 1 has no observations"]),
    ("negative-id", direct(["school"], {}, [0, -1], y=[1.0, 2]), DataError, ["negative index"]),
    ("fractional-id", direct(["school"], {}, [0, 0.5], y=[1.0, 2]), DataError, ["ids must be integers"]),
    ("string-ids", direct(["school"], {}, ["a", "b"], y=[1.0, 2]), DataError, ["ids must be integers"]),
    ("parent-of-unknown-level", direct(["school"], {"county": [0]}, [0], y=[1.0]), DataError, ["['county']"]),
    ("parent-index-missing", direct(["d", "s"], {}, [0, 1], y=[1.0, 2]), DataError, ["level 's'", "missing"]),
    ("parent-out-of-range", direct(["d", "s"], {"s": [0, 5]}, [0, 1], labels={"d": ["a"]}), DataError, ["index 5"]),
    ("response-wrong-length", direct(["school"], {}, [0, 1], y=[1.0, 2, 3]), DataError, ["expected shape", "N=2"]),
    ("response-3d", direct(["school"], {}, [0, 1], y=np.zeros((1, 1, 2))), DataError, ["expected shape"]),
    ("integer-dtype", direct(["school"], {}, [0, 1], y=[1.5, 2], dtype=torch.int64), DataError, ["floating-point"]),
    ("duplicate-labels", direct(["school"], {}, [0, 1], labels={"school": ["a", "a"]}), DataError, ["not unique"]),
    ("covariate-wrong-length", direct(["s"], {}, [0, 1], covariates={"obs": {"x": [1.0]}}), DataError, ["'x'"]),
    (
        "with-response-wrong-shape",
        lambda tmp: am.HierarchicalData(["s"], {}, [0, 1]).with_response(torch.zeros(3)),
        DataError,
        ["expected shape"],
    ),
    # ---- config files
    ("config-not-utf8", config(b"model: m:f\nname: \xff\n"), ConfigError, ["c.yaml", "UTF-8"]),
    ("config-duplicate-key", config("model: m:f\nmodel: g:h\n"), ConfigError, ["c.yaml", "duplicate key"]),
    ("config-list-for-mapping", config("model: m:f\ndata: [[]]\n"), ConfigError, ["c.yaml", "key 'data'"]),
    ("config-list-for-section", config("model: m:f\ntrain: [1]\n"), ConfigError, ["c.yaml", "key 'train'"]),
    ("config-string-for-number", config("model: m:f\ntrain: {lr: fast}\n"), ConfigError, ["train.lr", "fast"]),
    ("config-nan-range", config("model: m:f\nstructure: {obs: [.nan, 3]}\n"), ConfigError, ["structure.obs"]),
    (
        "config-huge-range",
        config("model: m:f\nstructure: {obs: [1, 1000000000000]}\n", sampler=True),
        ConfigError,
        ["structure", "rows", "limit"],
    ),
    (
        "config-duplicate-levels",
        config("model: m:f\nstructure: {levels: [a, a], groups: {a: [1, 2]}}\n", sampler=True),
        ConfigError,
        ["structure.levels", "distinct"],
    ),
    ("config-bad-override", config("model: m:f\n", ["train.steps=[1"]), ConfigError, ["train.steps"]),
]


@pytest.mark.parametrize("builder, error, words", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_input_gives_a_named_error(tmp_path, builder, error, words):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error) as info:
        builder(tmp_path)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "\n" not in msg
    created = sorted(p.name for p in tmp_path.iterdir())
    assert set(created) - set(before) <= {"d.csv", "c.yaml"}  # only the input itself: nothing half-written


def test_at_least_thirty_distinct_malformed_inputs():
    assert len({m[0] for m in MALFORMED}) == len(MALFORMED) >= 30


# ---------------------------------------------------------------------------------------------- posterior calls
def with_covariates(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu + data.x["u"], 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")] + data.x["x"], 0.5), obs=data.y)


@pytest.fixture(scope="module")
def amortizer():
    sampler = am.StructureSampler(
        ["group"], groups={"group": (3, 8)}, obs=(2, 6), covariates={"group": {"u": {}}, "obs": {"x": {}}}
    )
    return am.Amortizer(with_covariates, sampler, hidden=16)


def data(levels=("group",), groups=(0, 0, 1, 1), y=(1.0, 2.0, 3.0, 4.0), cov=None, **kw):
    cov = {"group": {"u": [0.0, 1.0]}, "obs": {"x": [0.0] * len(groups)}} if cov is None else cov
    parents = {"group": [0, 0]} if len(levels) == 2 else {}
    return am.HierarchicalData(list(levels), parents, list(groups), y=y, covariates=cov, **kw)


POSTERIOR_MISMATCH = [
    ("level-missing", lambda: data(levels=("school",), cov={}), ["levels ['school']", "missing ['group']"]),
    ("level-extra", lambda: data(levels=("district", "group")), ["not in the model ['district']"]),
    ("covariate-missing", lambda: data(cov={"obs": {"x": [0.0] * 4}}), ["covariate 'u'", "missing"]),
    ("covariate-other-level", lambda: data(cov={"obs": {"x": [0.0] * 4, "u": [0.0] * 4}}), ["has it at level 'obs'"]),
    (
        "covariate-extra",
        lambda: data(cov={"group": {"u": [0.0, 1], "v": [0.0, 1]}, "obs": {"x": [0.0] * 4}}),
        ["covariate 'v'", "not in the training data"],
    ),
    ("response-missing", lambda: data(y=None), ["no response ('y')"]),
    ("response-integer", lambda: data().with_response(torch.tensor([1, 2, 3, 4])), ["response 'y'", "torch.int64"]),
    ("response-nan", lambda: data().with_response(torch.tensor([1.0, NAN, 3, 4])), ["response 'y'", "NaN"]),
    ("response-empty-batch", lambda: data().with_response(torch.zeros(0, 4)), ["empty batch", "(0, 4)"]),
    ("too-large-for-network", lambda: data(y=[1.0, 2, 3, 1e100], dtype=torch.float64), ["too large", "float32"]),
    ("not-hierarchical-data", lambda: frame(), ["expected a HierarchicalData", "dict"]),
]


@pytest.mark.parametrize("make, words", [m[1:] for m in POSTERIOR_MISMATCH], ids=[m[0] for m in POSTERIOR_MISMATCH])
def test_posterior_structure_mismatch_fails_before_any_network_call(amortizer, monkeypatch, make, words):
    def no_network(*args, **kwargs):
        raise AssertionError("the network ran on a mismatched dataset")

    monkeypatch.setattr(amortizer.guide.encoder, "forward", no_network)
    with pytest.raises(DataError) as info:
        amortizer.posterior(make())
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_matching_posterior_data_works_in_any_float_precision(amortizer):
    for dtype in (torch.float32, torch.float64):
        draws = amortizer.posterior(data(dtype=dtype)).sample(20, seed=0)
        assert draws["theta"].shape == (20, 2) and all(bool(torch.isfinite(v).all()) for v in draws.values())


def test_diagnostics_of_a_hopeless_fit_say_so(small_sampler):
    """Weights spanning thousands of nats once gave a ZeroDivisionError inside the Pareto fit."""
    a = am.Amortizer(normal_known, small_sampler, hidden=16)
    d = small_sampler.sample(torch.Generator().manual_seed(1))
    diag = a.posterior(d.with_response(1e4 * torch.randn(d.n_obs))).diagnostics(100)
    assert diag["pareto_k"] > 0.7 and not diag["ok"]


# ---------------------------------------------------------------------------------------------- generated frames
@st.composite
def nested_frames(draw):
    """A valid long-format frame: districts > schools > rows, arbitrary labels, shuffled rows."""
    n_d = draw(st.integers(1, 4))
    labels = st.one_of(st.integers(-1000, 1000), st.text(string.ascii_letters, min_size=1, max_size=4))
    districts = draw(st.lists(labels, min_size=n_d, max_size=n_d, unique_by=str))
    rows, school_id = [], 0
    for dl in districts:
        for _ in range(draw(st.integers(1, 3))):
            school_id += 1
            u = draw(st.floats(-1e6, 1e6))
            for _ in range(draw(st.integers(1, 4))):
                rows.append((dl, f"s{school_id}", draw(st.floats(-1e6, 1e6)), u))
    order = draw(st.permutations(range(len(rows))))
    rows = [rows[i] for i in order]
    return {k: [r[i] for r in rows] for i, k in enumerate(["district", "school", "y", "u"])}


def assert_consistent(d: am.HierarchicalData, f: dict) -> None:
    """What any successfully built dataset must satisfy, checked against the input rows."""
    n = len(f["y"])
    assert d.n_obs == n and torch.allclose(d.y.double(), torch.tensor(f["y"], dtype=torch.float64), rtol=1e-6)
    lab = d.labels
    for r in range(n):
        s = d.index("school")[r]
        assert lab["school"][s] == f["school"][r] and lab["district"][d.index("district")[r]] == f["district"][r]
    for lvl in d.levels:
        assert bool((d.counts(lvl) > 0).all())


@SETTINGS
@given(nested_frames(), st.booleans())
def test_valid_frames_build_consistent_data(f, use_pandas):
    d = am.HierarchicalData.from_frame(
        pd.DataFrame(f) if use_pandas else f, levels=LEVELS, response="y", covariates={"school": ["u"]}
    )
    assert_consistent(d, f)
    assert d.size("school") == len(set(f["school"])) and d.size("district") == len({str(v) for v in f["district"]})


BAD_VALUES = [NAN, INF, -INF, "abc", None, 1e300, 1 + 1j, [1.0]]


@SETTINGS
@given(nested_frames(), st.sampled_from(["y", "u"]), st.integers(0, 10**6), st.sampled_from(BAD_VALUES))
def test_one_bad_value_is_named(f, col, where, bad):
    f = {k: list(v) for k, v in f.items()}
    rows = [r for r in range(len(f[col])) if f["school"][r] == f["school"][where % len(f[col])]]
    for r in rows if col == "u" else rows[:1]:  # a school covariate stays constant within its school
        f[col][r] = bad
    with pytest.raises(DataError, match=f"column '{col}'"):
        am.HierarchicalData.from_frame(f, levels=LEVELS, response="y", covariates={"school": ["u"]})


@SETTINGS
@given(nested_frames(), st.integers(0, 10**6), st.sampled_from([None, NAN, "", "  ", pd.NA]), st.sampled_from(LEVELS))
def test_missing_id_is_named_with_its_row(f, where, missing, level):
    f = {k: list(v) for k, v in f.items()}
    r = where % len(f["y"])
    f[level][r] = missing
    with pytest.raises(DataError, match=f"column '{level}': missing id in row {r}$"):
        am.HierarchicalData.from_frame(f, levels=LEVELS, response="y")


@SETTINGS
@given(nested_frames(), st.integers(0, 10**6))
def test_broken_nesting_is_named_unless_ids_are_nested(f, where):
    f = {k: list(v) for k, v in f.items()}
    districts = sorted(set(f["district"]), key=str)
    r = where % len(f["y"])
    same_school = [i for i in range(len(f["y"])) if f["school"][i] == f["school"][r]]
    if len(districts) < 2 or len(same_school) < 2:
        return
    f["district"][r] = next(d for d in districts if d != f["district"][r])
    with pytest.raises(DataError, match=r"column 'school': group .* has rows in 2 different 'district' groups"):
        am.HierarchicalData.from_frame(f, levels=LEVELS, response="y")
    d = am.HierarchicalData.from_frame(f, levels=LEVELS, response="y", nested_ids=True)
    assert d.size("school") == len({(str(a), b) for a, b in zip(f["district"], f["school"])})


CELLS = st.one_of(
    st.integers(-3, 5),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=3),
    st.sampled_from([None, True, NAN, pd.NA, pd.NaT, [1, 2], 1 + 2j, b"x", np.float32("nan"), np.int64(3), 1e308]),
)
NAMES = st.sampled_from(["district", "school", "y", "x", "obs", ""])


@st.composite
def garbage_frames(draw):
    n = draw(st.integers(0, 6))
    column = st.one_of(
        st.lists(CELLS, min_size=n, max_size=n),
        st.lists(st.integers(0, 3), min_size=n, max_size=n),
        st.lists(st.floats(-10, 10), min_size=n, max_size=n),
        st.lists(st.lists(st.integers(0, 2), max_size=2), min_size=n, max_size=n),
        st.sampled_from([1, "abc", np.zeros((n, 2)), list(range(n + 1))]),
    )
    return draw(st.dictionaries(NAMES, column, max_size=5))


@SETTINGS
@given(
    garbage_frames(),
    st.one_of(st.lists(NAMES, max_size=3), st.just("school")),
    st.one_of(st.none(), NAMES),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(["obs", "school", "q"]), st.lists(NAMES, max_size=2))),
    st.booleans(),
)
def test_arbitrary_frames_build_consistent_data_or_raise_data_error(f, levels, response, covariates, nested):
    try:
        d = am.HierarchicalData.from_frame(f, levels, response=response, covariates=covariates, nested_ids=nested)
    except DataError:
        return
    if d.y is not None:
        assert bool(torch.isfinite(d.y).all()) and d.y.shape == (d.n_obs,)
    for lvl in d.levels:
        assert bool((d.counts(lvl) > 0).all())
    for t in d.x.values():
        assert bool(torch.isfinite(t).all())


INDEX = st.one_of(
    st.lists(st.integers(-2, 6), max_size=8),
    st.lists(st.integers(0, 10**13), max_size=3),
    st.lists(st.floats(), max_size=4),
    st.lists(st.one_of(st.none(), st.integers(0, 2)), max_size=4),
    st.sampled_from([3, [[0, 1]], ["a", "b"]]),
)


@SETTINGS
@given(
    st.one_of(st.lists(st.sampled_from(["a", "b", "obs", ""]), min_size=1, max_size=3), st.just("ab")),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), INDEX, max_size=2),
    INDEX,
    st.one_of(st.none(), st.lists(st.floats(), max_size=8)),
)
def test_index_arrays_build_dense_data_or_raise_data_error(levels, parents, group, y):
    try:
        d = am.HierarchicalData(levels, parents, group, y=y)
    except DataError:
        return
    for lvl in d.levels:  # every group of every level has members: ids were dense 0..G-1
        assert bool((d.counts(lvl) > 0).all()) and int(d.index(lvl).max()) == d.size(lvl) - 1
    assert d.y is None or bool(torch.isfinite(d.y).all())


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=80),
        st.text(alphabet='school,y\n1.0ab"\x00 -e', max_size=80).map(lambda t: ("school,y\n" + t).encode()),
    )
)
def test_arbitrary_csv_bytes_build_data_or_raise_data_error(tmp_path_factory, raw):
    p = tmp_path_factory.mktemp("csv") / "d.csv"
    p.write_bytes(raw)
    try:
        d = am.HierarchicalData.from_csv(str(p), ["school"], response="y")
    except DataError as e:
        assert str(p) in str(e)
        return
    assert bool(torch.isfinite(d.y).all()) and bool((d.counts("school") > 0).all())


# ---------------------------------------------------------------------------------------------- generated configs
KEYS = ["model", "name", "seed", "network", "hidden", "structure", "levels", "groups", "obs", "covariates", "data"]
KEYS += ["path", "train", "steps", "lr", "objective", "validate", "nuts", "reparam", "extra", "dist", "group", "junk"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(),
    st.text(max_size=5),
    st.sampled_from(["m:f", "npe", "${x}", "???", "a/b", "obs"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.sampled_from(KEYS), c, max_size=3)),
    max_leaves=10,
)
OVERRIDES = st.lists(
    st.one_of(
        st.text(max_size=10),
        st.builds(
            "{}.{}={}".format,
            st.sampled_from(KEYS),
            st.sampled_from(KEYS),
            st.sampled_from(["1", "[1,2]", "{a: 1}", "x", "null", "1e999", "[", "${oops}"]),
        ),
    ),
    max_size=2,
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5), OVERRIDES)
def test_arbitrary_config_documents_load_or_raise_config_error(tmp_path_factory, doc, overrides):
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(yaml.safe_dump({"model": "m:f", **doc} if "model" not in doc else doc))
    try:
        cfg = load_config(p, overrides)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(cfg, am.config.Config) and ":" in cfg.model


RANGE = st.lists(st.one_of(st.integers(-3, 5), st.floats(-2, 5), st.just(10**12), st.text(max_size=2)), max_size=3)
SPEC = st.dictionaries(
    st.sampled_from(["dist", "loc", "scale", "low", "high", "p", "sd"]),
    st.one_of(st.integers(-2, 3), st.floats(-2, 3), st.sampled_from(["normal", "uniform", "bernoulli", "gamma"])),
    max_size=3,
)
LEVEL = st.sampled_from(["a", "b", "obs", ""])


@SETTINGS
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "levels": st.lists(LEVEL, max_size=3),
            "groups": st.dictionaries(LEVEL, RANGE, max_size=3),
            "obs": RANGE,
            "covariates": st.dictionaries(LEVEL, st.dictionaries(st.sampled_from(["x", "u"]), SPEC, max_size=2)),
        },
    )
)
def test_arbitrary_structure_sections_build_a_sampler_or_raise_config_error(tmp_path_factory, structure):
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_text(yaml.safe_dump({"model": "m:f", "structure": structure}))
    try:
        sampler = build_sampler(load_config(p))
    except ConfigError:
        return
    d = sampler.sample(torch.Generator().manual_seed(0))
    assert list(d.levels) == load_config(p).structure.levels and d.n_obs >= 1
