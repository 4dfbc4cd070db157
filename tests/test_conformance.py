"""One conformance suite over everything registered (as river's ``test_estimators.py``).

Every algorithm of ``ALGORITHMS`` is run with every likelihood of ``LIKELIHOODS`` and every
network of ``NETWORKS`` that it accepts (``check_model``), built through the registries from
specs alone, so a new kind is tested by being registered. Independent truths:

* the closed-form Bayesian posterior: from the isotropic prior, which every algorithm represents
  exactly, one observation of a linear-Gaussian model moves the mean by the exact Kalman gain;
* the kind's own claims: the state class and size it declares, the belief's dense covariance
  (PSD, and the law of its samples), J Sigma J^T of ``project`` against the dense covariance,
  through the network's structured Jacobian operator and through the dense J alike;
* purity and determinism: a step never writes to its input and repeats bit for bit, a state
  survives the snapshot codec bit for bit, and a model restored by a fresh engine from the
  store (snapshot + log replay) answers exactly as the one that wrote it;
* every network's closed-form Jacobian against autodiff (``torch.func``), and its Jacobian
  operator (``jacobian_operator``: ``gram``, ``jvp``, ``dense``) against that dense Jacobian.

The Monte Carlo check has a false-alarm rate of 1e-3 per case (fixed seeds: a pass reproduces).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import pytest
import torch
from scipy import stats

from service.components import ALGORITHMS, LIKELIHOODS, NETWORKS
from service.components.build import build_filter, decode_state, encode_state
from service.config import Settings
from service.errors import InvalidInput, InvalidSpec
from service.filters import Belief, OnlineFilter, jacobian_autodiff
from service.filters.algorithm import state_tensors
from service.filters.gradient import point_estimate
from service.filters.networks import DenseJacobian
from service.filters.statespace import StateSpace
from service.hosting import Engine
from service.schemas import ModelSpec, PredictRequest, UpdateRequest
from service.store import Backend, MemoryStore, SoleWriter

F64 = torch.float64
ALPHA = 1e-3
LABELS = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]  # valid for every registered likelihood (C chosen below)


def _output_dim(likelihood: str) -> int:
    """The first of 1, 3 outputs the likelihood accepts."""
    lik = LIKELIHOODS[likelihood].build(
        LIKELIHOODS[likelihood].spec.model_validate({"type": likelihood})
    )
    for C in (1, 3):
        try:
            lik.check_output_dim(C)
            return C
        except InvalidSpec:
            continue
    raise AssertionError(f"likelihood {likelihood} takes neither 1 nor 3 outputs")


def _spec(network: str, likelihood: str, algorithm: str, **extra: Any) -> ModelSpec:
    net = {"type": network, **NETWORKS[network].example, "output_dim": _output_dim(likelihood)}
    return ModelSpec.model_validate(
        {
            "name": f"{network}-{likelihood}-{algorithm}",
            "network": net,
            "likelihood": {"type": likelihood},
            "filter": {"type": algorithm, **ALGORITHMS[algorithm].example},
            "prior": {"variance": 0.5},
            "dtype": "float64",
            **extra,
        }
    )


def _combos() -> list[tuple[str, str, str]]:
    out = []
    for algorithm, _ in ALGORITHMS:
        for likelihood, _ in LIKELIHOODS:
            for network, _ in NETWORKS:
                try:
                    build_filter(_spec(network, likelihood, algorithm))
                except InvalidSpec:
                    continue  # e.g. kalman on an MLP: refused at creation, tested elsewhere
                out.append((network, likelihood, algorithm))
    return out


COMBOS = _combos()


def _first(network: str) -> tuple[str, str, str]:
    return next(c for c in COMBOS if c[0] == network)


IDS = ["-".join(c) for c in COMBOS]
#: the learners (sgd, replay_sgd, ivon): gradient steps, no closed form to compare one step with
POINTS = {c[2] for c in COMBOS if hasattr(build_filter(_spec(*c)).algorithm, "learn")}


def _stream(f: OnlineFilter[Belief], T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T input rows and labels; a state-space model's rows are its time steps (> 0)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(f.network, StateSpace):
        x = 0.1 + 2 * torch.rand(T, 1, dtype=F64, generator=g)
    else:
        x = torch.randn(T, f.network.input_dim, dtype=F64, generator=g)
    return x, torch.tensor(LABELS[:T])


def _rows(f: OnlineFilter[Belief], rows: list[list[float]]) -> dict[str, Any]:
    """The request fields that give ``rows``: ``x``, or a state-space model's ``dt``."""
    return {"dt": [r[0] for r in rows]} if isinstance(f.network, StateSpace) else {"x": rows}


def _tensors(state: Belief) -> dict[str, torch.Tensor]:
    return state_tensors(state)  # every field but an optional one left None


def test_every_point_has_its_kinds_registered() -> None:
    assert set(ALGORITHMS.names()) >= {"lofi", "ekf", "diagonal", "kalman"}
    assert set(LIKELIHOODS.names()) >= {"gaussian", "bernoulli", "categorical", "poisson"}
    assert set(NETWORKS.names()) >= {"linear", "mlp"}
    assert all(any(c[2] == a for c in COMBOS) for a in ALGORITHMS.names())
    with pytest.raises(InvalidSpec, match="unknown filter type 'nope'; registered: lofi"):
        ALGORITHMS["nope"]


@pytest.mark.parametrize(("network", "likelihood", "algorithm"), COMBOS, ids=IDS)
def test_declared_state_class_and_size(network: str, likelihood: str, algorithm: str) -> None:
    spec = _spec(network, likelihood, algorithm)
    kind = ALGORITHMS[algorithm]
    f = build_filter(spec)
    assert f.algorithm.name == algorithm
    for dtype, width in ((torch.float32, 4), (F64, 8)):
        state = f.init(dtype=dtype)
        assert type(state) is kind.state
        assert f.state_bytes(state) == kind.numbers(spec.filter, f.network) * width
        x, y = _stream(f, 2, seed=1)
        after, _ = f.run(state, x.to(dtype), y.to(dtype))
        assert type(after) is kind.state and f.state_bytes(after) == f.state_bytes(state)


@pytest.mark.parametrize(("network", "likelihood", "algorithm"), COMBOS, ids=IDS)
def test_steps_are_pure_deterministic_and_survive_the_codec(
    network: str, likelihood: str, algorithm: str
) -> None:
    f = build_filter(_spec(network, likelihood, algorithm))
    x, y = _stream(f, 4, seed=2)
    state, _ = f.run(f.init(dtype=F64), x[:2], y[:2])
    before = {k: v.clone() for k, v in _tensors(state).items()}
    a, infos_a = f.run(state, x[2:], y[2:])
    b, infos_b = f.run(state, x[2:], y[2:])
    for k, v in _tensors(state).items():
        assert torch.equal(v, before[k]), f"the step wrote to its input's {k}"
    for k, v in _tensors(a).items():
        assert torch.equal(v, getattr(b, k)), f"two runs of the same step differ in {k}"
    assert [float(i.log_likelihood) for i in infos_a] == [float(i.log_likelihood) for i in infos_b]
    tensors, meta = encode_state(a, 4, algorithm)
    assert json.loads(meta) == {"version": 4, "algorithm": algorithm, "format": 1}
    back = decode_state(tensors, algorithm, F64, torch.device("cpu"))
    assert type(back) is type(a)
    for k, v in _tensors(a).items():
        assert torch.equal(v, getattr(back, k)), f"the codec changed {k}"
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        f.run(a, torch.full_like(x[:1], math.nan), y[:1])


@pytest.mark.parametrize(("network", "likelihood", "algorithm"), COMBOS, ids=IDS)
def test_belief_covariance_projection_and_samples_agree(
    network: str, likelihood: str, algorithm: str
) -> None:
    f = build_filter(_spec(network, likelihood, algorithm))
    x, y = _stream(f, 5, seed=3)
    state, _ = f.run(f.init(dtype=F64), x, y)
    Sigma = f.algorithm.covariance(state)
    D = f.num_params
    assert Sigma.shape == (D, D)
    torch.testing.assert_close(Sigma, Sigma.mT)
    point = point_estimate(f.algorithm)  # sgd, replay_sgd: a point, Sigma = 0
    assert float(torch.linalg.eigvalsh(Sigma).min()) > 0 or (point and not Sigma.any())
    _, J = f.network.jacobian(state.mean, x)
    _, op = f.network.jacobian_operator(state.mean, x)
    for jac in (op, DenseJacobian(J)):
        torch.testing.assert_close(
            f.algorithm.project(state, jac), J @ Sigma @ J.mT, rtol=1e-8, atol=1e-10
        )
    pred = f.predictive(state, x)
    torch.testing.assert_close(pred.variance, pred.epistemic + pred.aleatoric)
    torch.testing.assert_close(f.predictive_mean(state, x), pred.mean, rtol=1e-12, atol=1e-14)
    assert bool((pred.epistemic >= 0).all()) and pred.mean.shape == (
        x.shape[0],
        f.network.output_dim,
    )
    # Samples: the squared Mahalanobis distance of each draw from m under Sigma is chi^2(D).
    n = 400
    draws = f.sample(state, n, torch.Generator().manual_seed(4))
    assert draws.shape == (n, D)
    if point:  # a point estimate draws its point, and predicts with no epistemic variance
        assert torch.equal(draws, state.mean.expand(n, D)) and not pred.epistemic.any()
        return
    L = torch.linalg.cholesky(Sigma)
    z = torch.linalg.solve_triangular(L, (draws - state.mean).mT, upper=False)
    p = stats.kstest((z * z).sum(0).numpy(), stats.chi2(D).cdf).pvalue
    assert p > ALPHA, f"draws do not follow N(m, Sigma): KS p = {p:.2e}"


@pytest.mark.parametrize(
    "algorithm", [c[2] for c in COMBOS if c[:2] == ("linear", "gaussian") and c[2] not in POINTS]
)
def test_first_step_from_the_prior_is_the_exact_posterior(algorithm: str) -> None:
    """Linear network, gaussian likelihood, isotropic prior: one observation's posterior mean and
    predictive are the closed-form ones, m_1 = m_0 + s0 h (y - g(m_0)) / (s0 |h|^2 + r), with
    h = [x, 1] (the nn.Linear layout) or, for a projected filter, h = dg/dphi by autodiff."""
    spec = _spec("linear", "gaussian", algorithm, prior={"variance": 0.7})
    f = build_filter(spec)
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)
    y = torch.tensor([1.3], dtype=F64)
    prior = f.init(dtype=F64)
    post, (info,) = f.run(prior, x, y)
    if ALGORITHMS[algorithm].reshape is None:
        h = torch.cat([x[0], torch.ones(1, dtype=F64)])  # nn.Linear layout: weight, then bias
    else:
        h = jacobian_autodiff(f.network, prior.mean, x)[0, 0]
    g0 = float(f.network.apply(prior.mean, x)[0, 0])
    s0, r = 0.7, 1.0
    resid = float(y[0]) - g0
    s = s0 * float(h @ h) + r
    torch.testing.assert_close(post.mean, prior.mean + s0 * h * resid / s)
    torch.testing.assert_close(info.predictive.variance[0, 0], torch.tensor(s, dtype=F64))
    assert math.isclose(float(info.log_likelihood), stats.norm(g0, math.sqrt(s)).logpdf(1.3))


@pytest.mark.parametrize("network", NETWORKS.names())
def test_network_jacobian_equals_autodiff(network: str) -> None:
    # categorical, three outputs, where the network takes them; else its first model
    combo = (network, "categorical", "diagonal")
    f = build_filter(_spec(*(combo if combo in COMBOS else _first(network))))
    theta = f.network.init_mean(torch.Generator().manual_seed(5)) + 0.1
    x = torch.randn(4, f.network.input_dim, dtype=F64, generator=torch.Generator().manual_seed(6))
    g, J = f.network.jacobian(theta, x)
    torch.testing.assert_close(g, f.network.apply(theta, x))
    torch.testing.assert_close(J, jacobian_autodiff(f.network, theta, x))
    g_op, op = f.network.jacobian_operator(theta, x)
    assert op.shape == J.shape
    torch.testing.assert_close(g_op, g)
    torch.testing.assert_close(op.dense(), J)
    gen = torch.Generator().manual_seed(9)
    u = torch.rand(f.num_params, dtype=F64, generator=gen)
    V = torch.randn(3, f.num_params, dtype=F64, generator=gen)
    torch.testing.assert_close(op.gram(u), (J * u) @ J.mT)
    torch.testing.assert_close(op.jvp(V), (J @ V.mT).mT)


@pytest.mark.parametrize(("network", "likelihood", "algorithm"), COMBOS, ids=IDS)
def test_a_restored_model_answers_as_the_one_that_wrote_it(
    network: str, likelihood: str, algorithm: str
) -> None:
    """Through the engine: updates, a snapshot, more updates; a fresh engine on the same store
    restores (snapshot + log replay) to the same version, state and answers, bit for bit."""
    spec = _spec(network, likelihood, algorithm, monitor=True)
    settings = Settings(store="memory", device="cpu", snapshot_every=10_000)
    store = MemoryStore()
    f = build_filter(spec)
    x, y = _stream(f, 6, seed=7)
    rows, labels = x.tolist(), y.tolist()
    query = PredictRequest(**_rows(f, rows[:3]), num_samples=4, seed=8)

    async def ready(engine: Engine) -> None:
        await engine.start()
        while not engine.ready:
            await asyncio.sleep(0.005)

    async def scenario() -> None:
        first = Engine(settings, Backend(store, SoleWriter()))
        await ready(first)
        await first.create(spec)
        for i in range(3):
            await first.update(
                spec.name, UpdateRequest(**_rows(f, rows[i : i + 1]), y=labels[i : i + 1])
            )
        await first.snapshot(spec.name)
        await first.update(spec.name, UpdateRequest(**_rows(f, rows[3:]), y=labels[3:]))
        want = await first.predict(spec.name, query)
        want_cal = await first.calibration(spec.name)
        state = first.catalogue.get(spec.name).current.state
        first.catalogue.ready = False  # a crash: no final snapshot, the log is replayed
        second = Engine(settings, Backend(store, SoleWriter()))
        await ready(second)
        h = second.catalogue.get(spec.name)
        assert h.version == 6 and h.snapshot_version == 3
        for k, v in _tensors(state).items():
            assert torch.equal(v, getattr(h.current.state, k)), f"restored {k} differs"
        assert await second.predict(spec.name, query) == want
        assert await second.calibration(spec.name) == want_cal
        await second.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(("network", "likelihood", "algorithm"), COMBOS, ids=IDS)
def test_the_encoded_answer_is_the_response_model(
    network: str, likelihood: str, algorithm: str
) -> None:
    """What the /predict route sends (JSON bytes encoded from the tensors) holds exactly the
    numbers of the response model, with and without variances and samples."""
    spec = _spec(network, likelihood, algorithm)
    f = build_filter(spec)
    x, y = _stream(f, 4, seed=9)

    async def scenario() -> None:
        engine = Engine(
            Settings(store="memory", device="cpu"), Backend(MemoryStore(), SoleWriter())
        )
        await engine.start()
        while not engine.ready:
            await asyncio.sleep(0.005)
        await engine.create(spec)
        rows = x.tolist()
        await engine.update(spec.name, UpdateRequest(**_rows(f, rows), y=y.tolist()))
        for query in (
            PredictRequest(**_rows(f, rows), num_samples=3, seed=10),
            PredictRequest(**_rows(f, rows[:1])),
            PredictRequest(**_rows(f, rows), num_samples=2, seed=11, variance=False),
        ):
            model = await engine.predict(spec.name, query)
            sent = json.loads(await engine.predict_json(spec.name, query))
            assert sent == json.loads(model.model_dump_json())
        await engine.stop()

    asyncio.run(scenario())
