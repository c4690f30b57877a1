"""Geometry of a layer's hidden states: effective dimensionality (two forms), spectral decay beta, norms.

The input is a matrix [n, H] (n states: tokens or texts of one layer). Everything is computed in float64 from the
singular values of that matrix (not mean-centred, as the original project's README computes D_eff), so a bfloat16
or float16 tensor never reaches a linear-algebra routine that does not support it.

- ``deff_entropy``: exp(H), H = -sum p_i log p_i with p_i = s_i^2 / sum s_j^2 (the original README's formula).
  A rank-1 matrix gives 1; n orthogonal rows of equal norm give n.
- ``deff_90``: the fewest directions holding 90% of sum s_i^2 (the variance form).
- ``beta``: the power-law decay exponent of the spectrum, the slope of log(s_i^2) against log(i) by least squares
  over the non-zero values, negated: s_i^2 proportional to i^-beta gives beta. 0 for a flat (isotropic) spectrum;
  larger means faster decay, i.e. more collapse ("lower is better", as the original README reads it). With fewer
  than two non-zero values (rank 0 or 1) there is no slope: NaN, as scipy's ``linregress`` gives for one point
  (``POST /analyze`` answers a 422 there). This is our definition: the original README names beta a collapse
  indicator without a formula.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ZERO = 1e-10  # relative: squared singular values below ZERO * the largest count as zero


def spectrum(states: Any) -> np.ndarray:
    """Squared singular values of ``states`` ([n, H] or [H]; a torch tensor or array), largest first, float64."""
    if hasattr(states, "detach"):
        states = states.detach().float().cpu().numpy()
    x = np.asarray(states, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected a non-empty [n, H] matrix, got shape {x.shape}")
    s2 = np.linalg.svd(x, compute_uv=False) ** 2
    return s2[s2 > ZERO * s2.max()] if s2.max() > 0 else s2[:0]


def deff_entropy(s2: np.ndarray) -> float:
    if s2.size == 0:
        return 0.0
    p = s2 / s2.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def deff_90(s2: np.ndarray, fraction: float = 0.9) -> int:
    if s2.size == 0:
        return 0
    cumulative = np.cumsum(s2) / s2.sum()
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


def beta(s2: np.ndarray) -> float:
    if s2.size < 2:
        return math.nan
    x = np.log(np.arange(1, s2.size + 1, dtype=np.float64))
    y = np.log(s2)
    slope = np.polyfit(x, y, 1)[0]
    return float(-slope) + 0.0  # + 0.0: a flat spectrum gives 0.0, not -0.0


def layer_metrics(states: Any) -> dict[str, float]:
    """Every metric of one layer's [n, H] states, plus the mean and spread of the rows' L2 norms."""
    s2 = spectrum(states)
    x = states.detach().float().cpu().numpy() if hasattr(states, "detach") else np.asarray(states, dtype=np.float64)
    norms = np.linalg.norm(np.atleast_2d(x).astype(np.float64), axis=-1)
    return {
        "deff_entropy": deff_entropy(s2),
        "deff_90": deff_90(s2),
        "beta": beta(s2),
        "norm_mean": float(norms.mean()),
        "norm_std": float(norms.std()),
        "rank": int(s2.size),
    }
