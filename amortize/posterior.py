"""The trained posterior for one dataset: draws, log density, diagnostics, exports.

Training and the trained posterior are separate objects: :class:`~amortize.Amortizer` trains,
:class:`Posterior` only samples, scores, diagnoses and exports.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from pyro.ops.stats import fit_generalized_pareto

from .data import OBS, HierarchicalData
from .errors import DataError

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = ["Posterior", "psis_k"]

log = logging.getLogger(__name__)
K_THRESHOLD = 0.7


def psis_k(log_weights: torch.Tensor) -> float:
    """Pareto k of importance weights (Vehtari et al., PSIS): the shape of a generalized Pareto fit
    to the largest weights. Below 0.5 fine, 0.5-0.7 usable, above 0.7 not to be trusted."""
    lw = log_weights.double().flatten()
    lw = lw[torch.isfinite(lw)]
    S = lw.numel()
    M = int(min(0.2 * S, 3 * math.sqrt(S)))
    if M < 5:
        return float("nan")
    srt, _ = torch.sort(lw)
    cutoff = srt[-M - 1]
    tail = torch.exp(srt[-M:] - srt[-1]) - torch.exp(cutoff - srt[-1])
    if not bool(tail[int(M / 4 - 0.5)] > 0):  # the weights span > ~700 nats: the largest one is all there is
        return float("inf")
    k, _ = fit_generalized_pareto(tail)
    return float(k)


class Posterior:
    """q(latents | data) for one dataset (``y [N]``) or B datasets sharing one structure (``[B, N]``)."""

    def __init__(self, amortizer: Amortizer, data: HierarchicalData) -> None:
        self.amortizer = amortizer
        self._check(data)
        dtype = next(amortizer.guide.parameters()).dtype
        self.data = data.to(amortizer.device, dtype=dtype)  # float data of another precision is cast

    def _check(self, data: HierarchicalData) -> None:
        """Refuse, before any network runs, a dataset whose structure is not the model's."""
        if not isinstance(data, HierarchicalData):
            raise DataError(
                f"posterior: expected a HierarchicalData (see HierarchicalData.from_frame), got {type(data).__name__}"
            )
        st = self.amortizer.structure
        if tuple(data.levels) != tuple(st.levels):
            missing = [lvl for lvl in st.levels if lvl not in data.levels]
            extra = [lvl for lvl in data.levels if lvl not in st.levels]
            what = "in another order"
            if missing or extra:
                what = f"missing {missing}, not in the model {extra}"
            raise DataError(f"data has levels {list(data.levels)}; the model was trained on {list(st.levels)} ({what})")
        trained = self.amortizer.covariates
        for lvl, names in trained.items():
            for name in names:
                if name not in data.covariates.get(lvl, {}):
                    where = "observation" if lvl == OBS else f"'{lvl}'"
                    found = data.covariate_level.get(name)
                    also = f"; the data has it at level '{found}'" if found else ""
                    raise DataError(f"covariate '{name}' ({where} level) is missing from the data{also}")
        for name, lvl in data.covariate_level.items():
            if name not in trained.get(lvl, []):
                raise DataError(
                    f"covariate '{name}' (level '{lvl}') was not in the training data"
                    f" (trained with {trained or 'no covariates'}); drop it or retrain"
                )
        if data.y is None:
            raise DataError(f"the data has no response ('{data.response}')")
        tensors = {f"response '{data.response}'": data.y, **{f"covariate '{k}'": v for k, v in data.x.items()}}
        for what, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise DataError(
                    f"{what}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"
                )
        if data.y.dim() not in (1, 2) or data.y.shape[-1] != data.n_obs:
            raise DataError(
                f"response '{data.response}': expected shape [N] or [B, N] with N={data.n_obs},"
                f" got {tuple(data.y.shape)}"
            )
        if not bool(torch.isfinite(data.y).all()):
            raise DataError(f"response '{data.response}': NaN or infinite values")

    @property
    def batch_size(self) -> int | None:
        return self.data.batch_size

    @torch.no_grad()
    def sample(self, num_samples: int = 1000, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Joint posterior draws: ``{site: [num_samples, *site_shape]}`` (``[n, B, ...]`` for a batch)."""
        draws = self._draws(num_samples, seed)[0]
        return {k: v for k, v in draws.items()}

    def _draws(
        self, num_samples: int, seed: int | None, with_weights: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        if seed is None:
            return self._draws_unseeded(num_samples, with_weights)
        with torch.random.fork_rng(devices=[]):  # a seed for these draws only, not for the caller's RNG
            torch.manual_seed(seed)
            return self._draws_unseeded(num_samples, with_weights)

    def _draws_unseeded(
        self, num_samples: int, with_weights: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        am, st = self.amortizer, self.amortizer.structure
        B = self.data.batch_size or 1
        width = B * (self.data.n_obs + sum(self.data.sizes.values()))
        chunk = max(1, min(num_samples, int(2e7 // max(1, width))))
        out: dict[str, list[torch.Tensor]] = {s.name: [] for s in st.latents}
        lws: list[torch.Tensor] = []
        am.guide.eval()
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            if with_weights:
                log_p, log_q, values = am.guide.log_weights(self.data, n)
                lws.append(log_p - log_q)
            else:
                values = am.guide(self.data, n)
            for s in st.latents:
                v = st.to_user(s, values[s.name])  # [n, B, *site_shape]
                out[s.name].append(v if self.data.batch_size else v.squeeze(1))
        draws = {k: torch.cat(v) for k, v in out.items()}
        return draws, (torch.cat(lws) if with_weights else None)

    @torch.no_grad()
    def log_prob(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """log q(values | data) for draws in the layout :meth:`sample` returns: ``[n]`` (or ``[n, B]``)."""
        st = self.amortizer.structure
        truth = {}
        for s in st.latents:
            v = values[s.name]
            v = v if self.data.batch_size else v.unsqueeze(1)  # [n, B, ...]
            truth[s.name] = st.from_user(s, v)
        n = next(iter(truth.values())).shape[0]
        _, log_q, _ = self.amortizer.guide.log_weights(self.data, n, truth=truth)
        return log_q if self.data.batch_size else log_q.squeeze(1)

    @torch.no_grad()
    def diagnostics(self, num_samples: int = 1000, seed: int | None = 0) -> dict[str, Any]:
        """Per-dataset trust: Pareto k of the weights p(y, z) / q(z | y), importance ESS, and flags for
        structure outside the training range. ``ok`` is False when k > 0.7 or a flag is raised."""
        _, lw = self._draws(num_samples, seed, with_weights=True)
        lw = lw if lw.dim() == 2 else lw.unsqueeze(1)  # [S, B]
        ks, ess = [], []
        for b in range(lw.shape[1]):
            w = torch.softmax(lw[:, b].double(), 0)
            ks.append(psis_k(lw[:, b]))
            ess.append(float(1.0 / (w * w).sum()))
        flags = self.range_flags()
        worst = max((k for k in ks if not math.isnan(k)), default=float("nan"))
        ok = not flags and not (worst > K_THRESHOLD)
        if not ok:
            log.warning("posterior may not be trustworthy: pareto k %.2f, flags %s", worst, flags)
        single = self.data.batch_size is None
        return {
            "pareto_k": ks[0] if single else ks,
            "ess": ess[0] if single else ess,
            "num_samples": num_samples,
            "flags": flags,
            "ok": ok,
        }

    def range_flags(self) -> list[str]:
        """Ways in which this dataset's structure lies outside what the amortizer was trained on."""
        ranges = self.amortizer.ranges
        d = self.data
        flags = []
        levels = list(d.levels)
        lo, hi = ranges[levels[0]]
        if not lo <= d.size(levels[0]) <= hi:
            flags.append(f"level '{levels[0]}': {d.size(levels[0])} groups, trained on {lo}-{hi}")
        for above, lvl in zip(levels, levels[1:]):
            c = torch.bincount(d.parent_index(lvl), minlength=d.size(above))
            lo, hi = ranges[lvl]
            if int(c.min()) < lo or int(c.max()) > hi:
                flags.append(f"level '{lvl}': {int(c.min())}-{int(c.max())} per '{above}' group, trained on {lo}-{hi}")
        c = d.counts(levels[-1])
        lo, hi = ranges["obs"]
        if int(c.min()) < lo or int(c.max()) > hi:
            flags.append(f"observations: {int(c.min())}-{int(c.max())} per '{levels[-1]}' group, trained on {lo}-{hi}")
        return flags

    def to_arviz(self, num_samples: int = 1000, seed: int | None = None) -> Any:
        """ArviZ InferenceData with dims named after the levels and coords from the data's group ids."""
        try:
            import arviz as az
        except ImportError as e:  # pragma: no cover - optional dependency
            raise ImportError("to_arviz needs ArviZ: pip install 'amortize[arviz]'") from e
        if self.data.batch_size:
            raise DataError("to_arviz takes one dataset; index the batch first")
        draws = self.sample(num_samples, seed)
        st = self.amortizer.structure
        dims, coords = {}, {}
        for s in st.latents:
            dd = [s.level] if s.level else []
            dd += [f"{s.name}_dim_{i}" for i in range(len(s.event_shape))]
            dims[s.name] = dd
            if s.level:
                coords[s.level] = self.data.labels.get(s.level, list(range(self.data.size(s.level))))
        posterior = {k: v.unsqueeze(0).cpu().numpy() for k, v in draws.items()}  # one "chain"
        return az.from_dict(posterior=posterior, dims=dims, coords=coords)

    def summary(self, num_samples: int = 1000, seed: int | None = None, prob: float = 0.9) -> str:
        """A plain table: one row per site and element with mean, sd and a central interval."""
        draws = self.sample(num_samples, seed)
        lo_q, hi_q = (1 - prob) / 2, 1 - (1 - prob) / 2
        rows = [f"{'':>16} {'mean':>10} {'sd':>10} {f'{lo_q:.0%}':>10} {f'{hi_q:.0%}':>10}"]
        for name, v in draws.items():
            flat = v.reshape(v.shape[0], -1)
            labels = self.data.labels.get(self.amortizer.structure[name].level or "", None)
            for j in range(flat.shape[1]):
                x = flat[:, j]
                tag = (
                    name
                    if flat.shape[1] == 1
                    else f"{name}[{labels[j] if labels and len(labels) == flat.shape[1] else j}]"
                )
                q = torch.quantile(x, torch.tensor([lo_q, hi_q], dtype=x.dtype))
                rows.append(f"{tag:>16} {x.mean():>10.3f} {x.std():>10.3f} {q[0]:>10.3f} {q[1]:>10.3f}")
        return "\n".join(rows)
