"""Several latent sites in one plate share one joint Gaussian data term (amortize/guide.py): exact log
densities of the sequential draw, one-site plates unchanged, hand-set correlations drawn."""

import pyro
import pyro.distributions as dist
import torch

import amortize as am
from amortize.gaussian_terms import gaussian_product
from amortize.guide import AmortizedGuide
from amortize.objectives import log_weights

WIDE = 1e4  # prior sd of the sites below: the data term alone up to (s / WIDE)^2 ~ 1e-8


def two_sites(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("group", data.size("group")):
        a = pyro.sample("a", dist.Normal(mu, WIDE))
        b = pyro.sample("b", dist.Normal(0.0, WIDE))
    with pyro.plate("obs", data.n_obs):
        g = data.index("group")
        pyro.sample("y", dist.Normal(a[..., g] + b[..., g], 1.0), obs=data.y)


def one_site(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("group", data.size("group")):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(theta[..., data.index("group")], 0.5), obs=data.y)


def vector_site(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("group", data.size("group")):
        ab = pyro.sample(
            "ab", dist.MultivariateNormal(mu.unsqueeze(-1).expand(mu.shape + (2,)), WIDE**2 * torch.eye(2))
        )
    with pyro.plate("obs", data.n_obs):
        pyro.sample("y", dist.Normal(ab[..., data.index("group"), :].sum(-1), 1.0), obs=data.y)


def _guide(model, small_sampler, B=2, coupling=False):
    data = small_sampler.sample(torch.Generator().manual_seed(0))
    st = am.trace_structure(model, data)
    sim = am.simulate(model, st, data, B)
    guide = AmortizedGuide(model, st, {}, hidden=16, global_coupling=coupling).double()
    return st, sim.data.to(dtype=torch.float64), guide


def _set_lower(guide, name, values):
    """The head's lower outputs fixed at ``values`` for every group (weights 0, bias = values)."""
    head = guide.group_heads[name]
    with torch.no_grad():
        head.net[-1].weight[2 * head.dim :].zero_()
        head.net[-1].bias[2 * head.dim :] = torch.as_tensor(values, dtype=torch.float64)


def test_plate_joint_log_density_is_the_multivariate_normal_of_the_data_term(small_sampler):
    """With wide priors, log q(a) + log q(b | a) of the guide equals N([a, b]; m, L L^T) with
    L = diag(s) [[1, 0], [c, 1]], computed directly, on draws and on given values (truth)."""
    st, d, guide = _guide(two_sites, small_sampler)
    c = -1.7
    _set_lower(guide, "b", [c])
    with torch.no_grad():
        terms = guide.encode(d)["terms"]
        _, log_q, values = log_weights(guide, d, 6)
        truth = {s.name: values[s.name] for s in st.latents}
        _, log_q_truth, _ = log_weights(guide, d, 6, truth=truth)
        guide(d, 6, truth=truth)
        _, trace = guide.get_traces()
    m = torch.cat([terms["a"][0], terms["b"][0]], -1)  # [B, G, 2]
    s = torch.cat([terms["a"][1], terms["b"][1]], -1)
    T = torch.tensor([[1.0, 0.0], [c, 1.0]], dtype=torch.float64)
    L = s.unsqueeze(-1) * T
    u = torch.stack([values["a"], values["b"]], -1)  # [S, B, G, 2]
    direct = dist.MultivariateNormal(m, scale_tril=L).log_prob(u)  # [S, B, G]
    trace.compute_log_prob()
    per_group = trace.nodes["a"]["log_prob"] + trace.nodes["b"]["log_prob"]  # group dim kept
    assert per_group.shape == direct.shape
    assert torch.allclose(per_group, direct, rtol=1e-6, atol=1e-5)
    assert torch.allclose(log_q, log_q_truth, rtol=1e-8, atol=1e-8)


def test_one_site_plates_compute_what_they_computed(small_sampler):
    """A one-site scalar plate gets no new parameter and no lower output; and with the joint's
    entries at 0 (their start) a two-site plate draws exactly the independent draws, seed for seed."""
    st, d, guide = _guide(one_site, small_sampler)
    assert guide.group_heads["theta"].net[-1].out_features == 2 and guide._joint["theta"].lower_dim == 0
    with torch.no_grad():
        assert guide.encode(d)["lower"] == {}
    st, d, guide = _guide(two_sites, small_sampler, coupling=True)
    assert guide._joint["b"].lower_dim == 1 and guide._joint["a"].lower_dim == 0
    encoded = guide.encode(d)
    independent = {**encoded, "lower": {}}
    with torch.no_grad():
        for latents_only in (False, True):
            torch.manual_seed(3)
            joint = guide(d, 5, encoded=encoded, latents_only=latents_only)
            torch.manual_seed(3)
            plain = guide(d, 5, encoded=independent, latents_only=latents_only)
            for name in ("mu", "a", "b"):
                assert torch.equal(joint[name], plain[name])


def test_two_site_plate_draws_the_hand_set_correlation(small_sampler):
    """corr(a, b) within a group = c / sqrt(1 + c^2) for T = [[1, 0], [c, 1]], on the scoring path's
    draws and on the drawing kernel's (latents only); tolerance 4 Monte Carlo standard errors."""
    st, d, guide = _guide(two_sites, small_sampler, B=1)
    c = 1.2
    rho = c / (1 + c**2) ** 0.5
    _set_lower(guide, "b", [c])
    n = 4000
    tol = 4 * (1 - rho**2) / n**0.5
    with torch.no_grad():
        for latents_only in (False, True):
            draws = guide(d, n, latents_only=latents_only)
            a, b = draws["a"].reshape(n, -1), draws["b"].reshape(n, -1)  # [S, G]
            for g in range(a.shape[-1]):
                r = float(torch.corrcoef(torch.stack([a[:, g], b[:, g]]))[0, 1])
                assert abs(r - rho) < tol, (latents_only, g, r, rho)


def test_vector_site_data_term_has_its_own_correlation(small_sampler):
    """A MultivariateNormal group site: the data term's within-site factor diag(s) T is multiplied
    with the full prior exactly (wide prior: q is the data term); the draws carry T's correlation."""
    st, d, guide = _guide(vector_site, small_sampler, B=1)
    c = -0.8
    _set_lower(guide, "ab", [c])
    n = 4000
    rho = c / (1 + c**2) ** 0.5
    with torch.no_grad():
        ab = guide(d, n)["ab"].reshape(n, -1, 2)
    for g in range(ab.shape[1]):
        r = float(torch.corrcoef(ab[:, g].T)[0, 1])
        assert abs(r - rho) < 4 * (1 - rho**2) / n**0.5


def test_gaussian_product_with_a_full_data_term_matches_the_precision_form():
    """N(m0, L0 L0^T) x N(m, Ls Ls^T): covariance (P0 + S^-1)^-1, mean C (P0 m0 + S^-1 m)."""
    gen = torch.Generator().manual_seed(0)
    d = 3
    A0, A = (
        torch.randn(4, d, d, generator=gen, dtype=torch.float64),
        torch.randn(4, d, d, generator=gen, dtype=torch.float64),
    )
    P0c, Sc = A0 @ A0.mT + 0.1 * torch.eye(d), A @ A.mT + 0.1 * torch.eye(d)
    m0, m = torch.randn(4, d, generator=gen, dtype=torch.float64), torch.randn(4, d, generator=gen, dtype=torch.float64)
    q = gaussian_product(m0, torch.linalg.cholesky(P0c), m, torch.ones(4, d), torch.linalg.cholesky(Sc))
    P0, S_inv = torch.linalg.inv(P0c), torch.linalg.inv(Sc)
    C = torch.linalg.inv(P0 + S_inv)
    mean = (C @ (P0 @ m0.unsqueeze(-1) + S_inv @ m.unsqueeze(-1))).squeeze(-1)
    assert torch.allclose(q.covariance_matrix, C, atol=1e-10) and torch.allclose(q.loc, mean, atol=1e-10)


def three_level(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("district", data.size("district")):
        alpha = pyro.sample("alpha", dist.Normal(mu, 1.0))
        spread = pyro.sample("spread", dist.LogNormal(0.0, 0.5))  # a positive sibling
    p = data.parent_index("school")
    with pyro.plate("school", data.size("school")):
        beta = pyro.sample("beta", dist.Normal(alpha[..., p], spread[..., p]))
        gamma = pyro.sample("gamma", dist.Normal(0.5 * beta, 1.0))  # its prior depends on its sibling
    with pyro.plate("obs", data.n_obs):
        s = data.index("school")
        pyro.sample("y", dist.Normal(beta[..., s] + gamma[..., s], 1.0), obs=data.y)


def test_plate_joints_at_every_level_score_their_own_draws():
    """Two sites per plate at both levels of a 3-level model, many datasets, global coupling on, hand-set
    entries: log q of the guide's draws rescored through ``truth`` equals the density recorded while
    sampling, and the latents-only path draws the same values for the same seed."""
    sampler = am.StructureSampler(["district", "school"], groups={"district": (2, 3), "school": (2, 3)}, obs=(2, 4))
    data = sampler.sample(torch.Generator().manual_seed(0))
    st = am.trace_structure(three_level, data)
    d = am.simulate(three_level, st, data, 3).data.to(dtype=torch.float64)
    guide = AmortizedGuide(three_level, st, {}, hidden=16).double()
    _set_lower(guide, "spread", [0.7])
    _set_lower(guide, "gamma", [-1.1])
    with torch.no_grad():
        torch.manual_seed(5)
        _, log_q, values = log_weights(guide, d, 4)
        truth = {s.name: values[s.name] for s in st.latents}
        _, log_q_truth, _ = log_weights(guide, d, 4, truth=truth)
        torch.manual_seed(5)
        only = guide(d, 4, latents_only=True)
    assert log_q.shape == (4, 3) and torch.isfinite(log_q).all()
    assert torch.allclose(log_q, log_q_truth, rtol=1e-8, atol=1e-8)
    for name in truth:
        assert torch.allclose(only[name], values[name], rtol=1e-8, atol=1e-10)


def test_verdict_holds_the_globals_of_a_two_site_plate(small_sampler):
    """The hierarchical verdict holds only the globals: the plate's second site reads the first's value
    as drawn in the same call (a KeyError on 0.4.0 before the fix), and every k comes back finite."""
    a = am.Amortizer(two_sites, small_sampler, hidden=16, seed=0)
    a.fit(steps=3, batch_size=4, pilot_structures=1, progress=False)
    data = small_sampler.sample(torch.Generator().manual_seed(1))
    data = am.simulate(two_sites, a.structure, data, 1).data
    data = data.with_response(data.y[0])
    d = a.posterior(data).diagnostics(num_samples=400, local_sbc=False)
    assert torch.isfinite(torch.tensor(d["pareto_k"]))
    assert all(torch.isfinite(torch.tensor(v["k_p90"])) for v in d["levels"].values())
