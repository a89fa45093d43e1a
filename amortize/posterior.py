"""The trained posterior for one dataset: draws, log density, diagnostics, exports.

Training and the trained posterior are separate objects: :class:`~amortize.Amortizer` trains,
:class:`Posterior` only samples, scores, diagnoses and exports.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any

import pyro
import torch

from .data import OBS, HierarchicalData, magnitude_limit
from .errors import DataError
from .structure import drawing_data, seeded
from .importance import K_THRESHOLD, psis
from .ranges import value_flags

if TYPE_CHECKING:
    from .amortizer import Amortizer

__all__ = ["Posterior", "CorrectedDraws", "psis_k", "K_THRESHOLD"]

log = logging.getLogger(__name__)
CHUNK_ELEMENTS = 4e6  # draws x datasets x (rows + groups) per pass of the guide: bounds memory, and keeps
# a pass's [draws, datasets, groups] temporaries near the cache (2e7: 10^4 groups 1.7x slower)


def psis_k(log_weights: torch.Tensor) -> float:
    """Pareto k of importance weights (PSIS, see :mod:`amortize.importance`). Below 0.5 fine,
    0.5-0.7 usable, above 0.7 not to be trusted; NaN with fewer than 25 finite weights."""
    return psis(log_weights).k


class CorrectedDraws(dict):
    """What ``Posterior.sample(n, correct=True)`` returns: ``{site: draws}`` like :meth:`Posterior.sample`,
    plus what the correction did (per dataset for a batch).

    Attributes:
        pareto_k: PSIS k of the proposals' weights.
        ess: importance ESS of the smoothed weights (out of ``num_proposals``).
        corrected: True where the draws are PSIS-resampled; False where k > 0.7 (or NaN) and the
            draws are the uncorrected proposals (a warning is logged).
        num_proposals: proposals drawn per dataset.
    """

    pareto_k: float | list[float]
    ess: float | list[float]
    corrected: bool | list[bool]
    num_proposals: int


class Posterior:
    """q(latents | data) for one dataset (``y [N]``) or B datasets sharing one structure (``[B, N]``)."""

    def __init__(self, amortizer: Amortizer, data: HierarchicalData) -> None:
        self.amortizer = amortizer
        dtype = next(amortizer.guide.parameters()).dtype
        self._check(data, dtype)
        self.data = data.to(amortizer.device, dtype=dtype)  # float data of another precision is cast
        self._skeleton: HierarchicalData | None = None

    def _check(self, data: HierarchicalData, dtype: torch.dtype) -> None:
        """Refuse, before any network runs, a dataset whose structure is not the model's or whose
        values do not fit the network's ``dtype``."""
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
        if not isinstance(data.y, torch.Tensor) or data.y.dim() not in (1, 2) or data.y.shape[-1] != data.n_obs:
            raise DataError(
                f"response '{data.response}': expected shape [N] or [B, N] with N={data.n_obs},"
                f" got {tuple(getattr(data.y, 'shape', ()))}"
            )
        if data.y.numel() == 0:
            raise DataError(f"response '{data.response}': an empty batch of datasets, shape {tuple(data.y.shape)}")
        limit = magnitude_limit(dtype)
        tensors = {f"response '{data.response}'": data.y, **{f"covariate '{k}'": v for k, v in data.x.items()}}
        for what, t in tensors.items():
            if not t.is_floating_point():
                raise DataError(f"{what}: expected floating-point values, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise DataError(f"{what}: NaN or infinite values")
            if float(t.abs().max()) > limit:
                raise DataError(f"{what}: values too large for the network's {dtype} (limit {limit:.2g}); rescale them")
        st.check_response(data)  # a response outside the likelihood's support (a Poisson -1, a Bernoulli 0.5)

    def _drawing_data(self) -> HierarchicalData:
        """What the model runs on while drawing: the skeleton (one row per group) when the model's
        priors do not read its rows, so a draw costs O(groups), not O(rows); the data otherwise."""
        if self._skeleton is None:
            self._skeleton = drawing_data(self.amortizer.model, self.data)
        return self._skeleton

    @property
    def batch_size(self) -> int | None:
        return self.data.batch_size

    @torch.no_grad()
    def sample(
        self, num_samples: int = 1000, seed: int | None = None, correct: bool = False, oversample: int = 4
    ) -> dict[str, torch.Tensor]:
        """Joint posterior draws: ``{site: [num_samples, *site_shape]}`` (``[n, B, ...]`` for a batch).

        Args:
            num_samples: draws per dataset.
            seed: seeds these draws only (the caller's RNG is left as it was).
            correct: importance-sampling correction: draw ``oversample * num_samples`` proposals from
                q, Pareto-smooth their weights p(y, z) / q(z | y) and resample ``num_samples`` of
                them (with replacement) by the smoothed weights. Where k > 0.7 the weights cannot be
                trusted: those draws are returned uncorrected, with a warning, and the result says so
                (:class:`CorrectedDraws`).
            oversample: proposals per returned draw with ``correct``.
        """
        if correct:
            return self._corrected(num_samples, seed, max(1, int(oversample)))
        draws = self._draws(num_samples, seed)[0]
        return {k: v for k, v in draws.items()}

    def _corrected(self, num_samples: int, seed: int | None, oversample: int) -> CorrectedDraws:
        S = oversample * num_samples
        with seeded(seed, self.amortizer.device):
            draws, lw = self._draws_unseeded(S, with_weights=True)
            lw = lw if lw.dim() == 2 else lw.unsqueeze(1)  # [S, B]
            cols, ks, ess, done = [], [], [], []
            for b in range(lw.shape[1]):
                res = psis(lw[:, b])
                ks.append(res.k)
                ess.append(res.ess)
                done.append(res.ok)
                if res.ok:
                    cols.append(torch.multinomial(res.weights, num_samples, replacement=True))
                else:
                    cols.append(torch.arange(num_samples))
        idx = torch.stack(cols, 1)  # [n, B] proposal index per returned draw
        bad = [b for b, ok in enumerate(done) if not ok]
        if bad:
            log.warning(
                "PSIS correction not applied to %s: Pareto k %s > %s; returning uncorrected draws",
                "this dataset" if self.data.batch_size is None else f"datasets {bad}",
                ", ".join(f"{ks[b]:.2f}" for b in bad),
                K_THRESHOLD,
            )
        out = CorrectedDraws()
        for name, v in draws.items():
            if self.data.batch_size is None:
                out[name] = v[idx[:, 0].to(v.device)]
            else:
                out[name] = v[idx.to(v.device), torch.arange(lw.shape[1], device=v.device)]  # [n, B, ...]
        single = self.data.batch_size is None
        out.pareto_k, out.ess, out.corrected = (ks[0], ess[0], done[0]) if single else (ks, ess, done)
        out.num_proposals = S
        return out

    def _draws(
        self, num_samples: int, seed: int | None, with_weights: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        with seeded(seed, self.amortizer.device):  # a seed for these draws only, not for the caller's RNG
            return self._draws_unseeded(num_samples, with_weights)

    def _draws_unseeded(
        self, num_samples: int, with_weights: bool
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        am, st = self.amortizer, self.amortizer.structure
        B = self.data.batch_size or 1
        model_data = self.data if with_weights else self._drawing_data()
        width = B * (model_data.n_obs + sum(self.data.sizes.values()))
        chunk = max(1, min(num_samples, int(CHUNK_ELEMENTS // max(1, width))))
        out: dict[str, list[torch.Tensor]] = {s.name: [] for s in st.latents}
        lws: list[torch.Tensor] = []
        if am.guide.training:  # eval() walks every submodule: only when needed
            am.guide.eval()
        # drawing scores nothing, so Pyro's argument checks (on tensors as large as the data, once
        # per draw: a third of the time) are skipped; log p(y, z) for weights keeps them
        encoded = am.guide.encode(self.data)  # once for all chunks
        with contextlib.nullcontext() if with_weights else pyro.validation_enabled(False):
            for start in range(0, num_samples, chunk):
                n = min(chunk, num_samples - start)
                if with_weights:
                    log_p, log_q, values = am.guide.log_weights(self.data, n, encoded=encoded)
                    lws.append(log_p - log_q)
                else:
                    values = am.guide(self.data, n, encoded=encoded, model_data=model_data, latents_only=True)
                for s in st.latents:
                    v = st.to_user(s, values[s.name])  # [n, B, *site_shape]
                    out[s.name].append(v if self.data.batch_size else v.squeeze(1))
        draws = {k: torch.cat(v) for k, v in out.items()} if num_samples > chunk else {k: v[0] for k, v in out.items()}
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
            res = psis(lw[:, b])
            ks.append(res.k)
            ess.append(res.ess)  # of the Pareto-smoothed weights
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
        """Ways in which this dataset lies outside what the amortizer was trained on: structure
        (groups per level, observations per group), response scale (mean, log sd) and covariate values."""
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
        return flags + value_flags(d, ranges)

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
