r"""Data-aware starting values: where the guide starts, read from statistics of the target.

A guide that starts blind to the data (intercept at 0 against a target whose mean is 3) spends
its first steps pushing the target's mean into whichever table rows move fastest, and the way
back runs along a direction the likelihood is flat in. Starting the intercept at the link of
the target's mean, and each link's globals at their method-of-moments values, removes that
first excursion. Priors are not touched: only the guide's starting ``loc`` moves.

For a target :math:`y` with mean :math:`\bar y`, variance :math:`s^2` and link :math:`g`:

- intercept :math:`g(\bar y)`: identity (gaussian, student-t), mean of :math:`\log y`
  (lognormal), :math:`\mathrm{logit}\,\bar y` (logit, beta), :math:`\log \bar y` (poisson,
  negative binomial, gamma, exponential), centred log class frequencies (categorical), 0
  (ordinal, whose cut-points carry the location);
- noise :math:`\sigma = s` (gaussian; :math:`s\sqrt{(\nu-2)/\nu}` for student-t; the sd of
  :math:`\log y` for lognormal);
- negative-binomial concentration :math:`\phi = \bar y^2 / (s^2 - \bar y)` from
  :math:`\mathrm{Var}\,y = \mu + \mu^2/\phi`;
- zero-inflated Poisson: :math:`\lambda = \bar y + s^2/\bar y - 1`, gate
  :math:`\pi = 1 - \bar y/\lambda`;
- gamma shape :math:`k = \bar y^2 / s^2` (:math:`\mathrm{Var}\,y = \mu^2/k`); exponential:
  the intercept only;
- zero-inflated negative binomial: the gate :math:`\pi`, with the mean :math:`\mu = \bar
  y/(1-\pi)` and concentration :math:`\phi` it implies from the mean and variance, that
  best reproduces the share of zeros;
- beta precision :math:`\phi = \bar y(1-\bar y)/s^2 - 1`;
- ordinal cut-points :math:`c_k = \mathrm{logit}\,P(y \le k)` from the class frequencies.

:class:`TargetStats` accumulates what these need in one streaming pass (the data stage's
validate-and-encode pass), so no extra read of the data is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MAX_CLASSES = 1000  # integer targets with more levels keep no class histogram
_EPS = 1e-4


@dataclass
class TargetStats:
    """Streaming moments of a target: counts, sums, and the histogram of small integers."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    positive: int = 0
    log_total: float = 0.0
    log_total_sq: float = 0.0
    zeros: int = 0
    classes: list[int] | None = field(default_factory=list)  # None: not small integers

    def update(self, y: np.ndarray) -> None:
        """Fold in a batch of finite target values."""
        y = np.asarray(y, np.float64).ravel()
        if not y.size:
            return
        self.count += int(y.size)
        self.total += float(y.sum())
        self.total_sq += float(np.dot(y, y))
        self.minimum = min(self.minimum, float(y.min()))
        self.maximum = max(self.maximum, float(y.max()))
        pos = y[y > 0]
        self.positive += int(pos.size)
        if pos.size:
            logs = np.log(pos)
            self.log_total += float(logs.sum())
            self.log_total_sq += float(np.dot(logs, logs))
        self.zeros += int(np.sum(y == 0))
        if self.classes is not None:
            small = y.min() >= 0 and y.max() < MAX_CLASSES and np.all(np.floor(y) == y)
            if not small:
                self.classes = None
            else:
                counts = np.bincount(y.astype(np.int64), minlength=len(self.classes))
                counts[: len(self.classes)] += np.asarray(self.classes, np.int64)
                self.classes = [int(c) for c in counts]

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> float:
        return max(self.total_sq / max(self.count, 1) - self.mean**2, 0.0)

    @property
    def sd(self) -> float:
        return math.sqrt(self.var)

    @property
    def log_mean(self) -> float:
        return self.log_total / max(self.positive, 1)

    @property
    def log_sd(self) -> float:
        n = max(self.positive, 1)
        return math.sqrt(max(self.log_total_sq / n - self.log_mean**2, 0.0))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["minimum"] = self.minimum if self.count else None
        out["maximum"] = self.maximum if self.count else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetStats:
        data = dict(data)
        data["minimum"] = math.inf if data.get("minimum") is None else data["minimum"]
        data["maximum"] = -math.inf if data.get("maximum") is None else data["maximum"]
        return cls(**data)


@dataclass
class FeatureStats:
    """Streaming second moments of the numeric features, :math:`E[x_j^2]` per column, and
    each column's range (the domain of a smooth term on it)."""

    count: int = 0
    total_sq: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        if not x.size:
            return
        sq = np.einsum("ij,ij->j", x, x)
        self.total_sq = (sq + np.asarray(self.total_sq or np.zeros_like(sq))).tolist()
        low, high = x.min(axis=0), x.max(axis=0)
        self.low = (np.minimum(low, self.low) if self.low else low).tolist()
        self.high = (np.maximum(high, self.high) if self.high else high).tolist()
        self.count += int(x.shape[0])

    @property
    def mean_sq(self) -> np.ndarray:
        return np.asarray(self.total_sq, np.float64) / max(self.count, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureStats:
        return cls(**dict(data))


class CategorySums:
    r"""Streaming target sum of every category of every categorical column,
    :math:`S_{c,r} = \sum_{i:\,x_{ic}=r} y_i`: with the category's count, the data-aware
    start of its random-effect row (:meth:`LinkStart.row_mean`)."""

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.sums = {c: np.zeros(int(n), np.float64) for c, n in sizes.items()}

    def update(self, columns: list[str], ids: np.ndarray, y: np.ndarray) -> None:
        """Fold in a batch: ``ids[:, j]`` the ids of ``columns[j]`` (negative: not counted)."""
        y = np.asarray(y, np.float64).ravel()
        for j, column in enumerate(columns):
            col = ids[:, j]
            keep = col >= 0
            total = self.sums[column]
            total += np.bincount(col[keep], weights=y[keep], minlength=len(total))[: len(total)]


@dataclass(frozen=True)
class LinkStart:
    """Where a link's model starts: the linear predictor (per unit) and the link's globals
    (constrained values by site name). ``outcome_sd`` is the target's sd on the scale of the
    linear predictor, for links where that scale is the target's own (else ``None``)."""

    eta: tuple[float, ...]
    globals: dict[str, np.ndarray]
    outcome_sd: float | None
    # Fisher information of the linear predictor per observation at the start (None: not
    # worked out for this link), for the start of the global guide scales
    information: float | None = None
    # the per-observation score at the start, d log p(y | eta) / d eta = a y + b, as (a, b)
    # (None: not affine in y for this link)
    score: tuple[float, float] | None = None

    def row_mean(self, count: np.ndarray, total: np.ndarray, tau: np.ndarray) -> np.ndarray:
        r"""Each category's one-step estimate of its effect from the start:
        :math:`\sum_i (a y_i + b) / (\tau_r + 1) = (a S_r + b n_r) / (\tau_r + 1)`, the
        score of its ``count`` :math:`n_r` observations with target sum ``total``
        :math:`S_r` over its site precision :math:`\tau_r` plus a unit prior precision (the
        site-mean field of :class:`blayers.guides.ConditionalGuide`, under which the row's
        mean is then :math:`(a S_r + b n_r) / (\tau_r + \lambda^{-2})`, one Newton step from
        0 at every scale). Zeros where the link's score is not affine in the target."""
        count = np.asarray(count, np.float64)
        if self.score is None:
            return np.zeros_like(count)
        a, b = self.score
        return (a * np.asarray(total, np.float64) + b * count) / (np.asarray(tau) + 1.0)


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1.0 - _EPS)
    return math.log(p / (1.0 - p))


def _clip(x: float, lo: float, hi: float) -> float:
    return float(min(max(x, lo), hi))


def _positive_sd(sd: float) -> float:
    return max(sd, 1e-3)


def gaussian_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    sd = _positive_sd(stats.sd)
    info = 1.0 / sd**2
    score = (info, -stats.mean * info)
    return LinkStart((stats.mean,), {"sigma": np.float32(sd)}, stats.sd, info, score)


def student_t_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    df = float(kwargs.get("df", 4.0))
    sd = _positive_sd(stats.sd) * (math.sqrt((df - 2.0) / df) if df > 2.0 else 0.5)
    info = (df + 1.0) / ((df + 3.0) * sd**2)
    return LinkStart((stats.mean,), {"sigma": np.float32(sd)}, stats.sd, info)


def lognormal_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    sd = _positive_sd(stats.log_sd)
    return LinkStart((stats.log_mean,), {"sigma": np.float32(sd)}, stats.log_sd, 1.0 / sd**2)


def logit_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    p = _clip(stats.mean, _EPS, 1 - _EPS)
    return LinkStart((_logit(p),), {}, None, p * (1 - p), (1.0, -p))


def poisson_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    m = max(stats.mean, 1e-3)
    return LinkStart((math.log(m),), {}, None, m, (1.0, -m))


def negative_binomial_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    m = max(stats.mean, 1e-3)
    excess = stats.var - m
    phi = _clip(m * m / excess if excess > 1e-3 * m else 1e3, 1e-3, 1e4)  # 1e3: near Poisson
    info = m / (1.0 + m / phi)
    score = (phi / (m + phi), -m * phi / (m + phi))  # d/d eta of NB(y; e^eta, phi)
    return LinkStart((math.log(m),), {"concentration": np.float32(phi)}, None, info, score)


def gamma_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    m = max(stats.mean, 1e-6)
    k = _clip(m * m / max(stats.var, 1e-12), 1e-2, 1e4)
    # d/d eta log Gamma(y; k, k e^-eta) = k (y e^-eta - 1); information k per observation
    return LinkStart((math.log(m),), {"gamma_shape": np.float32(k)}, None, k, (k / m, -k))


def exponential_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    m = max(stats.mean, 1e-6)
    return LinkStart((math.log(m),), {}, None, 1.0, (1.0 / m, -1.0))


def zinb_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    m, v = max(stats.mean, 1e-3), stats.var
    zeros = stats.zeros / max(stats.count, 1)
    best = (math.inf, 0.0, math.log(m), 1e3)
    for gate in np.linspace(0.0, min(zeros, 0.95), 96):
        mu = m / (1.0 - gate)
        # Var y = (1-π) μ (1 + μ/φ) + π (1-π) μ², solved for φ (no excess: nearly Poisson)
        excess = v - (1.0 - gate) * mu - gate * (1.0 - gate) * mu * mu
        phi = _clip((1.0 - gate) * mu * mu / excess if excess > 1e-9 else 1e3, 1e-2, 1e3)
        p0 = gate + (1.0 - gate) * (phi / (phi + mu)) ** phi
        if abs(p0 - zeros) < best[0]:
            best = (abs(p0 - zeros), float(gate), math.log(mu), phi)
    _, gate, eta, phi = best
    globals_ = {
        "zinb_gate": np.float32(_clip(gate, 1e-3, 0.95)),
        "zinb_concentration": np.float32(phi),
    }
    return LinkStart((eta,), globals_, None)


def zip_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    m = max(stats.mean, 1e-3)
    rate = max(m + stats.var / m - 1.0, m)
    gate = _clip(1.0 - m / rate, 1e-3, 0.9)
    return LinkStart((math.log(rate),), {"zip_gate": np.float32(gate)}, None)


def beta_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    m = _clip(stats.mean, _EPS, 1 - _EPS)
    phi = m * (1 - m) / max(stats.var, 1e-8) - 1.0
    return LinkStart((_logit(m),), {"beta_phi": np.float32(_clip(phi, 0.1, 1e4))}, None)


def _class_freq(stats: TargetStats, k: int) -> np.ndarray:
    counts = np.zeros(k, np.float64)
    if stats.classes:
        have = np.asarray(stats.classes[:k], np.float64)
        counts[: len(have)] = have
    return (counts + 0.5) / (counts.sum() + 0.5 * k)  # every class possible


def ordinal_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    k = int(kwargs.get("num_classes", len(stats.classes or ()) or 2))
    cum = np.cumsum(_class_freq(stats, k))[:-1]
    cuts = np.array([_logit(float(p)) for p in cum])
    out: dict[str, np.ndarray] = {"ordinal_c0": np.float32(cuts[0])}
    if k > 2:
        out["ordinal_gaps"] = np.maximum(np.diff(cuts), 1e-2).astype(np.float32)
    return LinkStart((0.0,), out, None)


def categorical_start(stats: TargetStats, kwargs: Mapping[str, Any]) -> LinkStart:
    k = max(len(stats.classes or ()), 2)
    logf = np.log(_class_freq(stats, k))
    return LinkStart(tuple(float(v) for v in logf - logf.mean()), {}, None)
