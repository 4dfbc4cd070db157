"""Partial observations (``outputs``: row i observes output k_i alone) over every registered kind.

Independent truths:

* the dense joint Gaussian: for a linear network with a gaussian likelihood, theta ~ N(m, P) and
  y_i = phi_i^T theta_{k_i} + noise r_{k_i} are jointly Gaussian, and the posterior after rows
  that each observe one output is that joint conditioned on those coordinates, computed here with
  dense matrices (the exact filters must match it over several rows; every algorithm must match
  it for one row from the isotropic prior, which each represents exactly);
* the restriction's own claim: a one-output model observed through ``outputs = [0, ...]`` is the
  model observed without it, bit for bit; a family whose one observation covers every output
  (categorical) refuses ``outputs``, as does an index out of range, naming it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.components import ALGORITHMS, LIKELIHOODS
from service.components.build import build_filter
from service.errors import InvalidInput
from service.filters import Linear, OnlineFilter
from service.filters.outputs import OutputOf
from service.schemas import ModelSpec

F64 = torch.float64
NOISE = [0.5, 1.0, 2.0]
I, C = 3, 3


def _filter(algorithm: str, likelihood: dict[str, Any], output_dim: int = C) -> OnlineFilter[Any]:
    spec = ModelSpec.model_validate(
        {
            "name": "partial",
            "network": {"type": "linear", "input_dim": I, "output_dim": output_dim},
            "likelihood": likelihood,
            "filter": {"type": algorithm, **ALGORITHMS[algorithm].example},
            "prior": {"variance": 0.7},
            "dtype": "float64",
        }
    )
    return build_filter(spec)


def _H(x: torch.Tensor, outputs: list[int]) -> torch.Tensor:
    """Rows of the observation matrix: phi = [x, 1] in output k's weights and bias (nn.Linear
    layout: W (C, I) row-major, then b (C,))."""
    H = torch.zeros(len(outputs), C * I + C, dtype=F64)
    for i, k in enumerate(outputs):
        H[i, k * I : (k + 1) * I] = x[i]
        H[i, C * I + k] = 1.0
    return H


def _dense_posterior(
    m: torch.Tensor, P: torch.Tensor, x: torch.Tensor, y: torch.Tensor, outputs: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The joint Gaussian conditioned on the observed coordinates: mean, covariance, and each
    row's one-step-ahead predictive variance (its conditional variance given the rows before)."""
    H = _H(x, outputs)
    R = torch.diag(torch.tensor([NOISE[k] for k in outputs], dtype=F64))
    S = H @ P @ H.T + R
    K = P @ H.T @ torch.linalg.inv(S)
    L = torch.linalg.cholesky(S)
    return m + K @ (y - H @ m), P - K @ H @ P, L.diagonal() ** 2


@pytest.mark.parametrize("algorithm", ["kalman", "ekf"])
def test_exact_filters_match_the_joint_gaussian_conditioned_on_the_observed_outputs(
    algorithm: str,
) -> None:
    f = _filter(algorithm, {"type": "gaussian", "noise_variance": NOISE})
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, I, dtype=F64, generator=gen)
    y = torch.randn(6, dtype=F64, generator=gen)
    outputs = [0, 2, 2, 1, 0, 2]
    prior = f.init(dtype=F64)
    post, infos = f.run(prior, x, y, outputs=outputs)
    m, P, s = _dense_posterior(prior.mean, f.algorithm.covariance(prior), x, y, outputs)
    torch.testing.assert_close(post.mean, m)
    torch.testing.assert_close(f.algorithm.covariance(post), P)
    got = torch.stack([i.predictive.variance[0, 0] for i in infos])
    torch.testing.assert_close(got, s)
    assert all(i.predictive.mean.shape == (1, 1) for i in infos)


#: the learners (gradient steps: sgd, replay_sgd, ivon), whose first step is not the posterior
LEARNERS = {
    n
    for n, k in ALGORITHMS
    if hasattr(k.build(k.spec.model_validate({"type": n, **k.example}), Linear(I, C)), "learn")
}


@pytest.mark.parametrize(
    "algorithm", [n for n, k in ALGORITHMS if k.reshape is None and n not in LEARNERS]
)
def test_one_partial_observation_from_the_prior_is_the_exact_posterior(algorithm: str) -> None:
    """Every algorithm represents the isotropic prior exactly, so its first step is exact: only
    the observed output's weights and bias move, by the Kalman gain of that output alone."""
    f = _filter(algorithm, {"type": "gaussian", "noise_variance": NOISE})
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    y = torch.tensor([1.3], dtype=F64)
    prior = f.init(dtype=F64)
    P0 = 0.7 * torch.eye(f.num_params, dtype=F64)
    for k in range(C):
        post, (info,) = f.run(prior, x, y, outputs=[k])
        m, _, s = _dense_posterior(prior.mean, P0, x, y, [k])
        torch.testing.assert_close(post.mean, m)
        torch.testing.assert_close(info.predictive.variance[0, 0], s[0])
        moved = (post.mean != prior.mean).nonzero().flatten().tolist()
        assert moved == [k * I, k * I + 1, k * I + 2, C * I + k]


@pytest.mark.parametrize("likelihood", LIKELIHOODS.names())
def test_outputs_of_each_likelihood(likelihood: str) -> None:
    """One-output families: ``outputs = [0]`` is the plain update, bit for bit; categorical
    refuses (its label observes every class); indices out of range are refused by name."""
    lik = {"type": likelihood}
    if likelihood == "categorical":
        f = _filter("lofi", lik)
        x, y = torch.ones(1, I, dtype=F64), torch.tensor([1.0], dtype=F64)
        with pytest.raises(InvalidInput, match=r"categorical observation .* every class"):
            f.run(f.init(dtype=F64), x, y, outputs=[1])
        return
    many = likelihood == "gaussian"
    f = _filter("lofi", lik, C if many else 1)
    x = torch.randn(3, I, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0.0, 1.0, 1.0], dtype=F64)
    prior = f.init(dtype=F64)
    if not many:
        plain, plain_infos = f.run(prior, x, y)
        partial, partial_infos = f.run(prior, x, y, outputs=[0, 0, 0])
        assert torch.equal(plain.mean, partial.mean)
        assert all(
            torch.equal(a.predictive.mean, b.predictive.mean)
            for a, b in zip(plain_infos, partial_infos, strict=True)
        )
    top = f.network.output_dim
    with pytest.raises(InvalidInput, match=rf"outputs\[1\] = {top} is not an output"):
        f.run(prior, x, y, outputs=[0, top, 0])
    with pytest.raises(InvalidInput, match="outputs has 2 entries but x has 3 rows"):
        f.run(prior, x, y, outputs=[0, 0])


def test_output_of_a_network_is_its_row_of_the_jacobian() -> None:
    f = _filter("lofi", {"type": "gaussian"})
    mlp = build_filter(
        ModelSpec.model_validate(
            {
                "name": "m",
                "network": {"type": "mlp", "input_dim": I, "hidden": [4], "output_dim": C},
                "likelihood": {"type": "gaussian"},
                "dtype": "float64",
            }
        )
    ).network
    x = torch.randn(5, I, dtype=F64, generator=torch.Generator().manual_seed(2))
    for net in (f.network, mlp):
        theta = net.init_mean(torch.Generator().manual_seed(4)) + 0.1
        g, J = net.jacobian(theta, x)
        for k in range(C):
            part = OutputOf(net, k)
            gk, Jk = part.jacobian(theta, x)
            torch.testing.assert_close(gk, g[:, k : k + 1])
            torch.testing.assert_close(Jk, J[:, k : k + 1])
            torch.testing.assert_close(part.apply(theta, x), gk)
            bias = net.output_bias
            assert bias is not None and part.output_bias == slice(
                bias.start + k, bias.start + k + 1
            )


def test_the_kalman_block_takes_partial_rows_as_the_row_by_row_filter_does() -> None:
    """Static dynamics: the rows of a request, each observing its own output, are one block
    update (``docs/algorithms.md`` 3.7), equal to the row-by-row loop to rounding."""
    from service.filters.block import applies
    from service.filters.outputs import partial_targets

    f = _filter("kalman", {"type": "gaussian", "noise_variance": NOISE})
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(40, I, dtype=F64, generator=gen)
    y = torch.randn(40, dtype=F64, generator=gen)
    outputs = torch.randint(0, C, (40,), generator=gen).tolist()
    prior = f.init(dtype=F64)
    assert applies(f, 40, partial=True)
    block, block_infos = f.run(prior, x, y, outputs=outputs)
    Y, filters = partial_targets(f, x, y, outputs)
    rows, row_infos = f._run_rows(prior, x, Y, None, filters)
    torch.testing.assert_close(block.mean, rows.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(block.cov, rows.cov, rtol=1e-9, atol=1e-12)
    for a, b in zip(block_infos, row_infos, strict=True):
        for field in ("mean", "epistemic", "aleatoric"):
            torch.testing.assert_close(getattr(a.predictive, field), getattr(b.predictive, field))
        torch.testing.assert_close(a.log_likelihood, b.log_likelihood)
