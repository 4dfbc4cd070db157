"""State-space models (``service.filters.statespace``, ``docs/algorithms.md`` 3.11) against
independent filters: a NumPy Kalman filter written here, and statsmodels' state-space filter on
the Nile local-level model, in float64 to 1e-8; through a real server, with irregular time steps
and a restart (log replay)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import statsmodels.api as sm
import torch

from service.components.build import build_filter
from service.errors import InvalidInput, InvalidSpec
from service.schemas import ModelSpec
from service.testing import MakeAppClient, running

F64 = torch.float64
TOL = 1e-8


def _tracker(prior: float = 10.0, q: float = 0.3, r: float = 0.5) -> dict[str, Any]:
    """The seed's 2-D example: position and velocity in x and y, positions observed."""
    return {
        "name": "tracker",
        "network": {
            "type": "state_space",
            "state_dim": 4,
            "observation_matrix": [[1, 0, 0, 0], [0, 1, 0, 0]],
            "transition": {"type": "constant_velocity", "dims": 2},
            "process_covariance": {"type": "white_acceleration", "q": q},
        },
        "likelihood": {"type": "gaussian", "noise_variance": [r, r]},
        "filter": {"type": "kalman"},
        "prior": {"variance": prior},
        "dtype": "float64",
    }


def _cv(dt: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Constant velocity in 2-D, written out: [px, py, vx, vy]."""
    A = np.eye(4)
    A[0, 2] = A[1, 3] = dt
    Q1 = q * np.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]])
    Q = np.kron(Q1, np.eye(2))
    return A, Q


def _numpy_kalman(
    m: np.ndarray,
    P: np.ndarray,
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    H: np.ndarray,
    R: np.ndarray,
) -> tuple[list[np.ndarray], list[np.ndarray], list[float]]:
    """The textbook filter: predict, then the update in covariance form."""
    means, covs, lls = [], [], []
    for A, Q, y in steps:
        m, P = A @ m, A @ P @ A.T + Q
        S = H @ P @ H.T + R
        e = y - H @ m
        K = P @ H.T @ np.linalg.inv(S)
        lls.append(
            float(-0.5 * (len(y) * math.log(2 * math.pi) + math.log(np.linalg.det(S))
                          + e @ np.linalg.solve(S, e)))
        )  # fmt: skip
        m, P = m + K @ e, (np.eye(len(m)) - K @ H) @ P
        means.append(m)
        covs.append(P)
    return means, covs, lls


def _track(T: int, seed: int, q: float, r: float) -> tuple[list[float], np.ndarray]:
    """A simulated 2-D track with irregular time steps: the dts and the observed positions."""
    rng = np.random.default_rng(seed)
    dts = rng.exponential(0.5, T) + 0.05
    z = np.array([0.0, 0.0, 1.0, 0.5])
    ys = []
    for dt in dts:
        A, Q = _cv(float(dt), q)
        z = A @ z + rng.multivariate_normal(np.zeros(4), Q)
        ys.append(z[:2] + rng.normal(0, math.sqrt(r), 2))
    return [float(d) for d in dts], np.array(ys)


def test_tracking_equals_a_numpy_kalman_filter() -> None:
    q, r, prior = 0.3, 0.5, 10.0
    f = build_filter(ModelSpec.model_validate(_tracker(prior, q, r)))
    dts, ys = _track(60, seed=3, q=q, r=r)
    state = f.init(dtype=F64)
    H = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    steps = [(*_cv(dt, q), y) for dt, y in zip(dts, ys, strict=True)]
    means, covs, lls = _numpy_kalman(np.zeros(4), prior * np.eye(4), steps, H, r * np.eye(2))
    for t, (dt, y) in enumerate(zip(dts, ys, strict=True)):
        state, info = f.step(state, torch.tensor([dt], dtype=F64), torch.tensor(y))
        np.testing.assert_allclose(state.mean.numpy(), means[t], rtol=0, atol=TOL)
        np.testing.assert_allclose(state.cov.numpy(), covs[t], rtol=0, atol=TOL)
        assert abs(float(info.log_likelihood) - lls[t]) < TOL


#: a fixed (A, Q) with both states seen through their sum (test_a_fixed..., test_steps_ahead...)
AR_A = [[0.9, 0.2], [0.0, 0.8]]
AR_Q = [[0.1, 0.02], [0.02, 0.05]]
AR_SPEC: dict[str, Any] = {
    "name": "ar",
    "network": {
        "type": "state_space",
        "state_dim": 2,
        "observation_matrix": [[1.0, 1.0]],
        "transition": AR_A,
        "process_covariance": AR_Q,
    },
    "likelihood": {"type": "gaussian", "noise_variance": 0.2},
    "filter": {"type": "kalman"},
    "dtype": "float64",
}


def test_a_fixed_transition_takes_whole_steps() -> None:
    """dt = k steps of a fixed (A, Q) equals k predicts with no update between."""
    f = build_filter(ModelSpec.model_validate(AR_SPEC))
    An, Qn, H = np.array(AR_A), np.array(AR_Q), np.array([[1.0, 1.0]])
    three = (An @ An @ An, Qn + An @ Qn @ An.T + An @ An @ Qn @ An.T @ An.T)
    steps = [(An, Qn, np.array([0.4])), (*three, np.array([-0.3]))]
    means, covs, lls = _numpy_kalman(np.zeros(2), np.eye(2), steps, H, np.array([[0.2]]))
    state, infos = f.run(
        f.init(dtype=F64),
        torch.tensor([[1.0], [3.0]], dtype=F64),
        torch.tensor([0.4, -0.3], dtype=F64),
    )
    np.testing.assert_allclose(state.mean.numpy(), means[-1], rtol=0, atol=TOL)
    np.testing.assert_allclose(state.cov.numpy(), covs[-1], rtol=0, atol=TOL)
    assert abs(sum(float(i.log_likelihood) for i in infos) - sum(lls)) < TOL
    with pytest.raises(InvalidInput, match="whole number of steps"):
        f.run(state, torch.tensor([[1.5]], dtype=F64), torch.tensor([0.0], dtype=F64))


def test_steps_ahead_of_a_fixed_transition_over_http(app_client: MakeAppClient) -> None:
    """``steps_ahead`` k predicts H A^k m with H P_k H^T + R, P_k = A^k P A^kT + Q_k."""
    A, Q = np.array(AR_A), np.array(AR_Q)
    H = np.array([[1.0, 1.0]])
    (m,), (P,), _ = _numpy_kalman(
        np.zeros(2), np.eye(2), [(A, Q, np.array([0.4]))], H, 0.2 * np.eye(1)
    )
    with app_client() as c:
        assert c.post("/v1/models", json=AR_SPEC).status_code == 201
        assert c.post("/v1/models/ar/update", json={"y": [0.4]}).status_code == 200
        got = c.post("/v1/models/ar/predict", json={"steps_ahead": 3}).json()
        Pk = P
        for _ in range(3):
            Pk = A @ Pk @ A.T + Q
        A3 = np.linalg.matrix_power(A, 3)
        np.testing.assert_allclose(got["mean"][0], H @ A3 @ m, rtol=0, atol=TOL)
        np.testing.assert_allclose(got["variance"][0], (H @ Pk @ H.T)[0] + 0.2, rtol=0, atol=TOL)
        assert got == c.post("/v1/models/ar/predict", json={"dt": [3]}).json()
        both = c.post("/v1/models/ar/predict", json={"dt": [1], "steps_ahead": 2})
        assert both.status_code == 422 and "not both" in both.text
        frac = c.post("/v1/models/ar/predict", json={"dt": [0.5]})
        assert frac.status_code == 422 and "whole number of steps" in frac.text


def test_the_nile_local_level_equals_statsmodels() -> None:
    """The local-level model on the Nile flows (Durbin & Koopman's MLE variances) against
    statsmodels' filter, initialised with the same known first prediction."""
    y = sm.datasets.nile.load_pandas().data["volume"].to_numpy()
    s2_eps, s2_eta, m0, v0 = 15099.0, 1469.1, 1000.0, 1e5
    spec = {
        "name": "nile",
        "network": {
            "type": "state_space",
            "state_dim": 1,
            "observation_matrix": [[1.0]],
            "transition": [[1.0]],
            "process_covariance": s2_eta,
        },
        "likelihood": {"type": "gaussian", "noise_variance": s2_eps},
        "filter": {"type": "kalman"},
        "prior": {"variance": v0, "mean": [m0]},
        "dtype": "float64",
    }
    f = build_filter(ModelSpec.model_validate(spec))
    state, infos = f.run(
        f.init(dtype=F64), torch.ones((len(y), 1), dtype=F64), torch.tensor(y, dtype=F64)
    )
    mod = sm.tsa.UnobservedComponents(y, level="llevel")
    mod.ssm.initialize_known(np.array([m0]), np.array([[v0 + s2_eta]]))  # theta_1's prediction
    res = mod.filter([s2_eps, s2_eta])
    assert abs(float(state.mean[0]) - res.filtered_state[0, -1]) < TOL
    assert abs(float(state.cov[0, 0]) - res.filtered_state_cov[0, 0, -1]) < TOL
    ll = np.array([float(i.log_likelihood) for i in infos])
    np.testing.assert_allclose(ll, res.llf_obs, rtol=0, atol=TOL)
    # and step by step: the filtered means and variances (flows ~1e3, variances ~1e4), to 1e-8
    s = f.init(dtype=F64)
    for t in range(len(y)):
        s, _ = f.step(s, torch.ones(1, dtype=F64), torch.tensor([y[t]], dtype=F64))
        assert abs(float(s.mean[0]) - res.filtered_state[0, t]) < TOL
        assert abs(float(s.cov[0, 0]) - res.filtered_state_cov[0, 0, t]) < TOL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"filter": {"type": "lofi"}}, "kalman filter with a gaussian likelihood"),
        ({"dynamics": {"decay": 0.9}}, "dynamics are its transition"),
        ({"network": {"state_dim": 3, "observation_matrix": [[1, 0, 0]]}}, "state of 4, not"),
        ({"network": {"process_covariance": [[1.0, 2.0], [3.0, 4.0]]}}, "must be 4 x 4"),
    ],
)
def test_bad_specs_are_refused(change: dict[str, Any], message: str) -> None:
    spec = _tracker()
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if key == "network" else value
    with pytest.raises(InvalidSpec, match=message):
        build_filter(ModelSpec.model_validate(spec))


def _post(c: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post(path, json=body)
    assert r.status_code in (200, 201), r.text
    out: dict[str, Any] = r.json()
    return out


def test_tracking_over_http_equals_the_numpy_filter_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    q, r, prior = 0.3, 0.5, 10.0
    dts, ys = _track(40, seed=11, q=q, r=r)
    H = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    steps = [(*_cv(dt, q), y) for dt, y in zip(dts, ys, strict=True)]
    means, covs, lls = _numpy_kalman(np.zeros(4), prior * np.eye(4), steps, H, r * np.eye(2))
    with running(tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        _post(c, "/v1/models", _tracker(prior, q, r))
        got: list[float] = []
        for i in range(0, 30, 10):  # batches of 10 rows with their time steps
            body = {"y": ys[i : i + 10].tolist(), "dt": dts[i : i + 10]}
            got += _post(c, "/v1/models/tracker/update", body)["log_likelihood"]
        np.testing.assert_allclose(got, lls[:30], rtol=0, atol=TOL)
        # bad input: 422, nothing changed
        for bad, says in (
            ({"y": [[0.0, 0.0]], "dt": [-1.0]}, "dt must be > 0"),
            ({"y": [[0.0, 0.0]], "x": [[1.0]]}, "not x"),
            ({"y": [[0.0, 0.0]], "dt": [1.0, 2.0]}, "dt has 2 entries"),
            ({"y": [[0.0, 0.0]], "dt": [float("nan")]}, "finite"),
        ):
            raw = json.dumps(bad).encode()  # NaN as JSON's NaN token, which the parser reads
            resp = c.post(
                "/v1/models/tracker/update",
                content=raw,
                headers={"content-type": "application/json"},
            )
            assert resp.status_code == 422 and says in resp.text, resp.text
        assert c.get("/v1/models/tracker").json()["version"] == 30
    # a restart replays the log: the next rows continue the same filter
    with running(tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        body = {"y": ys[30:].tolist(), "dt": dts[30:]}
        np.testing.assert_allclose(
            _post(c, "/v1/models/tracker/update", body)["log_likelihood"],
            lls[30:],
            rtol=0,
            atol=TOL,
        )
        # the predicted observation dt ahead: H A(dt) m, H (A P A^T + Q) H^T + R
        ahead = _post(c, "/v1/models/tracker/predict", {"dt": [0.0, 0.5, 2.0]})
        for k, dt in enumerate((0.0, 0.5, 2.0)):  # dt 0: the filtered state's H m, H P H^T
            A, Q = _cv(dt, q)
            mean = H @ A @ means[-1]
            var = np.diag(H @ (A @ covs[-1] @ A.T + Q) @ H.T) + r
            np.testing.assert_allclose(ahead["mean"][k], mean, rtol=0, atol=TOL)
            np.testing.assert_allclose(ahead["variance"][k], var, rtol=0, atol=TOL)
            np.testing.assert_allclose(ahead["state_mean"][k], A @ means[-1], rtol=0, atol=TOL)
            P = A @ covs[-1] @ A.T + Q
            np.testing.assert_allclose(ahead["state_covariance"][k], P, rtol=0, atol=TOL)


def test_the_tracking_example_filters_better_than_the_sensor(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "tracking.py"
    with running(tmp_path) as server:
        out = subprocess.run(
            [sys.executable, str(example), "--url", server.url, "--steps", "60"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    found = re.search(r"observed ([\d.]+), filtered ([\d.]+)", out)
    assert found is not None, out
    assert float(found.group(2)) < float(found.group(1))
