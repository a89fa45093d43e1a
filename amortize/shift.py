"""How far q's globals lie from the posterior that importance weights describe (the verdict's ``shift``).

The verdict's pseudo-marginal weights of S global draws estimate the posterior's moments, so they say
how far q is off in the benchmarks' own unit: per global element ``|E_w x - E_q x| / sd_w x``, an
estimate of q's z against the posterior. ``E_q`` comes from draws of q(globals) alone
(:func:`q_global_draws`, no group drawn), not from the S weighted draws, whose mean errs by q's tail.

Example:
    >>> shift = weighted_shift(drawn, log_weights, q_global_draws(part, encoded, 4000))  # doctest: +SKIP
    >>> shift["z"], shift["site"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["Q_GLOBAL_DRAWS", "weighted_shift", "q_global_draws"]

# Draws of q(globals) alone behind E_q and sd_q in the shift (an se of 0.016 q sds on E_q; no group drawn).
Q_GLOBAL_DRAWS = 4000


def weighted_shift(
    draws: dict[str, torch.Tensor], log_weights: torch.Tensor, q_draws: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """How far q's global draws ``{site: [S, ...]}`` lie from the posterior their normalized log weights
    ``[S]`` describe: per element ``|E_w x - E_q x| / sd_w x`` (an estimate of the z of q's mean against
    the posterior), its Monte Carlo se and ``sd_q / sd_w``; the element with the largest shift (``z``,
    ``se``, ``sd_ratio``, ``site``: ``'tau'``, ``'beta[1]'``). ``q_draws``: more draws of q's globals
    ``{site: [N, ...]}`` for ``E_q`` and ``sd_q`` (the S weighted draws' own mean errs by sd_q / sqrt(S),
    far more than the weighted mean where q has a heavy tail the posterior has not); the se adds
    both errors: ``sqrt(sum w^2 (x - E_w x)^2 + sd_q^2 / N) / sd_w``."""
    w = log_weights.to(torch.float64).exp()
    w = w / w.sum()
    best = {"z": 0.0, "se": 0.0, "sd_ratio": 1.0, "site": ""}
    for site, x in draws.items():
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        q = x if q_draws is None else q_draws[site].to(torch.float64).reshape(q_draws[site].shape[0], -1)
        m_q, s_q = q.mean(0), q.std(0)
        m_w = (w[:, None] * x).sum(0)
        s_w = (w[:, None] * (x - m_w) ** 2).sum(0).sqrt()
        z = torch.where(s_q > 0, (m_w - m_q).abs() / s_w, torch.zeros_like(s_q))
        var_q = s_q**2 / q.shape[0] if q_draws is not None else 0.0
        se = ((w[:, None] ** 2 * (x - m_w) ** 2).sum(0) + var_q).sqrt() / s_w
        i = int(torch.nan_to_num(z, nan=math.inf).argmax())
        if not float(z[i]) <= best["z"]:
            name = site if x.shape[1] == 1 else f"{site}[{i}]"
            best = {"z": float(z[i]), "se": float(se[i]), "sd_ratio": float(s_q[i] / s_w[i]), "site": name}
    return best


def q_global_draws(part: Any, encoded: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
    """``n`` draws of q(globals | y) alone, ``{site: [n, B, ...]}`` (user layout): from the encoding's
    q over the unconstrained globals, without drawing any group (cheap, whatever the design's size)."""
    st = part.structure
    u = encoded["q_globals"].sample((int(n),))
    out, offset = {}, 0
    for site in st.global_sites:
        value, _ = site.constrain(u[..., offset : offset + site.dim])
        out[site.name] = st.to_user(site, value)
        offset += site.dim
    return out
