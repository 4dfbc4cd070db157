"""Compiled steps (``service.filters.compiled``, ``POSTSERVE_COMPILE_STEPS``): the kernel computes
what the eager step computes, to rounding; the same rows through it give the same bits; a row it
cannot vouch for is computed eagerly, with the eager step's verdict; and a server that compiles
its models' steps restores them bit for bit after a SIGKILL, through the kernel that computed
each log record.

Each kernel compiles in seconds to a minute (a C++ compiler runs), so the module compiles each
once, and the server tests load them from the fixtures' directories where they can. The
compiled Thompson draws of one row (``compiled.DrawKernel``) decide as the eager draws do from
the same normals.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from service.components.build import build_filter
from service.errors import InvalidInput, StepRejected
from service.filters import (
    MLP,
    Bernoulli,
    Gaussian,
    Kalman,
    Linear,
    LoFi,
    OnlineFilter,
    Prior,
    compiled,
)
from service.filters.compiled import RowKernel, compile_step, kernel_key
from service.policy import decide
from service.schemas import ModelSpec
from service.testing import MakeServer

pytestmark = pytest.mark.slow

KALMAN = OnlineFilter(Linear(3), Gaussian(0.5), Kalman(), prior=Prior(2.0))
LOFI = OnlineFilter(MLP(4, (8,), 1, "tanh"), Bernoulli(), LoFi(3), prior=Prior(1.0))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RowKernel[object]]:
    directory = tmp_path_factory.mktemp("kernels")
    return {
        "kalman": compile_step(KALMAN, KALMAN.init(dtype=torch.float64), directory),
        "lofi": compile_step(LOFI, LOFI.init(dtype=torch.float32), directory),
    }


def _rows(
    f: OnlineFilter[object], n: int, seed: int, binary: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f.network.input_dim, generator=g, dtype=torch.float64)
    y = (
        (torch.rand(n, generator=g) > 0.5).double()
        if binary
        else torch.randn(n, generator=g, dtype=torch.float64)
    )
    return x, y


def _accepted(f: OnlineFilter, kernel: RowKernel, x: torch.Tensor, y: torch.Tensor) -> int:
    """Rows the kernel computes itself (its checks passed), stepping from f's prior."""
    state, n = f.init(dtype=torch.float64 if f is KALMAN else torch.float32), 0
    Y = f.encode(y).to(state.mean.dtype)
    for i in range(x.shape[0]):
        done = kernel(state, x[i : i + 1].to(state.mean.dtype), Y[i])
        if done is not None:
            state, n = done[0], n + 1
        else:
            state, _ = f.run(state, x[i : i + 1], y[i : i + 1])
    return n


def test_the_kalman_kernel_is_the_exact_posterior_to_rounding(
    kernels: dict[str, RowKernel[object]],
) -> None:
    x, y = _rows(KALMAN, 40, 0)
    state0 = KALMAN.init(dtype=torch.float64)
    eager, e_infos = KALMAN.run(state0, x, y)
    fast, k_infos = KALMAN.run(state0, x, y, kernels["kalman"])
    # the closed form: the Bayesian linear-regression posterior over [x, 1]
    H = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    precision = torch.eye(4, dtype=torch.float64) / 2.0 + H.T @ H / 0.5
    cov = torch.linalg.inv(precision)
    mean = cov @ (H.T @ y) / 0.5
    torch.testing.assert_close(fast.mean, mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.cov, cov, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.mean, eager.mean, rtol=1e-12, atol=1e-14)
    assert _accepted(KALMAN, kernels["kalman"], x, y) == 40  # the kernel's, not the fallback's
    for a, b in zip(e_infos, k_infos, strict=True):  # each row's one-step-ahead report
        torch.testing.assert_close(b.predictive.mean, a.predictive.mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.predictive.variance, a.predictive.variance, rtol=1e-12, atol=0)
        torch.testing.assert_close(b.log_likelihood, a.log_likelihood, rtol=1e-12, atol=1e-14)


def test_the_lofi_kernel_agrees_with_the_eager_step_and_repeats_its_bits(
    kernels: dict[str, RowKernel[object]],
) -> None:
    x, y = _rows(LOFI, 60, 1, binary=True)
    state0 = LOFI.init(dtype=torch.float32)
    eager, e_infos = LOFI.run(state0, x, y)
    fast, k_infos = LOFI.run(state0, x, y, kernels["lofi"])
    again, _ = LOFI.run(state0, x, y, kernels["lofi"])
    for name in ("mean", "W", "upsilon"):
        assert torch.equal(getattr(fast, name), getattr(again, name)), name
    assert _accepted(LOFI, kernels["lofi"], x, y) == 60
    # W's rows are eigenvectors, each up to its sign: compare the precision they make
    torch.testing.assert_close(fast.mean, eager.mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(
        LOFI.algorithm.precision(fast), LOFI.algorithm.precision(eager), rtol=1e-3, atol=1e-3
    )
    for a, b in zip(e_infos, k_infos, strict=True):
        torch.testing.assert_close(b.predictive.mean, a.predictive.mean, rtol=1e-3, atol=1e-4)


def test_a_row_the_kernel_cannot_vouch_for_gets_the_eager_verdict(
    kernels: dict[str, RowKernel[object]],
) -> None:
    state = KALMAN.init(dtype=torch.float64)
    k = kernels["kalman"]
    bad_x = torch.tensor([[1.0, float("nan"), 0.0]], dtype=torch.float64)
    for kernel in (None, k):
        with pytest.raises(InvalidInput, match="x holds NaN"):
            KALMAN.run(state, bad_x, torch.tensor([0.0], dtype=torch.float64), kernel)
    # a finite row whose update overflows float64: rejected, whichever computes it
    huge = torch.tensor([[1e200, 1e200, 1e200]], dtype=torch.float64)
    reasons = []
    for kernel in (None, k):
        with pytest.raises(StepRejected) as err:
            KALMAN.run(state, huge, torch.tensor([1.0], dtype=torch.float64), kernel)
        reasons.append(err.value.reason)
    assert reasons[0] == reasons[1]
    assert k(state, huge, torch.tensor([1.0], dtype=torch.float64)) is None  # its checks failed


def test_a_kernel_key_names_everything_the_kernel_depends_on(
    kernels: dict[str, RowKernel[object]],
) -> None:
    state = KALMAN.init(dtype=torch.float64)
    key = kernel_key(KALMAN, state)
    assert key == kernels["kalman"].key
    other = OnlineFilter(Linear(3), Gaussian(0.25), Kalman(), prior=Prior(2.0))
    assert kernel_key(other, other.init(dtype=torch.float64)) != key  # R is in the kernel
    assert kernel_key(KALMAN, KALMAN.init(dtype=torch.float32)) != key
    wider = OnlineFilter(Linear(4), Gaussian(0.5), Kalman(), prior=Prior(2.0))
    assert kernel_key(wider, wider.init(dtype=torch.float64)) != key
    same_but_prior = OnlineFilter(Linear(3), Gaussian(0.5), Kalman(), prior=Prior(9.0))
    assert kernel_key(same_but_prior, same_but_prior.init(dtype=torch.float64)) == key


def test_a_kernel_of_other_filter_code_is_never_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    state = KALMAN.init(dtype=torch.float64)
    key = kernel_key(KALMAN, state)
    monkeypatch.setattr(compiled, "_source_digest", lambda: "the code of another version")
    assert kernel_key(KALMAN, state) != key


def test_eager_steps_on_another_thread_are_untouched_by_a_compile(tmp_path: Path) -> None:
    f = OnlineFilter(Linear(5), Gaussian(1.0), Kalman(), prior=Prior(1.0))
    x, y = _rows(f, 30, 2)
    reference, _ = f.run(f.init(dtype=torch.float64), x, y)
    built: list[RowKernel[object]] = []
    worker = threading.Thread(
        target=lambda: built.append(compile_step(f, f.init(dtype=torch.float32), tmp_path))
    )
    worker.start()
    runs = 0
    while worker.is_alive():  # the tracer runs meanwhile: the eager step must not see it
        state, _ = f.run(f.init(dtype=torch.float64), x, y)
        assert torch.equal(state.mean, reference.mean) and torch.equal(state.cov, reference.cov)
        runs += 1
    worker.join()
    assert built and runs > 0
    t0 = time.perf_counter()
    again = compile_step(f, f.init(dtype=torch.float32), tmp_path)
    assert again.key == built[0].key and time.perf_counter() - t0 < 5.0  # loaded, not compiled


def _predictions(url: str, name: str) -> bytes:
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post(f"/v1/models/{name}/predict", json={"x": [[0.3, -1.0, 2.0], [1.5, 0.0, -0.5]]})
        assert r.status_code == 200, r.text
        return r.content


def _wait_compiled(c: httpx.Client, name: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = c.get(f"/v1/models/{name}").json()
        assert info["step_error"] is None, info["step_error"]
        if info["step"] == "compiled":
            return
        time.sleep(0.5)
    pytest.fail(f"{name}'s step was not compiled within {timeout} s")


def test_a_compiling_server_restores_bit_for_bit_after_sigkill(make_server: MakeServer) -> None:
    server = make_server(env={"POSTSERVE_COMPILE_STEPS": "1"})
    spec = {
        "name": "k32",
        "network": {"type": "linear", "input_dim": 3},
        "likelihood": {"type": "gaussian", "noise_variance": 0.5},
        "filter": {"type": "kalman"},
        "dtype": "float32",
    }
    g = torch.Generator().manual_seed(3)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/v1/models", json=spec).status_code == 201
        info = c.get("/v1/models/k32").json()
        assert info["step"] in ("eager", "compiled")
        body = {
            "x": torch.randn(5, 3, generator=g).tolist(),
            "y": torch.randn(5, generator=g).tolist(),
        }
        assert c.post("/v1/models/k32/update", json=body).status_code == 200  # eager, or not
        _wait_compiled(c, "k32")
        for _ in range(6):
            body = {
                "x": torch.randn(4, 3, generator=g).tolist(),
                "y": torch.randn(4, generator=g).tolist(),
            }
            r = c.post("/v1/models/k32/update", json=body)
            assert r.status_code == 200, r.text
            assert all(math.isfinite(v) for v in r.json()["log_likelihood"])
    before = _predictions(server.url, "k32")
    server.restart(crash=True)
    assert _predictions(server.url, "k32") == before  # every record replayed by its own kernel
    with httpx.Client(base_url=server.url, timeout=30) as c:
        _wait_compiled(c, "k32", timeout=60.0)  # from the kernel directory: no second compile
        assert c.get("/v1/models/k32").json()["version"] == 29


# -- rows that observe one output alone --------------------------------------------------------

MULTI_SPEC = {
    "name": "arms",
    "network": {"type": "mlp", "input_dim": 3, "hidden": [4], "output_dim": 2},
    "likelihood": {"type": "gaussian", "noise_variance": 0.5},
    "filter": {"type": "lofi", "rank": 2},
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def output_kernels(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, OnlineFilter[object], compiled.OutputKernels[object]]:
    """The model of MULTI_SPEC's steps, compiled once into a directory its server test shares
    (the same keys: the server loads them instead of compiling)."""
    directory = tmp_path_factory.mktemp("output-kernels")
    f = build_filter(ModelSpec.model_validate(MULTI_SPEC))
    state = f.init(dtype=torch.float32)
    return directory, f, compiled.compile_output_steps(f, state, directory)


def test_rows_of_one_output_step_through_that_outputs_kernel(
    output_kernels: tuple[Path, OnlineFilter[object], compiled.OutputKernels[object]],
) -> None:
    _, f, built = output_kernels
    state0 = f.init(dtype=torch.float32)
    assert built.key == compiled.output_kernels_key(f, state0)
    assert [k.key for k in built.steps] == [kernel_key(f.restrict(k), state0) for k in (0, 1)]
    assert built.steps[0].key != built.steps[1].key
    x, y = _rows(f, 40, 5)
    outputs = [i % 3 % 2 for i in range(40)]  # 0, 1, 0, 0, 1, 0, ...
    used: list[int] = []

    def counted(k: int) -> Callable[..., object]:
        def step(state: object, xi: torch.Tensor, yi: torch.Tensor) -> object:
            done = built.steps[k](state, xi, yi)
            used.extend([k] if done is not None else [])
            return done

        return step

    eager, e_infos = f.run(state0, x, y, None, outputs)
    fast, k_infos = f.run(state0, x, y, [counted(0), counted(1)], outputs)
    again, _ = f.run(state0, x, y, built.steps, outputs)
    assert used == outputs  # every row by its own output's kernel, its checks passed
    for name in ("mean", "W", "upsilon"):
        assert torch.equal(getattr(fast, name), getattr(again, name)), name
    torch.testing.assert_close(fast.mean, eager.mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(
        f.algorithm.precision(fast), f.algorithm.precision(eager), rtol=1e-3, atol=1e-3
    )
    for a, b in zip(e_infos, k_infos, strict=True):
        assert a.predictive.mean.shape == b.predictive.mean.shape == (1, 1)
        torch.testing.assert_close(b.predictive.mean, a.predictive.mean, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(b.log_likelihood, a.log_likelihood, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def draw_kernel(
    output_kernels: tuple[Path, OnlineFilter[object], compiled.OutputKernels[object]],
) -> compiled.DrawKernel[object]:
    """MULTI_SPEC's compiled Thompson draws of one row (256 draws, the server's default), in the
    output kernels' directory."""
    directory, f, _ = output_kernels
    return compiled.compile_draws(f, f.init(dtype=torch.float32), directory, 256)


def test_compiled_draws_decide_as_the_eager_draws_from_the_same_normals(
    output_kernels: tuple[Path, OnlineFilter[object], compiled.OutputKernels[object]],
    draw_kernel: compiled.DrawKernel[object],
) -> None:
    _, f, _ = output_kernels
    x, y = _rows(f, 30, 11)
    state, _ = f.run(f.init(dtype=torch.float32), x, y.reshape(30, 1).expand(30, 2), None)
    belief = f.predict(state)
    rows = torch.randn(8, 3, generator=torch.Generator().manual_seed(12))
    mixed = 0
    for seed, row in enumerate(rows):
        args = (f, belief, row[None], "thompson")
        eager = decide(*args, generator=torch.Generator().manual_seed(seed), linearized=True)
        fast = decide(
            *args,
            generator=torch.Generator().manual_seed(seed),
            linearized=True,
            kernel=draw_kernel,
        )
        assert (fast.action, fast.samples, eager.samples) == (eager.action, 256, 256)
        assert fast.propensities == eager.propensities  # the same arg-max of every draw
        assert fast.scores == pytest.approx(eager.scores, rel=1e-5, abs=1e-6)
        mixed += min(eager.propensities) > 0
    assert mixed >= 2  # the draws disagree for some rows: the shares are not trivially 0 and 1
    with pytest.raises(InvalidInput, match="x holds NaN or infinite"):  # the eager verdict
        decide(f, belief, torch.tensor([[math.inf, 0.0, 0.0]]), "thompson", kernel=draw_kernel)


def test_a_server_steps_rows_of_one_output_compiled_and_replays_them_after_sigkill(
    make_server: MakeServer,
    output_kernels: tuple[Path, OnlineFilter[object], compiled.OutputKernels[object]],
    draw_kernel: compiled.DrawKernel[object],
) -> None:
    directory = output_kernels[0]
    env = {"POSTSERVE_COMPILE_STEPS": "1", "POSTSERVE_KERNEL_DIR": str(directory)}
    server = make_server(env=env)
    g = torch.Generator().manual_seed(8)

    def update(c: httpx.Client, n: int) -> None:
        body = {
            "x": torch.randn(n, 3, generator=g).tolist(),
            "y": torch.randn(n, generator=g).tolist(),
            "outputs": [i % 2 for i in range(n)],
        }
        r = c.post("/v1/models/arms/update", json=body)
        assert r.status_code == 200, r.text

    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/v1/models", json=MULTI_SPEC).status_code == 201
        assert c.get("/v1/models/arms").json()["output_step"] == "eager"
        update(c, 3)  # eager; asks for the output kernels
        deadline = time.monotonic() + 120
        while c.get("/v1/models/arms").json()["output_step"] != "compiled":
            assert time.monotonic() < deadline, "the output kernels were not loaded"
            time.sleep(0.2)
        for _ in range(5):
            update(c, 4)
        # a seeded decision of the context alone: eager first, then by the compiled draws
        seeded = {"context": [0.4, -1.2, 0.7], "strategy": "thompson", "seed": 5}
        first = c.post("/v1/models/arms/decide", json=seeded)
        assert first.status_code == 200, first.text
        while c.get("/v1/models/arms").json()["decide_step"] != "compiled":
            assert time.monotonic() < deadline, "the compiled draws were not loaded"
            time.sleep(0.2)
        again = c.post("/v1/models/arms/decide", json=seeded).json()
        assert again["event_id"] != first.json()["event_id"]
        for field in ("action", "propensities", "version"):
            assert again[field] == first.json()[field], field
        assert again["scores"] == pytest.approx(first.json()["scores"], rel=1e-5, abs=1e-6)
    before = _predictions(server.url, "arms")
    server.restart(crash=True)
    assert _predictions(server.url, "arms") == before  # each record by the kernels it names
    with httpx.Client(base_url=server.url, timeout=30) as c:
        info = c.get("/v1/models/arms").json()
        assert (info["version"], info["output_step"]) == (23, "compiled")


# -- the predictive of one row -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["kalman", "lofi"])
def test_the_compiled_predictive_is_the_eager_predictive_to_rounding(
    name: str, tmp_path: Path
) -> None:
    f, dtype, tol = {
        "kalman": (KALMAN, torch.float64, 1e-12),
        "lofi": (LOFI, torch.float32, 1e-5),
    }[name]
    x, y = _rows(f, 40, 21, binary=name == "lofi")
    state, _ = f.run(f.init(dtype=dtype), x, y, None)
    kernel = compiled.compile_predictive(f, state, tmp_path)
    assert kernel.key == compiled.predictive_kernel_key(f, state) != kernel_key(f, state)
    for row in torch.randn(6, f.network.input_dim, generator=torch.Generator().manual_seed(4)):
        row = row[None].to(dtype)
        p = f.predictive(f.predict(state), row)
        want = torch.cat([p.mean, p.variance, p.epistemic, p.aleatoric]).reshape(-1).double()
        got = kernel(state, row)
        assert got.dtype == torch.float64 and got.shape == (4 * f.network.output_dim,)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert float(p.epistemic.min()) > 0  # a posterior that still has something to learn


def test_a_server_predicts_one_row_through_its_compiled_predictive(
    make_server: MakeServer,
) -> None:
    server = make_server(env={"POSTSERVE_COMPILE_STEPS": "1"})
    g = torch.Generator().manual_seed(6)
    body = {
        "x": torch.randn(20, 3, generator=g).tolist(),
        "y": torch.randn(20, generator=g).tolist(),
    }
    one = {"x": [[0.3, -1.0, 2.0]]}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/v1/models", json=MULTI_SPEC).status_code == 201
        assert (
            c.post("/v1/models/arms/update", json=body | {"outputs": [0] * 20}).status_code == 200
        )
        assert c.get("/v1/models/arms").json()["predict_step"] == "eager"
        eager = c.post("/v1/models/arms/predict", json=one).json()  # asks for the kernel
        deadline = time.monotonic() + 300
        while c.get("/v1/models/arms").json()["predict_step"] != "compiled":
            assert time.monotonic() < deadline, "the compiled predictive was not loaded"
            time.sleep(0.2)
        fast = c.post("/v1/models/arms/predict", json=one).json()
        assert fast["version"] == eager["version"] == 20
        for field in ("mean", "variance", "epistemic_variance", "aleatoric_variance"):
            assert fast[field][0] == pytest.approx(eager[field][0], rel=1e-5, abs=1e-7), field
        assert fast["epistemic_variance"][0][1] > fast["epistemic_variance"][0][0]  # unobserved
        # beyond float32: the kernel's answer is not finite, so the eager one answers (a 422)
        r = c.post("/v1/models/arms/predict", json={"x": [[1e39, 0.0, 0.0]]})
        assert r.status_code == 422 and "beyond the float32 range" in r.json()["error"]["message"]
        # samples and several rows are the eager path's, as before
        r = c.post("/v1/models/arms/predict", json=one | {"num_samples": 3, "seed": 1})
        assert r.status_code == 200 and len(r.json()["samples"]) == 3
