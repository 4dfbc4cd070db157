"""Bad input and failed steps are reported, and the caller's state is never touched."""

from __future__ import annotations

import pytest
import torch

from service.errors import InvalidInput, InvalidSpec, StepRejected
from service.filters import (
    EKF,
    MLP,
    Bernoulli,
    Diagonal,
    Dynamics,
    Gaussian,
    GaussState,
    Kalman,
    Linear,
    LoFi,
    OnlineFilter,
    Prior,
)

F64 = torch.float64


def _snapshot(state: object) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vars(state).items()}


def _same(state: object, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(getattr(state, k), v) for k, v in snap.items())


@pytest.mark.parametrize("algorithm", [Kalman(), EKF(), Diagonal(), LoFi(rank=2)])
def test_an_overflowing_step_is_rejected_and_the_state_is_untouched(algorithm) -> None:  # type: ignore[no-untyped-def]
    f = OnlineFilter(Linear(2, 1), Gaussian(1.0), algorithm)
    state, _ = f.run(f.init(F64), torch.randn(3, 2, dtype=F64), torch.randn(3, dtype=F64))
    snap = _snapshot(state)
    with pytest.raises(StepRejected) as err:
        f.step(state, torch.tensor([1e300, -1e300], dtype=F64), torch.tensor([1.0], dtype=F64))
    assert err.value.reason in {"non_finite", "not_psd"}
    assert _same(state, snap)
    # The untouched state still takes a normal step.
    f.step(state, torch.tensor([0.5, 0.1], dtype=F64), torch.tensor([1.0], dtype=F64))


def test_a_non_psd_innovation_is_rejected_as_not_psd() -> None:
    f = OnlineFilter(Linear(1, 1, bias=False), Gaussian(0.1), EKF())
    bad = GaussState(mean=torch.zeros(1, dtype=F64), cov=-torch.eye(1, dtype=F64))
    with pytest.raises(StepRejected) as err:
        f.update(bad, torch.tensor([1.0], dtype=F64), torch.tensor([0.0], dtype=F64))
    assert err.value.reason == "not_psd"
    assert "innovation" in err.value.message


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.tensor([[float("nan"), 1.0]]), "NaN"),
        (torch.tensor([[float("inf"), 1.0]]), "NaN or infinite"),
        (torch.ones(1, 3), r"shape \(rows, 2\)"),
        (torch.ones(2), r"shape \(rows, 2\)"),
    ],
)
def test_bad_inputs_are_named(x: torch.Tensor, match: str) -> None:
    f = OnlineFilter(Linear(2, 1), Bernoulli(), LoFi(rank=1))
    state = f.init(F64)
    snap = _snapshot(state)
    with pytest.raises(InvalidInput, match=match):
        f.run(state, x, torch.ones(x.shape[0] if x.ndim == 2 else 1))
    with pytest.raises(InvalidInput, match=match):
        f.predictive(state, x)
    assert _same(state, snap)


def test_row_count_mismatch_is_named() -> None:
    f = OnlineFilter(Linear(2, 1), Gaussian(1.0), EKF())
    with pytest.raises(InvalidInput, match="3 rows but y has 2"):
        f.run(f.init(F64), torch.ones(3, 2), torch.ones(2))


def test_invalid_specs_are_named() -> None:
    with pytest.raises(InvalidSpec, match="kalman"):
        OnlineFilter(MLP(2, (3,)), Gaussian(1.0), Kalman())
    with pytest.raises(InvalidSpec, match="kalman"):
        OnlineFilter(Linear(2, 1), Bernoulli(), Kalman())
    with pytest.raises(InvalidSpec, match=r"prior mean must have shape \(3,\)"):
        OnlineFilter(Linear(2, 1), Gaussian(1.0), EKF(), prior=Prior(mean=torch.zeros(4)))
    with pytest.raises(InvalidSpec, match="output_dim 1"):
        OnlineFilter(Linear(2, 2), Bernoulli(), EKF())
    with pytest.raises(InvalidSpec, match="noise_variance has 3 entries"):
        OnlineFilter(Linear(2, 2), Gaussian((1.0, 2.0, 3.0)), EKF())
    with pytest.raises(InvalidSpec, match="decay"):
        Dynamics(decay=1.5)
    with pytest.raises(InvalidSpec, match="rank"):
        LoFi(rank=-1)
    with pytest.raises(InvalidSpec, match="prior variance"):
        Prior(variance=0.0)


def test_steady_state_process_noise() -> None:
    """steady_state sets q = (1 - gamma^2) sigma_0^2, so the prior variance is a fixed point."""
    f = OnlineFilter(
        Linear(3, 1), Gaussian(1.0), Diagonal(), Dynamics(decay=0.9, steady_state=True), Prior(2.0)
    )
    assert f.process_noise == pytest.approx((1 - 0.81) * 2.0)
    state = f.init(F64)
    for _ in range(5):
        state = f.predict(state)
    torch.testing.assert_close(state.var, torch.full((4,), 2.0, dtype=F64), rtol=1e-14, atol=0)
