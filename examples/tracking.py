"""Tracking an object in 2-D through Postserve: the online-BNN talk's first example.

An object moves with a nearly constant velocity (white-noise acceleration); a sensor reports its
position, with noise, at irregular times. The model is a state-space model (``docs/algorithms.md``
3.11): state [x, y, vx, vy], a constant-velocity transition over each report's time step ``dt``,
the positions observed. Each report is one ``/update`` with ``y`` (the observed position) and
``dt``; after it, ``/predict`` with ``dt: [0]`` gives the filtered position and ``dt: [1]`` the
position one time unit ahead. Start a server, then run::

    POSTSERVE_STORE=memory postserve serve --port 8000
    python examples/tracking.py [--url http://127.0.0.1:8000] [--steps 200] [--plot track.png]

It prints the root-mean-square error of the observed and of the filtered positions against the
true ones, and with ``--plot`` (matplotlib) draws true, observed and filtered positions.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import numpy as np

from service.client import Client, PostserveHTTPError

MODEL = "tracker"
Q, R = 0.2, 0.5  # acceleration noise intensity, sensor noise variance


def spec() -> dict[str, object]:
    return {
        "name": MODEL,
        "network": {
            "type": "state_space",
            "state_dim": 4,
            "observation_matrix": [[1, 0, 0, 0], [0, 1, 0, 0]],
            "transition": {"type": "constant_velocity", "dims": 2},
            "process_covariance": {"type": "white_acceleration", "q": Q},
        },
        "likelihood": {"type": "gaussian", "noise_variance": [R, R]},
        "filter": {"type": "kalman"},
        "prior": {"variance": 100.0},
        "dtype": "float64",
    }


def simulate(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time steps, true positions and observed positions of a simulated track."""
    rng = np.random.default_rng(seed)
    dts = rng.exponential(0.4, steps) + 0.05
    z = np.array([0.0, 0.0, 1.0, 0.6])
    true, seen = [], []
    for dt in dts:
        A = np.eye(4)
        A[0, 2] = A[1, 3] = dt
        Qd = Q * np.kron(np.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]]), np.eye(2))
        z = A @ z + rng.multivariate_normal(np.zeros(4), Qd)
        true.append(z[:2].copy())
        seen.append(z[:2] + rng.normal(0, math.sqrt(R), 2))
    return dts, np.array(true), np.array(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write a PNG of the track here")
    args = parser.parse_args()
    dts, true, seen = simulate(args.steps, args.seed)
    with Client(args.url) as client:
        with contextlib.suppress(PostserveHTTPError):  # not there yet
            client.delete_model(MODEL)
        client.create_model(spec())
        filtered = []
        for dt, y in zip(dts, seen, strict=True):
            client.update(MODEL, None, [y.tolist()], dt=[float(dt)])
            now = client.predict(MODEL, None, dt=[0.0])  # the filtered position
            filtered.append(now.mean[0])
        ahead = client.predict(MODEL, None, dt=[1.0])
    filtered_a = np.array(filtered)

    def rmse(a: np.ndarray) -> float:
        return float(np.sqrt(((a - true) ** 2).sum(axis=1).mean()))

    print(f"{args.steps} reports, mean time step {dts.mean():.2f}")
    print(f"position RMSE: observed {rmse(seen):.3f}, filtered {rmse(filtered_a):.3f}")
    print(f"one time unit ahead: {np.round(ahead.mean[0], 3).tolist()}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 5))
        ax.plot(true[:, 0], true[:, 1], "k-", lw=1.5, label="true")
        ax.plot(seen[:, 0], seen[:, 1], ".", color="tab:red", ms=4, label="observed")
        ax.plot(filtered_a[:, 0], filtered_a[:, 1], "-", color="tab:blue", label="filtered")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title("2-D tracking, constant velocity, irregular time steps")
        ax.legend()
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
