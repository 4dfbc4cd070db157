"""Online SGD and replay-buffer SGD (``docs/algorithms.md`` 3.10) against hand-written loops
over ``torch.nn`` and ``torch.optim.SGD`` / ``torch.optim.Adam``, and through a real server.

* ``sgd`` is one ``torch.optim.SGD`` step per row on half the squared error (gaussian) or the
  cross-entropy (categorical); a row with ``outputs`` steps on its output alone;
* ``replay_sgd`` keeps the last k rows and takes ``steps`` steps on their mean loss, as a
  ``collections.deque`` of rows does;
* their predictions have no epistemic variance and their Thompson draws are the mean; a model
  restarted after kill -9 replays its log to the same bits, buffer included.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest
import safetensors.torch
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from service.client import Client
from service.components.build import build_filter, decode_state, encode_state
from service.schemas import ModelSpec
from service.testing import MakeServer
from service.testing.torchnets import relu_sequential

F64 = torch.float64


def _spec(likelihood: dict[str, Any], filt: dict[str, Any], C: int) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "sgd",
            "network": {"type": "mlp", "input_dim": 3, "hidden": [5], "output_dim": C},
            "likelihood": likelihood,
            "filter": filt,
            "dtype": "float64",
        }
    )


def _loss(case: str, out: Tensor, y: Tensor, k: int | None) -> Tensor:
    if case == "categorical":
        return nn.functional.cross_entropy(out, y.long())
    if k is not None:
        return 0.5 * ((out[:, k] - y) ** 2).sum()
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("case", ["gaussian", "categorical", "outputs"])
@pytest.mark.parametrize("buffer", [None, 3])
def test_sgd_and_replay_sgd_are_the_hand_written_loops(
    case: str, buffer: int | None, optimizer: str
) -> None:
    C = 1 if case == "gaussian" else 3
    lik = {"type": "categorical"} if case == "categorical" else {"type": "gaussian"}
    filt: dict[str, Any] = {"type": "sgd", "learning_rate": 0.1}
    if buffer is not None:
        filt = {"type": "replay_sgd", "learning_rate": 0.1, "buffer": buffer, "steps": 2}
    if optimizer == "adam":
        filt.update(optimizer="adam", beta1=0.8, beta2=0.99, eps=1e-6)
    f = build_filter(_spec(lik, filt, C))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, dtype=F64, generator=gen)
    if case == "categorical":
        y = torch.randint(0, 3, (8,), generator=gen).to(F64)
    else:
        y = torch.randn(8, dtype=F64, generator=gen)
    outputs = (
        [int(k) for k in torch.randint(0, 3, (8,), generator=gen)] if case == "outputs" else None
    )
    state = f.init(dtype=F64)
    after, infos = f.run(state, x, y, outputs=outputs)

    seq = relu_sequential(state.mean, [3, 5, C])
    opt: torch.optim.Optimizer = torch.optim.SGD(seq.parameters(), lr=0.1)
    if optimizer == "adam":
        opt = torch.optim.Adam(seq.parameters(), lr=0.1, betas=(0.8, 0.99), eps=1e-6)
    rows: collections.deque[int] = collections.deque(maxlen=buffer or 1)
    for n in range(8):
        with torch.no_grad():  # the report is the pre-update prediction
            before = seq(x[n : n + 1])
        got = infos[n].predictive.mean[0]
        want = torch.softmax(before[0], -1) if case == "categorical" else before[0]
        torch.testing.assert_close(got, want[outputs[n] : outputs[n] + 1] if outputs else want)
        rows.append(n)
        for _ in range(2 if buffer else 1):
            opt.zero_grad()
            if outputs is None:
                idx = list(rows)
                target = y[idx] if case == "categorical" else y[idx].unsqueeze(-1)
                loss = _loss(case, seq(x[idx]), target, None)
            else:  # each row observes its own output: the mean of the rows' losses
                loss = sum(
                    (_loss(case, seq(x[i : i + 1]), y[i : i + 1], outputs[i]) for i in rows),
                    torch.zeros((), dtype=F64),
                ) / len(rows)
            loss.backward()
            opt.step()
    torch.testing.assert_close(after.mean, nn.utils.parameters_to_vector(seq.parameters()))
    if optimizer == "adam":  # its moments and step count, as torch's optimizer holds them
        held = [opt.state[p] for p in seq.parameters()]
        vec = nn.utils.parameters_to_vector
        torch.testing.assert_close(after.m1, vec([h["exp_avg"] for h in held]))
        torch.testing.assert_close(after.m2, vec([h["exp_avg_sq"] for h in held]))
        assert float(after.steps) == float(held[0]["step"]) == 8 * (2 if buffer else 1)
    else:
        assert after.m1 is None and after.m2 is None and after.steps is None


def test_a_plain_sgd_snapshot_holds_theta_alone_and_adam_its_moments() -> None:
    """A plain-SGD state stores what it stored before Adam existed (``mean``, and the buffer),
    so older snapshots decode unchanged; an Adam state round-trips with its moments."""
    for filt, keys in (
        ({"type": "sgd", "learning_rate": 0.1}, {"mean"}),
        ({"type": "sgd", "learning_rate": 0.1, "optimizer": "adam"}, {"mean", "m1", "m2", "steps"}),
        ({"type": "replay_sgd", "learning_rate": 0.1, "buffer": 2}, {"mean", "xs", "ys", "mask"}),
    ):
        f = build_filter(_spec({"type": "gaussian"}, filt, 1))
        x = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
        state, _ = f.run(f.init(dtype=F64), x, torch.randn(3, dtype=F64))
        raw, _ = encode_state(state, 3, filt["type"])
        assert set(safetensors.torch.load(raw)) == keys
        back = decode_state(raw, filt["type"], F64, torch.device("cpu"))
        for k in keys:
            assert torch.equal(getattr(back, k), getattr(state, k))


def test_an_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValidationError, match="optimizer"):
        _spec(
            {"type": "gaussian"}, {"type": "sgd", "learning_rate": 0.1, "optimizer": "rmsprop"}, 1
        )


def test_a_point_estimate_predicts_the_noise_alone_and_draws_its_mean() -> None:
    f = build_filter(
        _spec({"type": "gaussian", "noise_variance": 0.3}, {"type": "sgd", "learning_rate": 0.1}, 2)
    )
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    state, _ = f.run(f.init(dtype=F64), x, torch.randn(4, 2, dtype=F64))
    pred = f.predictive(state, x)
    assert not pred.epistemic.any() and torch.equal(pred.aleatoric, torch.full_like(pred.mean, 0.3))
    draws = f.sample_outputs(state, x, 5, torch.Generator().manual_seed(3), linearized=True)
    torch.testing.assert_close(draws, f.network.apply(state.mean, x).expand(5, 4, 2))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_replay_sgd_over_http_restarts_bit_for_bit(make_server: MakeServer, optimizer: str) -> None:
    filt = {"type": "replay_sgd", "learning_rate": 0.05, "buffer": 4, "steps": 3}
    spec = {
        "name": "replay",
        "network": {"type": "mlp", "input_dim": 3, "hidden": [6], "output_dim": 2},
        "likelihood": {"type": "gaussian", "noise_variance": 0.2},
        "filter": {**filt, "optimizer": optimizer},
        "dtype": "float64",
    }
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(12, 3, dtype=F64, generator=gen)
    y = torch.stack([x[:, 0] * x[:, 1], x[:, 2]], 1)
    server = make_server(env={"POSTSERVE_SNAPSHOT_INTERVAL_S": "3600"})
    with Client(server.url) as c:
        c.create_model(spec)
        for n in range(0, 12, 3):
            c.update("replay", x[n : n + 3].tolist(), y[n : n + 3].tolist())
        before = c.predict("replay", x[:2].tolist())
        assert before.epistemic_variance == [[0.0, 0.0], [0.0, 0.0]] and before.point_estimate
        d = c.decide("replay", context=x[0].tolist())  # Thompson on a point: the greedy arm
        assert d.action == int(torch.tensor(before.mean[0]).argmax())
    url = server.restart(crash=True)
    with Client(url) as c:
        assert c.get_model("replay").version == 12
        assert c.predict("replay", x[:2].tolist()) == before
