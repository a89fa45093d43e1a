"""Likelihood data terms (score, information, one Newton step) by autograd through the user's model."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import amortize as am
from amortize.models import SAMPLERS, gaussian_2level, poisson_3level, varying_slopes
from amortize.nn.data_terms import data_terms, reference_point
from amortize.structure import trace_structure


def simulated(model, sampler, seed: int = 0, batch: int | None = None) -> am.HierarchicalData:
    """A structure from ``sampler`` with responses simulated from the model (``[batch, N]`` if given)."""
    gen = torch.Generator().manual_seed(seed)
    d = sampler.sample(gen)
    pyro.set_rng_seed(seed)
    ys = [poutine.trace(model).get_trace(d).nodes["y"]["value"] for _ in range(batch or 1)]
    return d.with_response(torch.stack(ys) if batch else ys[0])


def group_means(d: am.HierarchicalData, level: str) -> torch.Tensor:
    idx = d.index(level)
    y = d.y if d.y.dim() == 2 else d.y[None]
    sums = torch.zeros(y.shape[0], d.size(level), dtype=y.dtype).index_add_(1, idx, y)
    return sums / torch.bincount(idx, minlength=d.size(level)).to(y.dtype)


def test_gaussian_newton_step_is_the_group_mean_and_information_n_over_sigma2():
    sampler = am.StructureSampler(["group"], groups={"group": (5, 9)}, obs=(1, 12))
    d = simulated(gaussian_2level, sampler, batch=3)
    st = trace_structure(gaussian_2level, d)
    ref = reference_point(gaussian_2level, st, d)
    term = data_terms(gaussian_2level, st, d, ref)["group"]
    assert term.sites == ("theta",)
    torch.testing.assert_close(term.location[..., 0], group_means(d, "group"))
    n = torch.bincount(d.index("group")).to(d.y.dtype)
    torch.testing.assert_close(term.information[..., 0, 0], n / ref["sigma"].reshape(3, 1) ** 2)


def test_two_coordinates_per_group_give_the_groups_least_squares_fit():
    """varying_slopes: b = (intercept, slope) per group; one Newton step is the group's OLS fit, and the
    information is X_g^T X_g / sigma^2 with its off-diagonal (the intercept-slope coupling)."""
    d = simulated(varying_slopes, SAMPLERS["varying_slopes"](), seed=3)
    st = trace_structure(varying_slopes, d)
    ref = reference_point(varying_slopes, st, d)
    term = data_terms(varying_slopes, st, d, ref)["group"]
    idx, x = d.index("group"), d.x["x"]
    sigma2 = ref["sigma"].reshape(()) ** 2
    for g in range(d.size("group")):
        rows = idx == g
        if rows.sum() < 2:
            continue
        X = torch.stack([torch.ones_like(x[rows]), x[rows]], -1)
        ols = torch.linalg.lstsq(X, d.y[rows, None]).solution[:, 0]
        torch.testing.assert_close(term.location[0, g], ols, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(term.information[0, g], X.T @ X / sigma2, rtol=1e-4, atol=1e-4)
    assert term.information[0, :, 0, 1].abs().max() > 0


def test_poisson_terms_are_finite_for_groups_without_counts_and_newton_moves_towards_the_mle():
    d = simulated(poisson_3level, SAMPLERS["poisson_3level"](), seed=1)
    y = d.y.clone()
    county = d.index("county")
    y[county == 0] = 0.0  # a county without a single count
    d = d.with_response(y)
    st = trace_structure(poisson_3level, d)
    terms = data_terms(poisson_3level, st, d)
    county_term = terms["county"]
    assert torch.isfinite(county_term.location).all() and (county_term.information > 0).all()
    # the county's MLE of log rate: log(sum y / sum exposure); a Newton step from the reference gets closer
    expo = torch.zeros(d.size("county")).index_add_(0, county, d.x["exposure"])
    counts = torch.zeros(d.size("county")).index_add_(0, county, y)
    has = counts > 0
    mle = (counts[has] / expo[has]).log()
    before = (county_term.reference[0, has, 0] - mle).abs()
    after = (county_term.location[0, has, 0] - mle).abs()
    assert (after <= before + 1e-6).float().mean() > 0.9
    # upper levels are not read by the likelihood directly: no information there
    assert terms["nation"].information.abs().max() == 0


def test_a_batch_gives_each_dataset_its_own_terms():
    sampler = am.StructureSampler(["group"], groups={"group": (4, 4)}, obs=(3, 3))
    d = simulated(gaussian_2level, sampler, batch=4)
    st = trace_structure(gaussian_2level, d)
    batch = data_terms(gaussian_2level, st, d)["group"]
    for b in range(4):
        one = data_terms(gaussian_2level, st, d.with_response(d.y[b]))["group"]
        torch.testing.assert_close(batch.location[b], one.location[0])
        torch.testing.assert_close(batch.information[b], one.information[0])


def test_heavy_tailed_prior_gets_a_finite_reference():
    def model(data):
        s = pyro.sample("s", dist.HalfCauchy(1.0))  # mean infinite: the reference is a median of draws
        with pyro.plate("group", data.size("group")):
            t = pyro.sample("t", dist.Normal(0.0, s))
        with pyro.plate("obs", data.n_obs):
            pyro.sample("y", dist.StudentT(3.0, t[..., data.index("group")], 1.0), obs=data.y)

    sampler = am.StructureSampler(["group"], groups={"group": (3, 3)}, obs=(4, 4))
    d = simulated(model, sampler)
    st = trace_structure(model, d)
    terms = data_terms(model, st, d)
    assert all(torch.isfinite(t.location).all() for t in terms.values())
    with pytest.raises(AssertionError):  # Student-t: the Newton step is not the group mean
        torch.testing.assert_close(terms["group"].location[..., 0], group_means(d, "group"))


def test_mode_iterations_bring_the_poisson_location_to_the_group_mle_and_leave_gaussian_terms_exact():
    d = simulated(poisson_3level, SAMPLERS["poisson_3level"](), seed=2)
    st = trace_structure(poisson_3level, d)
    county = d.index("county")
    expo = torch.zeros(d.size("county")).index_add_(0, county, d.x["exposure"])
    counts = torch.zeros(d.size("county")).index_add_(0, county, d.y)
    has = counts > 0
    mle = (counts[has] / expo[has]).log()
    errors = []
    for it in (0, 6):
        loc = data_terms(poisson_3level, st, d, iterations=it)["county"].location[0, has, 0]
        errors.append((loc - mle).abs().max())
    assert errors[1] < 0.1 * errors[0] and errors[1] < 0.05
    sampler = am.StructureSampler(["group"], groups={"group": (5, 9)}, obs=(1, 12))
    g = simulated(gaussian_2level, sampler, batch=2)
    st = trace_structure(gaussian_2level, g)
    torch.testing.assert_close(
        data_terms(gaussian_2level, st, g, iterations=3)["group"].location[..., 0], group_means(g, "group")
    )


def test_singular_information_gives_a_finite_newton_step():
    """A group whose covariate does not vary sees its intercept and slope only in one direction: the
    information is singular, the covariance floored (relative to its largest eigenvalue), the location finite."""
    from amortize.nn.data_terms import DataTerm

    x = torch.tensor([1.0, 2.0])
    info = 40.0 * torch.outer(x, x).reshape(1, 1, 2, 2)  # rank one
    term = DataTerm(("b",), torch.zeros(1, 1, 2), torch.tensor([[[3.0, 6.0]]]), info)
    assert torch.isfinite(term.covariance).all() and torch.isfinite(term.location).all()
    vals = torch.linalg.eigvalsh(term.precision.double())
    assert vals.min() > 0 and abs(float(vals.max()) - 200.0) < 1e-3  # the seen direction kept exactly
    # along the seen direction (x, eigenvalue 200) the step is x . score / 200; float32 rounding of the
    # unseen direction (~1e-7 of the score) is divided by the floor (1e-6 x 200): a 1e-3 tolerance
    assert abs(float(term.location[0, 0] @ x) - 15.0 / 200.0) < 1e-3


def test_group_head_reads_the_term_within_the_range_of_its_prior_simulations():
    """GroupHead.fit saves (TermRange) the central 99.8% of the simulated terms; a term beyond (or NaN) is read at
    that range's edge (middle), so an extreme dataset moves the skip path no further than the simulations."""
    from amortize.nn import GroupHead
    from amortize.nn.statistics import GroupStatistics

    gen = torch.Generator().manual_seed(0)
    M = 4000
    u = torch.randn(M, 1, generator=gen)
    loc = u + 0.3 * torch.randn(M, 1, generator=gen)
    log_prec = torch.full((M, 1), 2.4)
    mean = u + torch.randn(M, 1, generator=gen)
    zeros = torch.zeros(M)
    stats = GroupStatistics(mean=mean[:, 0], dataset_mean=zeros, unit_log_sd=zeros, unit_log_n=zeros + 1.0)
    head = GroupHead(8, 1)
    head.fit(stats, u, (loc, log_prec))
    lo, hi = torch.quantile(loc[:, 0], torch.tensor([0.001, 0.999]))
    assert (
        abs(float(head.term_range.bounds[0, 0, 0] - lo)) < 1e-5
        and abs(float(head.term_range.bounds[1, 0, 0] - hi)) < 1e-5
    )
    assert (
        float(head.raw_term.weight.detach()[0, 0]) > 0.8
    )  # the term, the best-correlated candidate, is the location's path
    far = torch.tensor([[1e9], [-1e9], [float("nan")]])
    b_loc, b_prec = head.term_range((far, torch.full((3, 1), 2.4)))
    torch.testing.assert_close(b_loc[:, 0], torch.stack([hi, lo, 0.5 * (lo + hi)]))
    assert torch.isfinite(b_prec).all()
