"""``postserve report``: a model's calibration window drawn as one PNG (matplotlib, Agg).

Gaussian and poisson models: the PIT histogram (flat when calibrated), the coverage of the 50/90/95%
central intervals against their nominal level over time, and the NLL over time. Bernoulli and
categorical models: the reliability diagram (on the diagonal when calibrated), ECE and Brier score
over time, and log loss over time. "Over time" is the window's closed buckets, by model version.
Bands are 95% binomial (normal-approximation) intervals around the nominal values. With the
model's ``/influence`` answer, a fourth panel: the window's most influential rows (the size of
each one's mean step, by version: outliers and label errors stand out).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from service.schemas import CalibrationResponse, InfluenceResponse

__all__ = ["draw_report"]


def _band(p: float, n: int) -> float:
    return 1.96 * math.sqrt(p * (1 - p) / n) if n else 0.0


def draw_report(
    cal: CalibrationResponse, out: Path, influence: InfluenceResponse | None = None
) -> None:
    """Write the report for ``cal`` (a ``GET /v1/models/{name}/calibration`` answer) to ``out``,
    with ``influence`` (a ``GET /v1/models/{name}/influence`` answer) where given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 if influence is None else 4
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.6), layout="constrained")
    if influence is not None:
        _influence(axes[3], influence)
    s = cal.summary
    versions = [p.version for p in cal.history]
    if cal.reliability is not None:
        _reliability(axes[0], cal)
        _series(axes[1], versions, {"ECE": [p.summary.ece for p in cal.history]}, "ECE, Brier")
        axes[1].plot(versions, [p.summary.brier for p in cal.history], "o-", label="Brier")
        axes[1].legend()
        _series(axes[2], versions, {"log loss": [p.summary.log_loss for p in cal.history]}, "")
        axes[2].set_title("Log loss per bucket (nats)")
        figures = f"ECE {_fmt(s.ece)}, Brier {_fmt(s.brier)}, log loss {_fmt(s.log_loss)}"
    else:
        _pit(axes[0], cal)
        _coverage(axes[1], cal, versions)
        _series(axes[2], versions, {"NLL": [p.summary.nll for p in cal.history]}, "")
        axes[2].set_title("Mean NLL per bucket (nats)")
        cov = s.coverage or {}
        figures = ", ".join(f"{float(k):.0%}: {v:.3f}" for k, v in cov.items())
        figures = f"coverage {figures}; NLL {_fmt(s.nll)}"
        if s.residual_variance is not None:
            figures += f"; z mean {_fmt(s.residual_mean)}, z var {_fmt(s.residual_variance)}"
    fig.suptitle(
        f"{cal.name} ({cal.likelihood}) at version {cal.version}: window of {s.observations} "
        f"observations; {figures}",
        fontsize=10,
    )
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _influence(ax: Any, inf: InfluenceResponse) -> None:
    """The window's most influential rows: each one's step size at its version."""
    versions = [it.version for it in inf.items]
    sizes = [it.influence.size for it in inf.items]
    ax.bar(range(len(sizes)), sizes, color="tab:purple")
    ax.set_xticks(range(len(sizes)), [str(v) for v in versions], rotation=90, fontsize=7)
    ax.set_xlabel("version after the row")
    ax.set_ylabel("Mahalanobis size of the mean step")
    ax.set_title(f"Most influential of the last {inf.window} rows")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _pit(ax: Any, cal: CalibrationResponse) -> None:
    hist = cal.pit_histogram or []
    k = len(hist) or 10
    ax.bar(
        [(i + 0.5) / k for i in range(len(hist))], hist, width=1 / k, edgecolor="white", alpha=0.8
    )
    band = _band(1 / k, cal.summary.observations)
    ax.axhline(1 / k, color="k", lw=1, label="uniform (calibrated)")
    ax.axhspan(1 / k - band, 1 / k + band, color="k", alpha=0.15, zorder=3, label="95% band")
    ax.set_xlim(0, 1)
    ax.set_xlabel("PIT = F(y) under the pre-update predictive")
    ax.set_ylabel("share of observations")
    ax.set_title("PIT histogram")
    ax.legend(loc="upper center", fontsize=8)


def _coverage(ax: Any, cal: CalibrationResponse, versions: list[int]) -> None:
    for level, colour in zip(cal.levels, ("C0", "C1", "C2"), strict=False):
        key = f"{level:g}"
        ys = [(p.summary.coverage or {}).get(key) for p in cal.history]
        ax.plot(versions, ys, "o-", color=colour, ms=3, label=f"{level:.0%} interval")
        ax.axhline(level, color=colour, ls="--", lw=1)
        if cal.history:
            n = cal.history[-1].summary.observations
            ax.axhspan(level - _band(level, n), level + _band(level, n), color=colour, alpha=0.08)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("model version")
    ax.set_ylabel("coverage")
    ax.set_title("Coverage per bucket vs nominal (dashed)")
    ax.legend(fontsize=8, loc="lower left")


def _reliability(ax: Any, cal: CalibrationResponse) -> None:
    bins = cal.reliability or []
    xs = [b.confidence for b in bins if b.count]
    ys = [b.accuracy for b in bins if b.count]
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ax.plot(xs, ys, "o-", label="observed")
    for b in bins:
        if b.count and b.accuracy is not None:
            p = b.confidence or 0.0
            ax.errorbar(b.confidence, b.accuracy, yerr=_band(p, b.count), color="C0", capsize=3)
    twin = ax.twinx()
    twin.bar(
        [(b.lower + b.upper) / 2 for b in bins],
        [b.count for b in bins],
        width=0.1,
        alpha=0.15,
        color="C1",
    )
    twin.set_ylabel("observations per bin", color="C1")
    what = "P(y = 1)" if cal.likelihood == "bernoulli" else "top-label confidence"
    ax.set_xlabel(f"predicted {what}")
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability (ECE {_fmt(cal.summary.ece)})")
    ax.legend(loc="upper left", fontsize=8)


def _series(ax: Any, xs: list[int], series: dict[str, list[float | None]], title: str) -> None:
    for label, ys in series.items():
        ax.plot(xs, ys, "o-", ms=3, label=label)
    ax.set_xlabel("model version")
    if title:
        ax.set_title(title)
