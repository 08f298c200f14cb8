r"""Does a run know it has converged? Windowed ELBO trend and drift of every global site.

Every ``sample_every`` steps the loop hands the tracker the minibatch loss and the guide locs
and scales of the global sites (the ones without a table axis). Samples are averaged over
windows of one epoch (``window`` steps). Between consecutive windows :math:`k-1, k`:

- the ELBO per row changed by :math:`\Delta_E = \bar E_k - \bar E_{k-1}`;
- each element :math:`j` of a global site moved by :math:`\Delta_j = \bar u_{k,j} - \bar
  u_{k-1,j}` in unconstrained space, measured in its posterior sd :math:`s_j` (the guide's).

A window is *settled* when no element moved by more than ``drift_tol`` posterior sds per
epoch beyond noise (:math:`|\Delta_j| > 2\,\mathrm{SE}`, the standard error of the difference
of two window means), and the ELBO did not rise by more than ``elbo_tol`` nats per row per
epoch beyond noise. The run has converged at the end of ``patience`` settled windows in a row.

The ELBO's rise is scaled by :math:`\rho = \text{lr}_\text{base} / \overline{\text{lr}}_k`:
along a slow direction the objective improves in proportion to the learning rate, so a
decayed schedule must not pass for convergence, and the window mean of minibatch ELBOs has
nearly independent noise, so its standard error is sound. The globals' drift is not scaled:
an iterate's own noise is a random walk whose size also follows the learning rate, and
scaling it back up would flag every parameter whose posterior sd is below the base rate's
jitter.

The tracker's state is plain JSON, saved with each checkpoint, so a resumed run decides at
the same step as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Window:
    """Sums over one window's samples."""

    n: int = 0
    elbo: float = 0.0
    elbo_sq: float = 0.0
    lr: float = 0.0
    loc: dict[str, list[float]] = field(default_factory=dict)
    loc_sq: dict[str, list[float]] = field(default_factory=dict)
    sd: dict[str, list[float]] = field(default_factory=dict)  # at the latest sample

    def add(
        self, elbo: float, lr: float, locs: Mapping[str, np.ndarray], sds: Mapping[str, np.ndarray]
    ) -> None:
        self.n += 1
        self.elbo += elbo
        self.elbo_sq += elbo * elbo
        self.lr += lr
        for site, value in locs.items():
            v = np.asarray(value, np.float64).ravel()
            old = np.asarray(self.loc.get(site, np.zeros_like(v)), np.float64)
            old_sq = np.asarray(self.loc_sq.get(site, np.zeros_like(v)), np.float64)
            self.loc[site] = (old + v).tolist()
            self.loc_sq[site] = (old_sq + v * v).tolist()
            self.sd[site] = np.asarray(sds[site], np.float64).ravel().tolist()

    def mean_and_se2(self, total: float, total_sq: float | np.ndarray) -> tuple[Any, Any]:
        """Mean and squared standard error of the mean of the window's samples."""
        mean = np.asarray(total) / self.n
        var = np.maximum(np.asarray(total_sq) / self.n - mean**2, 0.0)
        return mean, var / max(self.n - 1, 1)


@dataclass
class Verdict:
    """What a finished window says."""

    step: int
    settled: bool
    elbo_change: float  # per row per epoch, lr-scaled
    worst_site: str | None
    worst_index: int | None
    worst_drift: float  # posterior sds per epoch


@dataclass
class ConvergenceTracker:
    window: int
    epoch_steps: float
    base_lr: float
    drift_tol: float
    elbo_tol: float
    patience: int
    settled_in_a_row: int = 0
    converged_at: int | None = None
    previous: Window | None = None
    current: Window = field(default_factory=Window)
    last: dict[str, Any] | None = None  # the latest Verdict, as a dict

    def sample(
        self,
        step: int,
        elbo_per_row: float,
        lr: float,
        locs: Mapping[str, np.ndarray],
        sds: Mapping[str, np.ndarray],
    ) -> Verdict | None:
        """Fold in one sample; at a window's end, judge it against the previous one."""
        self.current.add(elbo_per_row, lr, locs, sds)
        if step % self.window:
            return None
        verdict = None
        if self.previous is not None and self.previous.n and self.current.n:
            verdict = self._judge(step, self.previous, self.current)
            self.last = asdict(verdict)
            self.settled_in_a_row = self.settled_in_a_row + 1 if verdict.settled else 0
            if self.settled_in_a_row >= self.patience and self.converged_at is None:
                self.converged_at = step
            if not verdict.settled:
                self.converged_at = None
        self.previous, self.current = self.current, Window()
        return verdict

    def _judge(self, step: int, before: Window, after: Window) -> Verdict:
        per_epoch = self.epoch_steps / self.window
        rho = self.base_lr / max(after.lr / after.n, 1e-30)
        e0, v0 = before.mean_and_se2(before.elbo, before.elbo_sq)
        e1, v1 = after.mean_and_se2(after.elbo, after.elbo_sq)
        gain = float(e1 - e0)
        elbo_moving = (
            gain > 2.0 * math.sqrt(float(v0 + v1)) and rho * gain * per_epoch > self.elbo_tol
        )
        worst = (None, None, 0.0)
        moving = False
        for site in after.loc:
            m0, s0 = before.mean_and_se2(before.loc[site], before.loc_sq[site])
            m1, s1 = after.mean_and_se2(after.loc[site], after.loc_sq[site])
            delta = np.abs(m1 - m0)
            sd = np.maximum(np.asarray(after.sd[site]), 1e-12)
            drift = delta * per_epoch / sd
            beyond_noise = delta > 2.0 * np.sqrt(s0 + s1)
            j = int(np.argmax(np.where(beyond_noise, drift, 0.0)))
            if beyond_noise[j] and drift[j] > worst[2]:
                worst = (site, j, float(drift[j]))
            moving = moving or bool(np.any(beyond_noise & (drift > self.drift_tol)))
        settled = not moving and not elbo_moving
        return Verdict(step, settled, rho * gain * per_epoch, *worst)

    @property
    def converged(self) -> bool:
        return self.converged_at is not None

    def status(self) -> str:
        """One line: "converged at step k" or what is still moving."""
        if self.converged_at is not None:
            return f"converged at step {self.converged_at}"
        if self.last is None:
            return "not converged: too few windows to judge (train longer than two epochs)"
        v = self.last
        if v["worst_site"] is not None and v["worst_drift"] > self.drift_tol:
            return (
                f"not converged: {v['worst_site']}[{v['worst_index']}] still moving by "
                f"{v['worst_drift']:.2g} posterior sds per epoch (tolerance {self.drift_tol:g})"
            )
        if v["settled"]:
            return (
                f"not converged: settled for {self.settled_in_a_row} of the {self.patience} "
                "windows needed"
            )
        return (
            f"not converged: the ELBO still rises by {v['elbo_change']:.2g} nats per row per "
            f"epoch (tolerance {self.elbo_tol:g})"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConvergenceTracker:
        data = dict(data)
        data["previous"] = Window(**data["previous"]) if data.get("previous") else None
        data["current"] = Window(**data["current"])
        return cls(**data)


def window_steps(epoch_steps: float, sample_every: int, window: int | None) -> int:
    """Steps per window: one epoch (or ``window``) rounded up to whole samples, at least 5."""
    steps = window or math.ceil(epoch_steps)
    samples = max(math.ceil(steps / sample_every), 5)
    return samples * sample_every
