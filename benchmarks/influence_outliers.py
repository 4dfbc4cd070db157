"""Do planted outliers rank first in ``GET /v1/models/{name}/influence``? (a benchmark, not a test;
``docs/algorithms.md`` 4.5; the tests check one seed of the first two).

On real streams, for each seed, 1% of the rows (at least one) are made outliers, anywhere in the
stream, and everything is sent through the app (in process, default settings) in batches of 20
rows; then ``/influence?top=K`` for K = 1% and 2% of the rows, and how many planted rows it holds:

- scikit-learn's diabetes (442 x 10, standardised), exact Kalman: y + 10 sd;
- river's TrumpApproval (1,001 x 6, standardised), exact Kalman: y + 10 sd;
- scikit-learn's breast cancer (569 x 30, standardised), bernoulli EKF: the label flipped.

    python -m benchmarks.influence_outliers [--seeds 20]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from service.testing.inprocess import in_process


def _streams() -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    from river import datasets
    from sklearn.datasets import load_breast_cancer, load_diabetes

    def std(a: np.ndarray) -> np.ndarray:
        return np.asarray((a - a.mean(0)) / a.std(0))

    X, y = load_diabetes(return_X_y=True)
    trump = list(datasets.TrumpApproval())
    keys = sorted(trump[0][0])
    TX = np.array([[x[k] for k in keys] for x, _ in trump])
    BX, by = load_breast_cancer(return_X_y=True)
    return {
        "diabetes": (std(X), std(y), "shift"),
        "TrumpApproval": (std(TX), std(np.array([float(t) for _, t in trump])), "shift"),
        "breast cancer": (std(BX), by.astype(float), "flip"),
    }


def _spec(d: int, kind: str) -> dict[str, Any]:
    if kind == "flip":
        lik, filt = {"type": "bernoulli"}, {"type": "ekf"}
    else:
        lik, filt = {"type": "gaussian", "noise_variance": 0.5}, {"type": "kalman"}
    return {
        "name": "m",
        "network": {"type": "linear", "input_dim": d},
        "likelihood": lik,
        "filter": filt,
        "dtype": "float64",
    }


def found(X: np.ndarray, y: np.ndarray, kind: str, seed: int) -> tuple[int, int, int]:
    """(planted rows, of them in the top 1%, in the top 2%) for one seed."""
    n_out = max(1, len(y) // 100)
    planted = {int(i) for i in np.random.default_rng(seed).choice(len(y), n_out, replace=False)}
    ys = y.copy()
    for i in planted:
        ys[i] = 1.0 - y[i] if kind == "flip" else y[i] + 10 * y.std()
    with in_process() as c:
        assert c.post("/v1/models", json=_spec(X.shape[1], kind)).status_code == 201
        for s in range(0, len(y), 20):
            body = {"x": X[s : s + 20].tolist(), "y": ys[s : s + 20].tolist()}
            assert c.post("/v1/models/m/update", json=body).status_code == 200
        hits = []
        for k in (n_out, 2 * n_out):
            top = c.get("/v1/models/m/influence", params={"top": k}).json()["items"]
            hits.append(len({it["version"] - 1 for it in top} & planted))
    return n_out, hits[0], hits[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20)
    args = p.parse_args()
    print("| stream | outliers | seeds | all in the top 1% | found in the top 1% | in the top 2% |")
    print("|---|---|---|---|---|---|")
    for name, (X, y, kind) in _streams().items():
        runs = [found(X, y, kind, seed) for seed in range(args.seeds)]
        n = runs[0][0]
        every = sum(r[1] == n for r in runs)
        one = f"{min(r[1] for r in runs)}-{max(r[1] for r in runs)} of {n}"
        two = f"{min(r[2] for r in runs)}-{max(r[2] for r in runs)} of {n}"
        what = "label flipped" if kind == "flip" else "y + 10 sd"
        print(f"| {name} | {what} | {args.seeds} | {every} / {args.seeds} | {one} | {two} |")


if __name__ == "__main__":
    main()
