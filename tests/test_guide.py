import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

import amortize as am
from amortize.guide import AmortizedGuide, gaussian_prior
from amortize.objectives import log_weights
from amortize.structure import batched


def scale_model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], s[..., data.index("group")]), obs=data.y)


def make(small_sampler, B=3):
    data = small_sampler.sample(torch.Generator().manual_seed(0))
    st = am.trace_structure(scale_model, data)
    sim = am.simulate(scale_model, st, data, B)
    guide = AmortizedGuide(scale_model, st, {}, hidden=16)
    return st, sim, guide


def test_scoring_matches_sampling_density(small_sampler):
    """log q of the guide's own draws, rescored through the `truth` path, equals the density recorded
    while sampling: the joint global density and every Jacobian are accounted once."""
    st, sim, guide = make(small_sampler)
    with torch.no_grad():
        _, log_q, values = log_weights(guide, sim.data, 4)
        truth = {s.name: values[s.name] for s in st.latents}
        _, log_q2, _ = log_weights(guide, sim.data, 4, truth=truth)
    assert log_q.shape == (4, 3)
    assert torch.allclose(log_q, log_q2, rtol=1e-5, atol=1e-4)


def test_group_posterior_multiplies_the_model_prior(small_sampler):
    st, sim, guide = make(small_sampler)
    prior = dist.Normal(torch.zeros(2, 3, 5), 2.0)
    loc, scale = gaussian_prior(prior, st["theta"])
    assert loc.shape == (2, 3, 5, 1) and torch.all(scale == 2.0)
    assert gaussian_prior(dist.HalfNormal(torch.ones(3)), st["tau"]) is None
    ln = gaussian_prior(dist.LogNormal(torch.zeros(3), 0.5), st["s"])
    assert ln is not None and torch.all(ln[1] == 0.5)


def test_is_a_pyro_guide_for_trace_elbo(small_sampler):
    """Pyro's own Trace_ELBO on (batched model, guide) equals the library's per-draw weights."""
    st, sim, guide = make(small_sampler)
    model = batched(scale_model, st.max_plate_nesting)
    pyro.set_rng_seed(3)
    loss = Trace_ELBO(max_plate_nesting=st.max_plate_nesting + 2).loss(model, guide, sim.data, 2)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        log_p, log_q, _ = log_weights(guide, sim.data, 2)
    assert abs(loss - float(-(log_p - log_q).sum())) < 1e-3 * max(1.0, abs(loss))


def test_sample_shapes_and_draws_differ(small_sampler):
    st, sim, guide = make(small_sampler, B=2)
    with torch.no_grad():
        values = guide(sim.data, 7)
    G = sim.data.size("group")
    assert values["mu"].shape == (7, 2, 1) and values["theta"].shape == (7, 2, G)
    assert torch.all(values["tau"] > 0) and torch.all(values["s"] > 0)
    assert values["theta"].std(0).min() > 0


def test_cholesky_affine_inverts_and_has_the_jacobian_log_determinant():
    from amortize.nn.transforms import CholeskyAffine

    torch.manual_seed(0)
    L = torch.randn(3, 4, 4).tril()
    L.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(3, 4) + 0.5)
    t = CholeskyAffine(torch.randn(3, 4), L)
    x = torch.randn(5, 3, 4)
    y = t(x)
    assert torch.allclose(t.inv(y.clone()), x, atol=1e-5)
    jac = torch.autograd.functional.jacobian(lambda v: t(v), x[0, 1])[1]  # d y[1] / d x[1]: [4, 4]
    assert torch.allclose(t.log_abs_det_jacobian(x, y)[0, 1], torch.linalg.slogdet(jac)[1], atol=1e-5)


def test_pooled_within_group_variance_is_unbiased_for_small_groups():
    """Groups of 2-3 rows, sigma = 1: the pooled statistic divides by N - G, so exp(2 lw) averages 1
    (dividing by N would read about 0.6)."""
    from amortize.nn import HierarchicalEncoder

    gen = torch.Generator().manual_seed(0)
    data = am.StructureSampler(["group"], groups={"group": (40, 40)}, obs=(2, 3)).sample(gen)
    y = torch.randn(400, 40, generator=gen)[:, data.index("group")] + torch.randn(400, data.n_obs, generator=gen)
    enc = HierarchicalEncoder(("group",), {}, hidden=4)
    lw = enc.statistics(data.with_response(y)).levels["group"].pooled_log_sd  # [400]
    assert abs(float(torch.exp(2 * lw).mean()) - 1.0) < 0.03


def test_pooled_noise_of_a_covariate_model_is_that_of_the_residuals():
    """Varying slopes, sigma = 0.1: the within-group sd around group means mixes in slope x x; the
    residual statistic reads sigma (its old reading is several times too large)."""
    from amortize.nn import HierarchicalEncoder

    gen = torch.Generator().manual_seed(1)
    data = am.StructureSampler(["group"], groups={"group": (30, 30)}, obs=(3, 10)).sample(gen)
    x = torch.randn(data.n_obs, generator=gen)
    data.covariates = {"obs": {"x": x}}
    data.covariate_level = {"x": "obs"}
    g = data.index("group")
    a, b = torch.randn(200, 30, generator=gen), 2 * torch.randn(200, 30, generator=gen)
    y = a[:, g] + b[:, g] * x + 0.1 * torch.randn(200, data.n_obs, generator=gen)
    enc = HierarchicalEncoder(("group",), {"obs": ["x"]}, hidden=4)
    stats = enc.statistics(data.with_response(y))
    lw = stats.levels["group"].pooled_log_sd
    assert abs(float(torch.exp(2 * lw).mean()) / 0.01 - 1.0) < 0.05
    # each innermost group's own slope, intercept and intercept at the pooled slope, with their log
    # precisions: log S_xx, -log(1/n + xbar^2 / S_xx) and log n
    groups = stats.levels["group"].groups
    n = data.counts("group").float()
    xbar = torch.zeros(30).index_add_(0, g, x) / n
    xc = x - xbar[g]
    sxx = torch.zeros(30).index_add_(0, g, xc * xc)
    assert groups.slopes.shape == groups.slopes_log_precision.shape == (200, 30, 1)
    assert groups.measurements().shape == groups.measurement_log_precisions().shape == (200, 30, 3)
    assert torch.allclose(groups.slopes_log_precision[0, :, 0], sxx.log(), atol=1e-3)
    assert torch.allclose(groups.intercept_log_precision[0], -torch.log(1 / n + xbar**2 / sxx), atol=1e-3)
    assert torch.allclose(groups.pooled_intercept_log_precision[0], n.log())
    slope_z = (groups.slopes[..., 0] - b) / (0.1 / sxx.sqrt())
    assert float(slope_z.std()) < 1.2  # slopes read b within their error
    se_a = 0.1 * torch.sqrt(1 / n + xbar**2 / sxx)
    assert float(((groups.intercept - a) / se_a).std()) < 1.2  # intercepts read a within theirs
    # at the pooled slope: ybar - beta_pooled xbar, off by (b - beta_pooled) xbar when slopes vary
    ybar = torch.zeros(200, 30).index_add_(1, g, y) / n
    pooled = (xc * (y - ybar[:, g])).sum(-1) / (xc * xc).sum()
    assert torch.allclose(groups.pooled_intercept, ybar - pooled[:, None] * xbar, atol=1e-4)


def test_global_head_units_narrow_with_the_counts():
    """The standardizing map's unit is fitted to how the globals' residual spread falls with the counts:
    data whose error shrinks like rows^-1/2 (and not with groups) get a slope near -1/2 on log rows."""
    from amortize.nn import GlobalHead

    gen = torch.Generator().manual_seed(0)
    M = 20_000
    log_g = torch.empty(M).uniform_(2.3, 3.9, generator=gen)
    log_n = log_g + torch.empty(M).uniform_(1.6, 3.4, generator=gen)
    u = torch.randn(M, 1, generator=gen)
    stat = u + torch.randn(M, 1, generator=gen) * torch.exp(-0.5 * log_n).unsqueeze(-1) * 3.0
    head = GlobalHead(8, 1, flow_bins=0, raw_dim=1, count_dim=2)
    counts = torch.stack([log_g, log_n], -1)
    head.fit(stat, u, counts)
    w = head.count_unit.weight[0]
    assert abs(float(w[1]) + 0.5) < 0.1 and abs(float(w[0])) < 0.1
    # the standardizer is the map the distribution applies: a zero network output maps to the shift
    shift, scale = head.standardizer(torch.zeros(5, 8), 0, stat[:5], counts[:5])
    assert torch.allclose(scale[:, 0], torch.exp(head.count_unit(counts[:5]))[:, 0] * head.scaler.scale)
    assert shift.shape == (5, 1)


def test_vary_sizes_keeps_every_group_in_range_and_varies_the_mean_size():
    def mean_sizes(vary):
        s = am.StructureSampler(["a", "b"], groups={"a": (10, 20), "b": (2, 12)}, obs=(5, 30), vary_sizes=vary)
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(200):
            d = s.sample(gen)
            n, kids = d.counts("b"), torch.bincount(d.parent_index("b"))
            assert int(n.min()) >= 5 and int(n.max()) <= 30 and int(kids.min()) >= 2 and int(kids.max()) <= 12
            out.append(float(n.float().mean().log()))
        return torch.tensor(out).std()

    assert mean_sizes(True) > 3 * mean_sizes(False)


def test_slope_spread_statistics_read_the_slopes_scale_and_correlation():
    """Varying slopes with tau_slope 0.5 and correlation 0.6 with the intercepts, 200 groups: the
    dataset statistics read the slopes' sd (method of moments) and a correlation near 0.6."""
    from amortize.nn import HierarchicalEncoder

    gen = torch.Generator().manual_seed(1)
    data = am.StructureSampler(["group"], groups={"group": (200, 200)}, obs=(5, 15)).sample(gen)
    x = torch.randn(data.n_obs, generator=gen)
    data.covariates = {"obs": {"x": x}}
    data.covariate_level = {"x": "obs"}
    g = data.index("group")
    z1, z2 = torch.randn(50, 200, generator=gen), torch.randn(50, 200, generator=gen)
    y = z1[:, g] + 0.5 * (0.6 * z1 + 0.8 * z2)[:, g] * x + 0.3 * torch.randn(50, data.n_obs, generator=gen)
    enc = HierarchicalEncoder(("group",), {"obs": ["x"]}, hidden=4)
    stats = enc.statistics(data.with_response(y))
    assert abs(float(stats.slope_log_sd[:, 0].exp().mean()) - 0.5) < 0.05
    assert 0.45 < float(stats.slope_corr[:, 0].mean()) < 0.7


def test_latents_only_draws_the_same_values_without_running_the_likelihood(small_sampler):
    """Drawing alone stops the model at its last latent site: the same values for the same seed, and
    nothing after that site (the likelihood) is computed by the draws (the encoding, computed once,
    reads the likelihood's data terms)."""
    calls = []

    def counting_model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("group", data.size("group")):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        calls.append(1)
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.Normal(theta[..., data.index("group")], 1.0), obs=data.y)

    data = small_sampler.sample(torch.Generator().manual_seed(0))
    st = am.trace_structure(counting_model, data)
    sim = am.simulate(counting_model, st, data, 2)
    guide = AmortizedGuide(counting_model, st, {}, hidden=16)
    with torch.no_grad():
        encoded = guide.encode(sim.data)
        torch.manual_seed(5)
        full = guide(sim.data, 6, encoded=encoded)
        calls.clear()
        torch.manual_seed(5)
        only = guide(sim.data, 6, encoded=encoded, latents_only=True)
    assert calls == [] and set(only) == {"mu", "tau", "theta"}
    for name in only:
        assert torch.allclose(full[name], only[name], rtol=1e-5, atol=1e-6)


def test_group_term_is_the_exact_product_of_prior_and_data_term(small_sampler):
    """q(theta | mu, tau, y) = N(mu, tau) x N(m, s), normalized: mean (mu s^2 + m tau^2) / (tau^2 + s^2)
    and sd tau s / sqrt(tau^2 + s^2), per draw of the globals."""
    data = small_sampler.sample(torch.Generator().manual_seed(0))
    st = am.trace_structure(scale_model, data)
    sim = am.simulate(scale_model, st, data, 2)
    guide = AmortizedGuide(scale_model, st, {}, hidden=16, global_coupling=False).double()
    d = sim.data.to(dtype=torch.float64)
    with torch.no_grad():
        m, s, _ = guide.encode(d)["terms"]["theta"]  # [B, G, 1]
        guide(d, 5)
        _, guide_trace = guide.get_traces()
    q = guide_trace.nodes["theta"]["fn"]
    while hasattr(q, "base_dist"):
        q = q.base_dist
    mu, tau = guide_trace.nodes["mu"]["value"], guide_trace.nodes["tau"]["value"]  # [5, 2, 1]
    m, s = m.squeeze(-1), s.squeeze(-1)
    mean = (mu * s**2 + m * tau**2) / (tau**2 + s**2)
    sd = tau * s / (tau**2 + s**2).sqrt()
    assert torch.allclose(q.loc.reshape(mean.shape), mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(q.scale.reshape(sd.shape), sd, rtol=1e-10, atol=1e-12)


def test_between_slopes_carry_their_t_statistics():
    """Group means on a group covariate: the least-squares slope, and t^2 = slope^2 / its sampling
    variance; over many datasets the t statistic of a zero slope is ~ t(G - 2): sd about 1."""
    from amortize.nn.least_squares import between_slopes

    gen = torch.Generator().manual_seed(0)
    G = 40
    C = torch.randn(G, 1, generator=gen)
    ybar = 0.5 * torch.randn(4000, G, generator=gen)  # no slope: t ~ t(38)
    beta, t2, _ = between_slopes(ybar, C)
    t = beta.squeeze(-1) / (beta.squeeze(-1).pow(2) / t2.squeeze(-1)).sqrt()
    assert abs(float(t.std()) - (38 / 36) ** 0.5) < 0.05
    ybar = 3.0 * C.T + 0.5 * torch.randn(4000, G, generator=gen)  # a precise slope of 3
    beta, t2, _ = between_slopes(ybar, C)
    assert abs(float(beta.mean()) - 3.0) < 0.01 and float(t2.min()) > 100
    shrunk = beta * t2 / (t2 + 4.0)
    assert torch.allclose(shrunk, beta, rtol=0.05)  # a precise slope passes nearly whole


def test_between_slopes_are_net_of_the_row_covariates():
    """y = 2 x_row + 3 c_group + group noise: the slope of the group means on c mixes in 2 x the
    group means of x_row (they vary by group); net of the pooled within-group slope it reads 3."""
    from amortize.nn import HierarchicalEncoder

    gen = torch.Generator().manual_seed(2)
    data = am.StructureSampler(["group"], groups={"group": (25, 25)}, obs=(3, 8)).sample(gen)
    g = data.index("group")
    c = torch.randn(25, generator=gen)
    x = torch.randn(data.n_obs, generator=gen) + 1.5 * c[g]  # row covariate whose group means track c
    data.covariates = {"obs": {"x": x}, "group": {"c": c}}
    data.covariate_level = {"x": "obs", "c": "group"}
    y = 2.0 * x + 3.0 * c[g] + 0.3 * torch.randn(25, generator=gen)[g] + 0.05 * torch.randn(data.n_obs, generator=gen)
    enc = HierarchicalEncoder(("group",), {"obs": ["x"], "group": ["c"]}, hidden=4)
    stats = enc.statistics(data.with_response(y))
    within, between = float(stats.pooled_slopes[0, 0]), float(stats.levels["group"].between_slopes[0, 0])
    assert abs(within - 2.0) < 0.05 and abs(between - 3.0) < 0.3


def test_scale_statistics_are_those_of_the_group_effects_net_of_covariates():
    """Group means = 2 c + effects of sd 0.1 (plus row noise): the between-group log sd and its excess
    over the noise read the effects' sd, not the spread that c explains (about 2 sd(c))."""
    from amortize.nn import HierarchicalEncoder

    gen = torch.Generator().manual_seed(3)
    data = am.StructureSampler(["group"], groups={"group": (40, 40)}, obs=(20, 30)).sample(gen)
    g = data.index("group")
    c = torch.randn(40, generator=gen)
    data.covariates = {"group": {"c": c}}
    data.covariate_level = {"c": "group"}
    y = 2.0 * c[g] + 0.1 * torch.randn(64, 40, generator=gen)[:, g] + 0.05 * torch.randn(64, data.n_obs, generator=gen)
    enc = HierarchicalEncoder(("group",), {"group": ["c"]}, hidden=4)
    excess = enc.statistics(data.with_response(y)).levels["group"].excess_log_sd  # [64]
    assert abs(float(excess.exp().median()) - 0.1) < 0.02


def test_intercepts_at_covariates_zero():
    """y = 1.5 + 2 x + 3 c_group, covariates with non-zero means: the level's intercept at c = 0 reads
    1.5, the intercept that the standardized statistics cannot see."""
    from amortize.nn import HierarchicalEncoder

    gen = torch.Generator().manual_seed(4)
    data = am.StructureSampler(["group"], groups={"group": (30, 30)}, obs=(4, 8)).sample(gen)
    g = data.index("group")
    c = 2.0 + torch.randn(30, generator=gen)
    x = -1.0 + torch.randn(data.n_obs, generator=gen)
    data.covariates = {"obs": {"x": x}, "group": {"c": c}}
    data.covariate_level = {"x": "obs", "c": "group"}
    y = 1.5 + 2.0 * x + 3.0 * c[g] + 0.1 * torch.randn(8, 30, generator=gen)[:, g]
    enc = HierarchicalEncoder(("group",), {"obs": ["x"], "group": ["c"]}, hidden=4)
    stats = enc.statistics(data.with_response(y))
    assert torch.allclose(stats.levels["group"].between_intercept, torch.full((8,), 1.5), atol=0.15)
    assert torch.allclose(stats.rows_intercept, y.mean(-1) - 2.0 * x.mean(), atol=0.05)  # the rows' (at x = 0)
