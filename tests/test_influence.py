"""Per-observation influence (``service.influence``, ``docs/algorithms.md`` 4.5) against closed
forms and on real data: on a linear-Gaussian model each row's leave-one-out shift equals the
refit without it (batch Bayesian linear regression, solved here in NumPy) and its size the
Mahalanobis length of the mean step under the updated precision, to 1e-8; planted outliers on a
real stream (scikit-learn's diabetes, river's TrumpApproval) rank in the top 1%; the Prometheus
histogram and ``GET /influence`` report them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_diabetes

from service.influence import (
    Influence,
    InfluenceLog,
    Influential,
    current_influence,
    influence,
    mark,
    surprise,
)
from service.testing import MakeAppClient

TOL = 1e-8


def _linear(name: str, d: int, prior: float, noise: float, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "network": {"type": "linear", "input_dim": d},
        "likelihood": {"type": "gaussian", "noise_variance": noise},
        "filter": {"type": "kalman"},
        "prior": {"variance": prior},
        "dtype": "float64",
        **extra,
    }


def _posterior(X: np.ndarray, y: np.ndarray, prior: float, noise: float) -> tuple[Any, Any]:
    """Batch Bayesian linear regression with a bias: (mean, precision) after rows X, y."""
    H = np.hstack([X, np.ones((len(X), 1))])
    Lam = np.eye(H.shape[1]) / prior + H.T @ H / noise
    return np.linalg.solve(Lam, H.T @ y / noise), Lam


def test_leave_one_out_and_size_equal_the_closed_form_refit(app_client: MakeAppClient) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 + rng.normal(0, 0.5, 12)
    y[7] += 6.0  # an outlier among them
    prior, noise = 2.0, 0.25
    with app_client() as c:
        assert c.post("/v1/models", json=_linear("m", 3, prior, noise)).status_code == 201
        for i in range(len(y)):
            got = c.post("/v1/models/m/update", json={"x": [X[i].tolist()], "y": [y[i]]}).json()
            (row,) = got["predictions"]
            inf = row["influence"]
            before, _ = _posterior(X[:i], y[:i], prior, noise)
            after, Lam = _posterior(X[: i + 1], y[: i + 1], prior, noise)
            h = np.append(X[i], 1.0)
            assert abs(inf["loo_shift"][0] - (h @ after - h @ before)) < TOL
            step = after - before
            assert abs(inf["size"] - float(np.sqrt(step @ Lam @ step))) < TOL
        # under the belief now (all 12 rows): each kept row's exact leave-one-out refit
        got = c.get("/v1/models/m/influence", params={"top": 12}).json()
        assert got["weighed_by"] == "current" and got["version"] == 12
        m_all, Lam_all = _posterior(X, y, prior, noise)
        assert got["items"][0]["version"] == 8  # the outlier, row 7
        for it in got["items"]:
            j = it["version"] - 1
            keep = np.arange(len(y)) != j
            m_loo, _ = _posterior(X[keep], y[keep], prior, noise)
            h = np.append(X[j], 1.0)
            assert abs(it["influence"]["loo_shift"][0] - (h @ m_all - h @ m_loo)) < TOL
            step = m_all - m_loo
            assert abs(it["influence"]["size"] - float(np.sqrt(step @ Lam_all @ step))) < TOL
        sizes = [it["influence"]["size"] for it in got["items"]]
        assert sizes == sorted(sizes, reverse=True) and len(sizes) == 12


def _ranks_planted(rows: list[tuple[list[float], float]], seed: int, c: Any, name: str) -> None:
    """Plant outliers (y + 10 sd), 1% of the rows, anywhere in the stream, send everything in
    batches of 20 rows, and check the planted rows are the top 1% of ``/influence``."""
    y = np.array([t for _, t in rows])
    n_out = max(1, len(rows) // 100)
    planted = {int(i) for i in np.random.default_rng(seed).choice(len(rows), n_out, False)}
    X = [x for x, _ in rows]
    ys = [t + 10 * float(y.std()) if i in planted else t for i, (_, t) in enumerate(rows)]
    for start in range(0, len(rows), 20):
        body = {"x": X[start : start + 20], "y": ys[start : start + 20], "request_id": f"b{start}"}
        assert c.post(f"/v1/models/{name}/update", json=body).status_code == 200
    top = c.get(f"/v1/models/{name}/influence", params={"top": n_out}).json()["items"]
    assert {int(it["request_id"][1:]) + it["row"] for it in top} == planted
    for it in top:  # each item names its row: version = row index + 1
        assert it["version"] == int(it["request_id"][1:]) + it["row"] + 1


def test_planted_outliers_rank_top_on_diabetes(app_client: MakeAppClient) -> None:
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    rows = list(zip(X.tolist(), ((y - y.mean()) / y.std()).tolist(), strict=True))
    with app_client() as c:
        spec = _linear("diabetes", 10, 1.0, 0.5, monitor=True)
        assert c.post("/v1/models", json=spec).status_code == 201
        _ranks_planted(rows, seed=1, c=c, name="diabetes")
        metrics = c.get("/metrics").text
        assert 'postserve_model_influence_count{model="diabetes"} 442.0' in metrics
        assert 'postserve_model_influence_bucket{le="+Inf",model="diabetes"} 442.0' in metrics


def test_planted_outliers_rank_top_on_trump_approval(app_client: MakeAppClient) -> None:
    datasets = pytest.importorskip("river.datasets")
    data = list(datasets.TrumpApproval())
    keys = sorted(data[0][0])
    X = np.array([[x[k] for k in keys] for x, _ in data])
    X = (X - X.mean(0)) / X.std(0)
    rows = list(zip(X.tolist(), [float(t) for _, t in data], strict=True))
    with app_client() as c:
        assert c.post("/v1/models", json=_linear("trump", len(keys), 1.0, 1.0)).status_code == 201
        _ranks_planted(rows, seed=2, c=c, name="trump")


def test_the_log_keeps_the_most_surprising_rows_of_its_window() -> None:
    log = InfluenceLog(window=100, buckets=10, keep=5)
    rng = np.random.default_rng(3)
    errors = rng.normal(size=1000)
    for v, e in enumerate(errors, start=1):
        m = mark([1.0], [e], [0.0], [0.5], [0.5])
        log.add(Influential(v, None, 0, m))
    # the window: nine closed buckets (the open one has just closed), each keeps its top 5
    kept = {r.version for r in log.candidates()}
    assert len(kept) == 45 and min(kept) > 910
    for start in range(910, 1000, 10):
        bucket = np.arange(start, start + 10)
        top5 = bucket[np.argsort(-(errors[bucket] ** 2))[:5]] + 1
        assert set(top5.tolist()) <= kept
    assert log.count == 1000
    one = mark([1.0], [2.0], [0.0], [1.0], [1.0])  # e = 2, s = r = 1
    assert one.surprise == 2.0 and one.at_update == Influence(math.sqrt(2.0), [1.0])
    assert surprise([2.0], [0.0], [1.0], [1.0]) == one.surprise
    assert influence([2.0], [0.0], [1.0], [1.0]) == one.at_update
    # the same numbers from the belief that holds the row: v = s r / (s + r), e' = e r / (s + r)
    assert current_influence([1.0], [0.0], [0.5], [1.0]) == one.at_update
