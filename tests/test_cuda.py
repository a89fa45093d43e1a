"""The library on a CUDA device: every shipped model trains and draws there, a CUDA checkpoint loads
and continues on the CPU (and back), the two devices give the same densities for the same weights,
and the trust verdict, the PSIS correction and the subsampled source run on the device.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
``AMORTIZE_TEST_DEVICE`` names another device (``cpu`` checks the tests themselves anywhere).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import amortize as am
from amortize import models

from .conftest import normal_known

CUDA = torch.device(os.environ.get("AMORTIZE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def _dataset(a: am.Amortizer, seed: int) -> am.HierarchicalData:
    """One prior-predictive dataset of ``a``'s sampler, on the CPU."""
    sim = a.simulate_batch(torch.Generator().manual_seed(seed), 1)
    return sim.data.with_response(sim.data.y[0]).to("cpu")


def _finite(draws: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in draws.values())


@pytest.mark.parametrize("name", sorted(models.SAMPLERS))
def test_every_shipped_model_trains_and_draws_on_cuda(name: str) -> None:
    model = getattr(models, name)
    a = am.Amortizer(model, models.SAMPLERS[name](), hidden=16, seed=0, device=CUDA)
    history = a.fit(steps=6, batch_size=8, progress=False, pilot_structures=2)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all(p.device.type == CUDA.type for p in a.guide.parameters())
    draws = a.posterior(_dataset(a, 1)).sample(50, seed=0)
    assert _finite(draws)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[am.Amortizer, Path]:
    sampler = am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6))
    a = am.Amortizer(normal_known, sampler, hidden=16, seed=0, device=CUDA)
    path = tmp_path_factory.mktemp("cuda") / "ck.pt"
    a.fit(steps=40, batch_size=16, progress=False, checkpoint_path=str(path), stop_at=20)
    return a, path


def test_a_cuda_checkpoint_gives_the_same_densities_on_the_cpu(trained) -> None:
    a, path = trained
    cpu = am.Amortizer.load(path, normal_known, device="cpu")
    gpu = am.Amortizer.load(path, normal_known, device=CUDA)
    data = _dataset(cpu, 3)
    draws = gpu.posterior(data).sample(200, seed=0)
    lp_gpu = torch.as_tensor(gpu.posterior(data).log_prob(draws)).cpu()
    lp_cpu = torch.as_tensor(cpu.posterior(data).log_prob({k: v.cpu() for k, v in draws.items()})).cpu()
    assert torch.isfinite(lp_cpu).all()
    torch.testing.assert_close(lp_cpu, lp_gpu, rtol=1e-4, atol=1e-3)


def test_a_cuda_run_resumes_on_the_cpu_and_back(trained, tmp_path: Path) -> None:
    _, path = trained
    sampler = am.StructureSampler(["group"], groups={"group": (3, 8)}, obs=(2, 6))
    cpu = am.Amortizer.load(path, normal_known, sampler=sampler, device="cpu")
    assert cpu.step == 20
    cpu.fit(steps=40, batch_size=16, progress=False, stop_at=30, checkpoint_path=str(tmp_path / "cpu.pt"))
    back = am.Amortizer.load(tmp_path / "cpu.pt", normal_known, sampler=sampler, device=CUDA)
    history = back.fit(steps=40, batch_size=16, progress=False)
    assert back.step == 40 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_the_verdict_and_the_correction_run_on_cuda(trained) -> None:
    a, _ = trained
    post = a.posterior(_dataset(a, 5))
    diag = post.diagnostics(400, seed=0, local_sbc=True)
    assert isinstance(diag["ok"], bool) and diag["reason"]
    assert diag["local_sbc"] is not None
    corrected = post.sample(200, seed=0, correct=True)
    assert _finite({k: v for k, v in corrected.items() if torch.is_tensor(v)})


def test_the_subsampled_source_trains_on_cuda() -> None:
    sampler = am.StructureSampler(["group"], groups={"group": (60, 60)}, obs=(3, 3))
    data = _dataset(am.Amortizer(normal_known, sampler, hidden=8, seed=0), 0)
    a = am.Amortizer(normal_known, data.with_response(None), hidden=8, flow_bins=0, seed=0, device=CUDA)
    a.fit(source=am.Subsampled(data, groups_per_step=16), steps=6, batch_size=4, progress=False)
    theta = a.posterior(data).sample(20, seed=0)["theta"]
    assert theta.shape[-1] == 60 and torch.isfinite(theta).all()
