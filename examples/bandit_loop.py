"""A bandit loop against Postserve: decide, act, post the reward later.

A simulated shop shows one of three banners to each visitor. Which banner a visitor clicks
depends on the visitor (a context of 2 features) and the banner (3 features); the loop never sees
the true click model. Each visitor is one round of two calls:

1. ``POST /v1/models/banners/decide`` with the visitor's context and one row of features per banner:
   Postserve draws one sample from its posterior (Thompson sampling), answers the banner to show,
   its propensity and an ``event_id``, and keeps the event's features.
2. ``POST /v1/models/banners/reward`` with that ``event_id`` and the reward (1 = click, 0 = none;
   rewards are maximised): one Bayesian update of the model with the stored features. It may come
   minutes later and from another process; posting it twice changes nothing.

Start a server first, then run the loop::

    POSTSERVE_STORE=memory postserve serve --port 8000
    python examples/bandit_loop.py [--url http://127.0.0.1:8000] [--rounds 2000]

It prints the click rate every 500 rounds next to the rate of the best banner per visitor (what
an oracle would get) and of a random banner.
"""

from __future__ import annotations

import argparse

import numpy as np

from service.client import Client, PostserveHTTPError

MODEL = "banners"
BANNERS = np.array([[1.0, 0.0, 0.2], [0.0, 1.0, 0.5], [0.5, 0.5, 1.0]])  # 3 banners x 3 features
TRUE_W = np.array([[1.5, -1.0, 0.3], [-1.0, 1.5, 0.3]])  # hidden: context x banner interaction


def spec(n_context: int, n_action: int) -> dict[str, object]:
    """A Bernoulli MLP over [context, banner features]; LoFi posterior of rank 5."""
    return {
        "name": MODEL,
        "network": {"type": "mlp", "input_dim": n_context + n_action, "hidden": [16],
                    "output_dim": 1, "activation": "relu"},
        "likelihood": {"type": "bernoulli"},
        "filter": {"type": "lofi", "rank": 5},
        "prior": {"variance": 0.1},
    }  # fmt: skip


def click_probability(context: np.ndarray) -> np.ndarray:
    """The simulator's click probability of each banner for this visitor (hidden from the loop)."""
    logits = context @ TRUE_W @ BANNERS.T - 1.0
    return np.asarray(1.0 / (1.0 + np.exp(-logits)))


def main() -> None:
    parser = argparse.ArgumentParser(description="Thompson-sampling banner loop via Postserve")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with Client(args.url) as client:
        try:
            client.delete_model(MODEL)  # start afresh when rerun
        except PostserveHTTPError as err:
            if err.status != 404:
                raise
        client.create_model(spec(2, BANNERS.shape[1]))
        clicks = best = uniform = 0.0
        for t in range(1, args.rounds + 1):
            context = rng.normal(size=2)
            decision = client.decide(MODEL, BANNERS.tolist(), context=context.tolist())
            p = click_probability(context)
            reward = float(rng.random() < p[decision.action])  # the visitor clicks, or not
            client.reward(MODEL, decision.event_id, reward)  # may arrive much later in real life
            clicks, best, uniform = clicks + reward, best + p.max(), uniform + p.mean()
            if t % 500 == 0:
                print(f"round {t}: click rate {clicks / t:.3f} (oracle {best / t:.3f}, "
                      f"random {uniform / t:.3f}); last propensity {decision.propensity:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
