"""Tests of the radon contextual-effects model (amortize/models/radon.py) and its shipped data file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import amortize as am
from amortize.models.radon import COVARIATES, radon_contextual_effects, radon_minnesota_data, write_radon_csv
from amortize.validate import reference

CSV = Path(__file__).resolve().parents[1] / "experiments" / "data" / "radon_minnesota.csv"


@pytest.fixture(scope="module")
def radon():
    try:
        return radon_minnesota_data(), reference.radon_minnesota("halfnormal")[1]
    except reference.ReferenceNotFoundError as e:
        pytest.skip(str(e))


def test_sites_match_the_inference_gym_ground_truth(radon):
    data, moments = radon
    st = am.trace_structure(radon_contextual_effects, data)
    shapes = {s.name: (s.level, tuple(s.event_shape)) for s in st.latents}
    assert set(shapes) == set(moments.mean) and st.response == "log_radon"
    assert shapes["county_effect"] == ("county", ())
    assert shapes["weight"] == (None, (3,))
    sizes = sum(moments.mean[k].numel() for k in moments.mean)
    assert sizes == 91  # 1 + 1 + 85 county effects + 3 weights + 1 (the "90" miscounts)


def test_shipped_csv_is_the_reference_data(radon, tmp_path):
    data, _ = radon
    shipped = am.HierarchicalData.from_csv(str(CSV), ["county"], response="log_radon", covariates=COVARIATES)
    assert shipped.labels["county"] == data.labels["county"]
    assert torch.equal(shipped.index("county"), data.index("county"))
    assert torch.allclose(shipped.y, data.y) and all(torch.allclose(shipped.x[k], data.x[k]) for k in data.x)
    write_radon_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text() == CSV.read_text()


def test_model_is_batch_safe_and_amortizable(radon):
    data, _ = radon
    a = am.Amortizer(radon_contextual_effects, data.with_response(None), hidden=8, flow_bins=0)
    draws = a.posterior(data).sample(5, seed=0)
    assert draws["weight"].shape == (5, 3) and draws["county_effect"].shape == (5, 85)
    assert not a.posterior(data).range_flags()  # the real data lies inside its own training range
