"""The training step's faster implementation computes what the plain formulas compute (encoder pooling,
the group heads' split first layers, the batch in pieces), and the benchmark that measures it runs.

Each equality is to float32 rounding; each test also checks that the tolerance is far below what a
real change moves (a perturbed input, another dataset), so it can fail."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import amortize as am
from amortize.models import SAMPLERS, gaussian_3level, logistic_3level
from amortize.nn.data_terms import group_terms, site_term
from amortize.nn.encoder import term_features
from amortize.objectives import backward_in_chunks, batch_loss, chunk_datasets

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "real_designs.py"


def _fitted(model, name: str, seed: int = 0) -> am.Amortizer:
    a = am.Amortizer(model, SAMPLERS[name](), hidden=16, seed=seed)
    a.fit(steps=1, batch_size=8, pilot_structures=1, progress=False, stop_at=0)  # the pilot: scalers and skip paths
    with torch.no_grad():  # weights away from their zero / small initializations
        for p in a.guide.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return a


def _plain_encoder(enc, data, terms):
    """The encoder as the plain formulas write it: each level's network on its statistics, data terms and
    its children's mean embedding; the dataset network on the dataset's statistics and the groups' mean."""
    stats = enc.statistics(data)
    groups, child = {}, None
    for i in reversed(range(len(enc.levels))):
        lvl = enc.levels[i]
        G = data.size(lvl)
        parts = [enc.scalers[lvl](stats.levels[lvl].features)]
        if lvl in enc.term_dims:
            parts.append(enc.term_scalers[lvl](term_features(terms[lvl])))
        if child is not None:
            cidx = data.parent_index(enc.levels[i + 1])
            members = [child[:, cidx == g].mean(1) for g in range(G)]  # one group at a time
            parts.append(torch.stack(members, 1))
        child = groups[lvl] = enc.nets[lvl](torch.cat(parts, -1))
    top = groups[enc.levels[0]].mean(-2)
    dataset = enc.global_net(torch.cat([enc.global_scaler(stats.features), top], -1))
    return dataset, groups


def _plain_head(head, group_emb, dataset_emb):
    """The group head's networks on the concatenated [group, dataset] embedding."""
    features = torch.cat([group_emb, dataset_emb.unsqueeze(-2).expand_as(group_emb)], -1)
    return head.net(features), None if head.coupling is None else head.coupling(features)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("model, name", [(gaussian_3level, "gaussian_3level"), (logistic_3level, "logistic_3level")])
def test_encoder_pools_the_levels_as_the_plain_formula(model, name):
    a = _fitted(model, name)
    enc = a.guide.encoder
    sim = a.simulate_batch(torch.Generator().manual_seed(1), 5)
    terms = group_terms(a.guide.user_model, a.structure, sim.data)
    fast = enc(sim.data, terms)
    dataset, groups = _plain_encoder(enc, sim.data, terms)
    assert _close(fast.dataset, dataset) < 1e-5
    for lvl in enc.levels:
        assert _close(fast.groups[lvl], groups[lvl]) < 1e-5
    y = sim.data.y.clone()
    y[0, 0] += 1.0  # one row changed: the embedding moves far beyond the tolerance
    assert _close(enc(sim.data.with_response(y), terms).dataset[0], dataset[0]) > 1e-3


def test_group_head_split_first_layers_equal_the_concatenated_networks():
    a = _fitted(logistic_3level, "logistic_3level")
    sim = a.simulate_batch(torch.Generator().manual_seed(2), 4)
    terms = group_terms(a.guide.user_model, a.structure, sim.data)
    enc = a.guide.encoder(sim.data, terms)
    for name, head in a.guide.group_heads.items():
        level = a.structure[name].level
        g, d = enc.groups[level], enc.dataset
        out, coupling = _plain_head(head, g, d)
        # the head's outputs are affine in its networks' outputs: recompute them from the plain networks
        stats = enc.statistics.levels[level].groups
        term = site_term(terms[level], a.structure.sites_at(level), name)
        loc, scale, coup, _ = head(g, d, stats, term)
        log_unit = head.raw_scale(torch.stack([stats.unit_log_sd, stats.unit_log_n], -1))
        base = head.raw(torch.stack([stats.mean, stats.dataset_mean], -1))
        if head.raw_slope is not None:
            log_unit = log_unit + head.raw_slope_scale(stats.measurement_log_precisions())
            base = base + head.raw_slope(stats.measurements())
        loc_t, prec_t = head.term_range(term)
        log_unit, base = log_unit + head.raw_term_scale(prec_t), base + head.raw_term(loc_t)
        unit = log_unit.clamp(-30.0, 30.0).exp()
        assert _close(loc, base + unit * out[..., : head.dim]) < 1e-5
        assert _close(coup, unit.unsqueeze(-1) * coupling.reshape(*loc.shape, head.global_dim)) < 1e-5
        other = head(g, d.roll(1, 0), stats, term)[0]  # another dataset's embedding: far beyond the tolerance
        assert _close(other, loc) > 1e-3


@pytest.mark.parametrize("objective", ["npe", "elbo"])
def test_the_batch_in_pieces_gives_the_loss_and_gradients_of_the_whole_batch(objective, monkeypatch):
    a = _fitted(gaussian_3level, "gaussian_3level")
    cfg = am.TrainConfig(objective=objective, num_particles=2)
    sim = a.simulate_batch(torch.Generator().manual_seed(3), 6)
    params = list(a.guide.parameters())

    def grads() -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

    torch.manual_seed(0)
    whole = batch_loss(a, cfg, sim)
    whole.backward()
    g_whole = grads()
    a.guide.zero_grad(set_to_none=True)
    import amortize.objectives as objectives

    particles = 1 if objective == "npe" else cfg.num_particles
    width = particles * (sim.data.n_obs + sum(sim.data.sizes.values()))
    monkeypatch.setattr(objectives, "TRAIN_CHUNK_ELEMENTS", 2.5 * width)  # pieces of 2 datasets
    assert len(sim.split(chunk_datasets(sim.data, particles))) == 3
    torch.manual_seed(0)
    value = backward_in_chunks(a, cfg, sim)
    if objective == "npe":  # no draws: the same numbers, in another order
        assert abs(value - float(whole)) < 1e-5 * abs(float(whole)) + 1e-6
        assert _close(grads(), g_whole) < 1e-4
    else:  # fresh draws per piece: the same estimator, another Monte Carlo draw
        assert value == value and bool(torch.isfinite(grads()).all())


def test_simulation_split_keeps_datasets_and_counts():
    a = _fitted(gaussian_3level, "gaussian_3level")
    sim = a.simulate_batch(torch.Generator().manual_seed(4), 7)
    sim.dropped = {"y": 2}
    pieces = sim.split(3)
    assert [p.data.batch_size for p in pieces] == [3, 3, 1]
    assert torch.equal(torch.cat([p.data.y for p in pieces]), sim.data.y)
    for name, value in sim.latents.items():
        assert torch.equal(torch.cat([p.latents[name] for p in pieces], 1), value)
    assert [p.requested for p in pieces] == [7, 0, 0] and [p.dropped for p in pieces] == [{"y": 2}, {}, {}]
    assert sim.split(7) == [sim]


def test_real_designs_bench_runs_at_tiny_sizes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("real_designs", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "real_designs", bench)
    spec.loader.exec_module(bench)
    md = tmp_path / "copy" / "throughput.md"
    args = ["--scale", "0.05", "--batch-sizes", "4", "--sweep-groups", "5", "20", "--sweep-batch", "4"]
    args += ["--repeats", "1", "--budget", "1", "--usable", "50", "--out", str(tmp_path / "out"), "--copy-md", str(md)]
    assert bench.main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["designs"]) == len(bench.DESIGNS) and len(results["sweep"]) == 2
    for row in results["designs"] + results["sweep"]:
        assert row["step_s"] > 0 and row["rows_per_s"] > 0
        parts = sum(row[f"{k}_s"] for k in bench.PHASES)
        assert abs(parts - row["step_s"]) < 1e-9 * max(1.0, row["step_s"])
    assert 0.0 < results["prior_predictive"]["usable_share"] <= 1.0
    assert md.read_text() == (tmp_path / "out" / "results.md").read_text()


def test_pilot_with_more_group_rows_than_it_fits_on(monkeypatch):
    """A pilot with more groups x datasets than the heads fit on (10^4 groups x 64 datasets against
    200,000 rows) cuts every candidate statistic to the same rows and gives finite parameters."""
    import amortize.nn.heads as heads

    monkeypatch.setattr(heads, "PILOT_ROWS", 50)
    a = _fitted(am.models.gaussian_2level, "gaussian_2level")  # 8 datasets x 10-50 groups > 50 rows
    assert a.pilot_done
    assert all(torch.isfinite(p).all() for p in a.guide.parameters())
    assert all(torch.isfinite(b).all() for b in a.guide.buffers() if b.is_floating_point())
