"""Speed of the linearised predictive of many rows, this code against a baseline tree, in one run.

The question: how long ``OnlineFilter.predictive`` (what ``/predict`` computes, the mean and the
variances of ``docs/algorithms.md`` 4.1) takes per row on a test set, here and in the baseline
checkout (default ``/work/orig``, the code before the structured projection), on the same data and
the same belief. Not a test: nothing is asserted about time.

For each network (784-100-10 and 784-500-500-10 MLPs, relu, categorical likelihood, LoFi rank 10,
float32, one thread) the parent process builds a belief by ``--train`` LoFi updates on seeded
random rows, and ``--rows`` seeded test rows, and saves them. Each timing runs in a fresh
subprocess with ``PYTHONPATH`` set to the tree under test (so ``service`` is that tree's), which
loads the same tensors and times ``f.predictive(f.predict(state), x)`` on all rows: this tree,
then the baseline, then this tree again (the two runs of this tree bracket the baseline, so a
change of the machine's load shows up as a gap between them). The subprocess of this tree also
times one forward pass ``network.apply(theta, x)`` of the same rows, and computes a float64
reference answer (this tree's predictive on the same belief and rows cast to float64; the tests
check this path against the dense J Sigma J^T to 1e-10).

Answers are compared elementwise, max |a - b| / |b| over the fields of ``/predict``: mean,
variance (the total), epistemic and aleatoric, this tree against the baseline, and each against
the float64 reference. The aleatoric part of bernoulli and categorical is p (1 - p) - epistemic,
which cancels where the epistemic part nearly exhausts p (1 - p); there both trees' float32
answers differ from float64 alike, and its error is also reported relative to the total variance.
A relu unit whose pre-activation lies within float32 rounding of 0 (|z| <= 4 eps_32 (|a| |W|^T + |b|)
in float64) has a derivative, 0 or 1, that depends on how the forward matmul rounds, which differs
with the number of rows a matmul holds (the baseline takes 2 or 21 rows at a time, this tree up to
512): such rows ("at a kink") are counted, and the differences are also given without them.

    python -m benchmarks.predict_speed [--baseline /work/orig] [--rows 10000] [--train 100]
        [--only 784-100-10] [--out benchmarks/out/predict_speed.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NETWORKS = {"784-100-10": (100,), "784-500-500-10": (500, 500)}
RANK = 10
PRIOR_VARIANCE = 0.1


def _filter(hidden: tuple[int, ...]) -> Any:
    """The same filter in whichever tree ``service`` is imported from (both have this API)."""
    from service.filters import MLP, Categorical, LoFi, OnlineFilter, Prior

    return OnlineFilter(
        MLP(784, hidden, 10, "relu"), Categorical(), LoFi(RANK), prior=Prior(PRIOR_VARIANCE)
    )


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(data: Path, out: Path, repeats: int, forward: bool) -> None:
    """In the tree on PYTHONPATH: time the predictive (and a forward pass) on the saved data."""
    import service
    from service.filters import LoFiState
    from service.runtime import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    saved = torch.load(data)
    f = _filter(tuple(saved["hidden"]))
    state = LoFiState(saved["mean"], saved["W"], saved["upsilon"])
    x = saved["x"]
    f.predictive(f.predict(state), x[:64])  # warm-up
    result: dict[str, Any] = {}
    pred = None

    def run() -> None:
        nonlocal pred
        pred = f.predictive(f.predict(state), x)

    result["predictive_s"] = _median_time(run, repeats)
    assert pred is not None
    answers = {"float32": _fields(pred)}
    if forward:  # this tree: a forward pass, and the float64 reference
        f.network.apply(state.mean, x[:64])
        result["forward_s"] = _median_time(lambda: f.network.apply(state.mean, x), max(3, repeats))
        s64 = LoFiState(*(t.double() for t in (state.mean, state.W, state.upsilon)))
        answers["float64"] = _fields(f.predictive(f.predict(s64), x.double()))
        answers["at_kink"] = {"rows": _at_kink(f.network.sizes, s64.mean, x.double())}
    torch.save(answers, out)
    result["service"] = str(Path(service.__file__).resolve().parent.parent)
    print(json.dumps(result))


def _at_kink(sizes: tuple[int, ...], theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows with a hidden relu pre-activation within float32 rounding of 0, in float64
    (nn.Linear layout: each layer's weight (out, in), then its bias)."""
    eps = torch.finfo(torch.float32).eps
    a, at, near = x, 0, torch.zeros(x.shape[0], dtype=torch.bool)
    for fan_in, fan_out in itertools.pairwise(sizes[:-1]):  # the hidden layers
        W = theta[at : at + fan_in * fan_out].view(fan_out, fan_in)
        b = theta[at + fan_in * fan_out : at + fan_in * fan_out + fan_out]
        at += fan_in * fan_out + fan_out
        z = a @ W.T + b
        near |= (z.abs() <= 4 * eps * (a.abs() @ W.abs().T + b.abs())).any(1)
        a = z.clamp_min(0)
    return near


def _fields(pred: Any) -> dict[str, torch.Tensor]:
    return {
        "mean": pred.mean,
        "variance": pred.epistemic + pred.aleatoric,
        "epistemic": pred.epistemic,
        "aleatoric": pred.aleatoric,
    }


def _spawn(tree: Path, data: Path, out: Path, repeats: int, forward: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # This file loaded by path from a neutral directory: neither the working directory nor
    # benchmarks/ (whose http package would shadow the standard library's) comes before `tree`.
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('predict_speed', {str(__file__)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        f"m.worker(*map(__import__('pathlib').Path, sys.argv[1:3]), {repeats}, {forward})"
    )
    cmd = [sys.executable, "-c", code, str(data), str(out)]
    done = subprocess.run(
        cmd, env=env, cwd=data.parent, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["service"]) != tree.resolve():
        raise SystemExit(f"the worker for {tree} imported service from {result['service']}")
    return result


def _prepare(hidden: tuple[int, ...], rows: int, train: int, path: Path) -> None:
    """A belief after ``train`` LoFi updates, and ``rows`` test rows, all seeded (float32)."""
    torch.set_num_threads(1)
    f = _filter(hidden)
    g = torch.Generator().manual_seed(0)
    state = f.init(dtype=torch.float32)
    X = torch.rand(train, 784, generator=g)
    y = torch.randint(0, 10, (train,), generator=g).to(torch.float32)
    state, _ = f.run(state, X, y)
    x = torch.rand(rows, 784, generator=g)
    torch.save(
        {
            "hidden": list(hidden),
            "mean": state.mean,
            "W": state.W,
            "upsilon": state.upsilon,
            "x": x,
        },
        path,
    )


def _rel(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """|new - old| / |old| elementwise (absolute where old is exactly 0), in float64."""
    new, old = new.double(), old.double()
    diff, scale = (new - old).abs(), old.abs()
    return torch.where(scale > 0, diff / scale.clamp_min(1e-300), diff)


def _max_rel(new: torch.Tensor, old: torch.Tensor) -> float:
    return float(_rel(new, old).max()) if new.numel() else 0.0


def measure(
    name: str, baseline: Path, rows: int, train: int, repeats: int, tmp: Path
) -> dict[str, Any]:
    data = tmp / f"{name}.pt"
    _prepare(NETWORKS[name], rows, train, data)
    first = _spawn(ROOT, data, tmp / "new1.pt", repeats, forward=True)
    base = _spawn(baseline, data, tmp / "old.pt", 1, forward=False)
    second = _spawn(ROOT, data, tmp / "new2.pt", repeats, forward=True)
    answers = torch.load(tmp / "new1.pt")
    new, ref, old = answers["float32"], answers["float64"], torch.load(tmp / "old.pt")["float32"]
    fields = ("mean", "variance", "epistemic", "aleatoric")
    smooth = ~answers["at_kink"]["rows"]
    rel_rows = torch.stack([_rel(new[k], old[k]).amax(1) for k in ("mean", "variance")]).amax(0)
    new_s = statistics.mean([first["predictive_s"], second["predictive_s"]])
    fwd_s = statistics.mean([first["forward_s"], second["forward_s"]])
    D = sum(i * o + o for i, o in zip((784, *NETWORKS[name]), (*NETWORKS[name], 10), strict=True))
    return {
        "network": name,
        "D": D,
        "rows": rows,
        "baseline_ms_per_row": base["predictive_s"] / rows * 1e3,
        "new_ms_per_row": new_s / rows * 1e3,
        "new_ms_per_row_runs": [
            first["predictive_s"] / rows * 1e3,
            second["predictive_s"] / rows * 1e3,
        ],
        "speedup": base["predictive_s"] / new_s,
        "forward_ms_per_row": fwd_s / rows * 1e3,
        "new_over_forward": new_s / fwd_s,
        "baseline_over_forward": base["predictive_s"] / fwd_s,
        "max_rel_diff": {k: _max_rel(new[k], old[k]) for k in fields},
        "rows_at_kink": int((~smooth).sum()),
        "rows_mean_or_variance_diff_over_1e-5": int((rel_rows > 1e-5).sum()),
        "max_rel_diff_off_kinks": {k: _max_rel(new[k][smooth], old[k][smooth]) for k in fields},
        "max_rel_err_new_vs_float64": {k: _max_rel(new[k], ref[k]) for k in fields},
        "max_rel_err_baseline_vs_float64": {k: _max_rel(old[k], ref[k]) for k in fields},
        "aleatoric_diff_over_variance": float(
            ((new["aleatoric"].double() - old["aleatoric"].double()).abs() / ref["variance"]).max()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", type=Path, default=Path("/work/orig"))
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--train", type=int, default=100, help="LoFi updates behind the belief")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per worker of this tree")
    parser.add_argument("--only", choices=sorted(NETWORKS), action="append")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/predict_speed.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(NETWORKS):
            r = measure(name, args.baseline, args.rows, args.train, args.repeats, Path(tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
    print(
        f"\ntorch {torch.__version__}, float32, CPU, 1 thread, LoFi rank {RANK}, categorical, "
        f"{args.rows} rows, belief after {args.train} updates; baseline {args.baseline}"
    )
    print(
        f"{'network':>15} {'D':>7} {'base ms/row':>11} {'new ms/row':>10} {'speedup':>7} "
        f"{'fwd ms/row':>10} {'new/fwd':>7} {'base/fwd':>8}"
    )
    for r in results:
        print(
            f"{r['network']:>15} {r['D']:>7} {r['baseline_ms_per_row']:>11.3f} "
            f"{r['new_ms_per_row']:>10.4f} {r['speedup']:>7.1f} {r['forward_ms_per_row']:>10.4f} "
            f"{r['new_over_forward']:>7.1f} {r['baseline_over_forward']:>8.0f}"
        )
    print("\nmax elementwise relative difference (mean, variance, epistemic, aleatoric)")
    for r in results:
        for label, key in (
            ("new vs baseline", "max_rel_diff"),
            ("off kinks", "max_rel_diff_off_kinks"),
            ("new vs float64", "max_rel_err_new_vs_float64"),
            ("baseline vs float64", "max_rel_err_baseline_vs_float64"),
        ):
            d = r[key]
            print(
                f"{r['network']:>15} {label:>20}: "
                + " ".join(f"{d[k]:.1e}" for k in ("mean", "variance", "epistemic", "aleatoric"))
            )
        print(
            f"{r['network']:>15} {'':>20}  |aleatoric new - baseline| / variance: "
            f"{r['aleatoric_diff_over_variance']:.1e}; rows at a relu kink: {r['rows_at_kink']}; "
            f"rows whose mean or variance differ by > 1e-5: "
            f"{r['rows_mean_or_variance_diff_over_1e-5']} of {r['rows']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
