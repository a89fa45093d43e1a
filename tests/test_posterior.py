import pyro
import pyro.distributions as dist
import pytest
import torch

import amortize as am

from .conftest import normal_known


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
    frame = amortizer.posterior(frame_data()).summary(num_samples=50, seed=0)
    assert list(frame.index) == ["mu", "theta[a]", "theta[b]", "theta[c]"]
    assert "theta[a]" in frame.to_string()


def test_out_of_range_structure_is_flagged(amortizer):
    big = am.StructureSampler(["group"], groups={"group": (32, 32)}, obs=(2, 6)).sample(
        torch.Generator().manual_seed(0)
    )
    data = big.with_response(torch.randn(big.n_obs))
    diag = amortizer.posterior(data).diagnostics(num_samples=200)
    assert any("group" in f for f in diag["flags"]) and not diag["ok"]


def test_skeleton_keeps_groups_and_first_rows():
    d = am.HierarchicalData(
        ["school", "class"],
        parents={"class": [0, 0, 1]},
        group=[2, 0, 0, 1, 2, 1],
        y=torch.arange(12.0).reshape(2, 6),
        covariates={"obs": {"x": [10.0, 11, 12, 13, 14, 15]}, "class": {"size": [1.0, 2, 3]}},
    )
    sk = d.skeleton()
    assert sk.sizes == d.sizes and sk.n_obs == 3
    assert sk.group.tolist() == [0, 1, 2]
    assert sk.x["x"].tolist() == [11.0, 13, 10]  # first row of classes 0, 1, 2
    assert sk.y.tolist() == [[1.0, 3, 0], [7.0, 9, 6]]
    assert torch.equal(sk.x["size"], d.x["size"]) and torch.equal(sk.parents["class"], d.parents["class"])


def _reads_rows(data):
    """Group prior centred on each group's mean of a row covariate: the priors need every row."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    n = data.counts("group")
    xbar = torch.zeros(data.size("group")).index_add_(0, data.index("group"), data.x["x"]) / n
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu + xbar, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 0.5), obs=data.y)


def test_drawing_runs_the_model_on_the_skeleton_only_when_priors_ignore_rows(amortizer, small_data):
    assert am.structure.priors_free_of_rows(normal_known, small_data)
    p = amortizer.posterior(small_data)
    part = p.parts[0][1]
    assert part.drawing_data().n_obs == small_data.size("group") < small_data.n_obs
    fast = p.sample(300, seed=3)
    part._skeleton = part.data  # the full data: the same draws, bit for bit
    full = p.sample(300, seed=3)
    assert all(torch.equal(fast[k], full[k]) for k in fast)

    x = small_data.with_response(small_data.y)
    x.covariates = {"obs": {"x": torch.linspace(-3, 3, x.n_obs)}}
    x.covariate_level = {"x": "obs"}
    assert not am.structure.priors_free_of_rows(_reads_rows, x)
    sampler = am.StructureSampler(
        ["group"], groups={"group": (3, 8)}, obs=(2, 6), covariates={"obs": {"x": {"dist": "normal"}}}
    )
    a = am.Amortizer(_reads_rows, sampler, hidden=8)
    q = a.posterior(x)
    assert q.parts[0][1].drawing_data() is q.data
    assert q.sample(5)["theta"].shape == (5, x.size("group"))


def test_compiled_drawing_kernel_draws_as_the_eager_one(amortizer, small_data):
    """torch.compile of the drawing kernel (one C++ loop on CPU) gives the eager draws up to rounding."""
    eager = amortizer.posterior(small_data).sample(200, seed=4)
    try:
        amortizer.compile()
        compiled = amortizer.posterior(small_data).sample(200, seed=4)
    finally:
        from amortize.guide import product_draw

        amortizer.guide.draw_kernel = product_draw
    for k in eager:
        assert torch.allclose(eager[k], compiled[k], rtol=1e-5, atol=1e-5), k


def test_one_api_for_one_a_batch_a_list_and_a_streamed_dataset(amortizer, tmp_path):
    """sample / summary / diagnostics / save answer alike; the layout follows the input."""
    data = frame_data()
    batch = data.with_response(torch.stack([data.y, data.y + 1.0]))
    for what, post in {
        "one": amortizer.posterior(data),
        "batch": amortizer.posterior(batch),
        "list": amortizer.posterior([data, data]),
        "streamed": amortizer.posterior(data, chunk_groups=2),
    }.items():
        draws = post.sample(30, seed=0)
        assert "mu" in post.summary(num_samples=20, seed=0).index.get_level_values(-1)
        diag = post.diagnostics(num_samples=50)
        post.save(tmp_path / f"{what}.pt", num_samples=30, seed=0)
        saved = torch.load(tmp_path / f"{what}.pt")
        assert saved["levels"] == ["group"] and saved["seed"] == 0
        if what == "list":
            assert len(draws) == 2 and len(diag) == 2 and torch.equal(saved["draws"][1]["theta"], draws[1]["theta"])
        else:
            assert draws["theta"].shape == ((30, 2, 3) if what == "batch" else (30, 3))
            assert torch.equal(saved["draws"]["theta"], draws["theta"]) and "flags" in diag


def test_posterior_is_built_from_what_it_needs(amortizer):
    """No amortizer: the guide, the model, the ranges, the device."""
    data = frame_data()
    own = am.Posterior(amortizer.guide, normal_known, data, ranges=amortizer.ranges, device="cpu")
    a, b = own.sample(10, seed=2), amortizer.posterior(data).sample(10, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a) and own.range_flags() == amortizer.posterior(data).range_flags()


def test_posterior_sits_below_the_amortizer():
    """posterior, its helpers and the training loop import nothing above them (type-only imports aside)."""
    import ast
    from pathlib import Path

    root = Path(am.__file__).parent
    above = {
        "posterior": {"amortizer", "validate", "cli", "config"},
        "batch": {"posterior", "amortizer", "train", "validate", "cli", "config"},
        "streaming": {"posterior", "amortizer", "train", "validate", "cli", "config"},
        "importance": {"posterior", "amortizer", "train", "validate", "cli", "config"},
        "ranges": {"posterior", "amortizer", "train", "validate", "cli", "config"},
        "train": {"posterior", "amortizer", "sources", "validate", "cli", "config"},
        "sources": {"posterior", "amortizer", "validate", "cli", "config"},
        "subsample": {"posterior", "amortizer", "train", "validate", "cli", "config"},
    }
    for name, banned in above.items():
        tree = ast.parse((root / f"{name}.py").read_text())
        type_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in type_only:
                assert (node.module or "").split(".")[0] not in banned, (name, node.module)


def test_predictive_replicates_the_data_scale(amortizer):
    """Posterior predictive responses: shape of the input, and each group's replicated mean follows its
    posterior (theta_g + noise 0.5 / sqrt(n_g)): within 5 standard errors of the draws' theta means."""
    data = frame_data()
    post = amortizer.posterior(data)
    y = post.predictive(2000, seed=0)
    assert y.shape == (2000, data.n_obs)
    theta = post.sample(2000, seed=0)["theta"]  # the same seed: the draws y was simulated from
    g = data.index("group")
    for j in range(data.size("group")):
        rows = y[:, g == j]
        ybar = rows.mean(1)
        se = ybar.std() / 2000**0.5
        assert abs(float(ybar.mean() - theta[:, j].mean())) < 5 * float(se)
    assert amortizer.posterior([data, data]).predictive(3)[1].shape == (3, data.n_obs)
    batch = data.with_response(torch.stack([data.y, data.y]))
    assert amortizer.posterior(batch).predictive(3).shape == (3, 2, data.n_obs)


def test_a_posterior_whose_q_is_not_finite_gets_a_verdict_naming_the_site_not_a_crash(amortizer):
    """q's location beyond floating point (heavy-tailed globals drove a sibling's conditional to inf in a
    2PL IRT): ``diagnostics`` says not ok, not correctable, with the site; drawing raises by name."""
    data = frame_data()
    bias = amortizer.guide.group_heads["theta"].raw.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(float("inf"))
        for post in (amortizer.posterior(data), amortizer.posterior([data, data])):
            verdict = post.diagnostics(num_samples=200, local_sbc=False, model_check=False)
            for v in verdict if isinstance(verdict, list) else [verdict]:
                assert v["ok"] is False and v["correctable"] is False and v["pareto_k"] == float("inf")
                assert "not finite" in v["reason"] and "'theta'" in v["reason"], v["reason"]
                assert "finite" in v["failed"], v["failed"]
        with pytest.raises(am.NonFiniteDrawsError, match="site 'theta'.*not finite"):
            amortizer.posterior(data).sample(20, seed=0)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert amortizer.posterior(data).diagnostics(num_samples=200, local_sbc=False, model_check=False)["pareto_k"] < 1e3


def test_no_public_entry_point_returns_a_nan_draw(amortizer, monkeypatch, tmp_path):
    """Every way to draws (one, batch, list, streamed, corrected, summary, save) refuses a non-finite
    draw with an AmortizeError naming the site; the same calls are finite without the fault."""
    data = frame_data()
    batch = data.with_response(torch.stack([data.y, data.y + 1.0]))
    posts = {
        "one": amortizer.posterior(data),
        "batch": amortizer.posterior(batch),
        "list": amortizer.posterior([data, data]),
        "streamed": amortizer.posterior(data, chunk_groups=2),
    }
    calls = {
        "sample": lambda p: p.sample(20, seed=0),
        "summary": lambda p: p.summary(num_samples=20, seed=0),
        "save": lambda p: p.save(tmp_path / "d.pt", num_samples=20, seed=0),
    }
    for post in posts.values():
        for call in calls.values():
            call(post)  # finite: no error
    assert torch.isfinite(posts["one"].sample(20, seed=0, correct=True)["theta"]).all()

    kernel = amortizer.guide.draw_kernel
    monkeypatch.setattr(amortizer.guide, "draw_kernel", lambda *a: kernel(*a) * float("nan"))
    for post in posts.values():
        for call in calls.values():
            with pytest.raises(am.AmortizeError, match="site 'theta'.*not finite"):
                call(post)
