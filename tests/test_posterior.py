import pytest
import torch

import amortize as am


def frame_data():
    return am.HierarchicalData.from_frame(
        {"group": ["b", "b", "a", "c", "c", "c"], "y": [0.1, 0.3, -1.0, 2.0, 1.5, 1.7]}, levels=["group"], response="y"
    )


def test_sample_shapes_single_and_batch(amortizer):
    data = frame_data()
    draws = amortizer.posterior(data).sample(11, seed=0)
    assert draws["mu"].shape == (11,) and draws["theta"].shape == (11, 3)
    batch = data.with_response(torch.stack([data.y, data.y + 1.0]))
    bd = amortizer.posterior(batch).sample(5, seed=0)
    assert bd["theta"].shape == (5, 2, 3)


def test_seeded_draws_reproduce_and_leave_global_rng_alone(amortizer):
    post = amortizer.posterior(frame_data())
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = post.sample(20, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = post.sample(20, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_log_prob_matches_sampling_density(amortizer):
    post = amortizer.posterior(frame_data())
    draws = post.sample(30, seed=1)
    lp = post.log_prob(draws)
    assert lp.shape == (30,) and torch.isfinite(lp).all()
    # a draw far out in the tail is less likely than the typical draws
    far = {k: v.clone() for k, v in draws.items()}
    far["mu"] = far["mu"] + 50.0
    assert (post.log_prob(far) < lp).all()


def test_to_arviz_dims_and_coords(amortizer):
    pytest.importorskip("arviz")
    idata = amortizer.posterior(frame_data()).to_arviz(num_samples=40, seed=0)
    theta = idata.posterior["theta"]
    assert theta.dims == ("chain", "draw", "group")
    assert list(theta.coords["group"].values) == ["a", "b", "c"]


def test_summary_names_group_labels(amortizer):
    text = amortizer.posterior(frame_data()).summary(num_samples=50, seed=0)
    assert "theta[a]" in text and "mu" in text


def test_out_of_range_structure_is_flagged(amortizer):
    big = am.StructureSampler(["group"], groups={"group": (32, 32)}, obs=(2, 6)).sample(
        torch.Generator().manual_seed(0)
    )
    data = big.with_response(torch.randn(big.n_obs))
    diag = amortizer.posterior(data).diagnostics(num_samples=200)
    assert any("group" in f for f in diag["flags"]) and not diag["ok"]
