"""Monitoring: /metrics, /calibration, alerts and the report.

The drift alert on a real server's figures, a crash and the report run against real server
processes; the other calibration figures, the counters and the metrics the dashboards use against
the app in this process.

Independent truths: the update responses carry each row's pre-update prediction, so every
calibration figure the server exports is recomputed here with numpy from those responses and the
labels sent; data are simulated from a model whose truth is known (theta drawn from the prior,
labels from the likelihood), so a calibrated filter must land within binomial error of nominal;
alert expressions are evaluated by Prometheus' own rule engine (``promtool test rules``) on the
values scraped from the server.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from scipy import stats

from service.testing import MakeAppClient, MakeServer, linear_spec

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
Z = 4.5  # binomial standard errors allowed (false alarm about 7e-6 per check)

Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(c: httpx.Client) -> Sample:
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Sample = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Sample, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def linear_model(name: str, likelihood: dict[str, Any], dim: int, **extra: Any) -> dict[str, Any]:
    kind = "kalman" if likelihood["type"] == "gaussian" else "ekf"
    fields = {"prior": {"variance": 1.0, "mean": [0.0] * dim}, "dtype": "float64", "monitor": True}
    return linear_spec(
        name, dim, bias=False, likelihood=likelihood, filter=kind, **{**fields, **extra}
    )


def feed(
    c: httpx.Client, name: str, X: np.ndarray, y: np.ndarray, batch: int = 50
) -> list[dict[str, Any]]:
    """Post the rows in order; returns each row's pre-update prediction from the responses."""
    preds: list[dict[str, Any]] = []
    for i in range(0, len(X), batch):
        r = c.post(
            f"/v1/models/{name}/update",
            json={"x": X[i : i + batch].tolist(), "y": y[i : i + batch].tolist()},
        )
        assert r.status_code == 200, r.text
        preds.extend(r.json()["predictions"])
    return preds


def gaussian_data(rng: np.random.Generator, n: int, dim: int, noise: float) -> tuple[Any, Any]:
    theta = rng.normal(size=dim)  # drawn from the N(0, I) prior
    X = rng.normal(size=(n, dim))
    return X, X @ theta + math.sqrt(noise) * rng.normal(size=n)


def alert_test(
    tmp_path: Path, samples: Sample, names: set[str], alert: str, expect: list[dict[str, str]]
) -> subprocess.CompletedProcess[str]:
    """Run ``promtool test rules``: the scraped series, held constant for 30 minutes, evaluated
    by deploy/prometheus/alerts.yml at 20 minutes; ``expect`` = label sets of firing alerts."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:  # annotations hold templated text; compare labels only
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules))
    rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert)
    series = [
        {
            "series": name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels)) + "}",
            "values": f"{v!r}+0x30",
        }
        for (name, labels), v in samples.items()
        if name in names
    ]
    test = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "20m",
                        "alertname": alert,
                        "exp_alerts": [
                            {"exp_labels": {**rule.get("labels", {}), **labels}}
                            for labels in expect
                        ],
                    }
                ],
            }
        ],
    }
    test_file = tmp_path / "alert_test.yml"
    test_file.write_text(yaml.safe_dump(test))
    return subprocess.run(
        [promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, check=False
    )


def promtool() -> str:
    path = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not Path(path).exists():
        pytest.skip("promtool not installed (bash .ci/setup installs it)")
    return path


# -- calibration of gaussian models, end to end -------------------------------------------------


def test_calibrated_gaussian_covers_90_percent_and_an_overconfident_one_fires_the_alert(
    make_server: MakeServer, tmp_path: Path
) -> None:
    server = make_server()
    rng = np.random.default_rng(11)
    n, dim, noise = 2000, 4, 1.0
    X, y = gaussian_data(rng, n, dim, noise)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name, nv in (("right", noise), ("overconfident", noise / 4)):
            spec = linear_model(name, {"type": "gaussian", "noise_variance": nv}, dim)
            assert c.post("/v1/models", json=spec).status_code == 201
        preds = {name: feed(c, name, X, y) for name in ("right", "overconfident")}
        samples = scrape(c)
        for name in ("right", "overconfident"):
            m = int(value(samples, "postserve_calibration_window_observations", model=name))
            assert 900 <= m <= 1000  # the default window: 1000 observations in 10 buckets
            mean = np.array([p["mean"][0] for p in preds[name][-m:]])
            sd = np.sqrt([p["variance"][0] for p in preds[name][-m:]])
            z = (y[-m:] - mean) / sd
            for level in (0.5, 0.9, 0.95):
                got = value(
                    samples, "postserve_calibration_coverage_ratio", model=name, level=f"{level:g}"
                )
                direct = np.mean(np.abs(z) <= stats.norm.ppf(0.5 + level / 2))
                assert got == pytest.approx(direct, abs=1e-12), (name, level)
            assert value(
                samples, "postserve_calibration_standardized_residual_variance", model=name
            ) == pytest.approx(z.var(), rel=1e-9)
            hist, _ = np.histogram(stats.norm.cdf(z), bins=10, range=(0, 1))
            for b, share in enumerate(hist / m):
                got = value(
                    samples,
                    "postserve_calibration_pit_bin_ratio",
                    model=name,
                    bin=f"{(b + 1) / 10:g}",
                )
                assert got == pytest.approx(share, abs=1e-12)
        m = int(value(samples, "postserve_calibration_window_observations", model="right"))
        right = value(samples, "postserve_calibration_coverage_ratio", model="right", level="0.9")
        assert abs(right - 0.9) <= Z * math.sqrt(0.9 * 0.1 / m), right
        wrong = value(
            samples, "postserve_calibration_coverage_ratio", model="overconfident", level="0.9"
        )
        assert wrong < 0.75, wrong  # sd half the truth: expect P(|N(0,1)| < 0.82) = 0.59

    names = {"postserve_calibration_coverage_ratio", "postserve_calibration_window_observations"}
    done = alert_test(
        tmp_path,
        samples,
        names,
        "PostserveCalibrationCoverageDrift",
        [{"model": "overconfident", "level": "0.9"}],  # and not "right"
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_well_specified_bernoulli_has_small_ece_and_exports_what_numpy_computes(
    app_client: MakeAppClient,
) -> None:
    rng = np.random.default_rng(12)
    n, dim = 2000, 3
    theta = rng.normal(size=dim) * 1.5
    X = rng.normal(size=(n, dim))
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-X @ theta))).astype(float)
    with app_client(calibration_window=2000) as c:
        spec = linear_model("clicks", {"type": "bernoulli"}, dim, prior={"variance": 2.25})
        assert c.post("/v1/models", json=spec).status_code == 201
        p = np.array([q["mean"][0] for q in feed(c, "clicks", X, y)])
        samples = scrape(c)
        cal = c.get("/v1/models/clicks/calibration").json()
    m = int(value(samples, "postserve_calibration_window_observations", model="clicks"))
    assert m == 1800  # a window of 2000 in 10 buckets, just slid: 9 closed, the open one empty
    p, y = p[-m:], y[-m:]
    ece = value(samples, "postserve_calibration_ece", model="clicks")
    bins = np.minimum((p * 10).astype(int), 9)
    direct = sum(
        (bins == b).sum() / m * abs(y[bins == b].mean() - p[bins == b].mean())
        for b in range(10)
        if (bins == b).any()
    )
    assert ece == pytest.approx(direct, abs=1e-12)
    # Sampling noise alone gives about sum_b sqrt(n_b p_b (1 - p_b)) / n ~ 0.02 here.
    assert ece < 0.05, ece
    brier = value(samples, "postserve_calibration_brier_score", model="clicks")
    assert brier == pytest.approx(np.mean((p - y) ** 2), rel=1e-10)
    log_loss = value(samples, "postserve_calibration_log_loss", model="clicks")
    assert log_loss == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), rel=1e-8)
    for b, row in enumerate(cal["reliability"]):
        assert row["count"] == int((bins == b).sum())
        edge = f"{(b + 1) / 10:g}"
        got = value(
            samples, "postserve_calibration_reliability_observations", model="clicks", bin=edge
        )
        assert got == row["count"]
    assert cal["summary"]["ece"] == pytest.approx(ece, abs=1e-15)


def test_poisson_counts_are_covered_at_nominal(app_client: MakeAppClient) -> None:
    rng = np.random.default_rng(13)
    n, dim = 2000, 3
    theta = rng.normal(size=dim) * 0.5
    X = rng.normal(size=(n, dim))
    y = rng.poisson(np.exp(X @ theta)).astype(float)
    with app_client() as c:
        spec = linear_model("counts", {"type": "poisson"}, dim, prior={"variance": 0.25})
        assert c.post("/v1/models", json=spec).status_code == 201
        feed(c, "counts", X, y)
        samples = scrape(c)
    m = value(samples, "postserve_calibration_window_observations", model="counts")
    for level in (0.5, 0.9, 0.95):
        got = value(
            samples, "postserve_calibration_coverage_ratio", model="counts", level=f"{level:g}"
        )
        assert abs(got - level) <= Z * math.sqrt(level * (1 - level) / m), (level, got)


# -- what /metrics exports -----------------------------------------------------------------------


def test_request_and_update_counters_and_bounded_labels(app_client: MakeAppClient) -> None:
    with app_client(max_monitored_models=1) as c:
        watched = linear_model("watched", {"type": "gaussian"}, 2)
        assert c.post("/v1/models", json=watched).status_code == 201
        second = c.post("/v1/models", json={**watched, "name": "second"})
        assert second.status_code == 409, second.text
        assert second.json()["error"]["code"] == "limit_reached"
        assert "POSTSERVE_MAX_MONITORED_MODELS" in second.json()["error"]["message"]
        assert c.get("/v1/models/second").status_code == 404  # nothing was created
        quiet = {**watched, "name": "quiet", "monitor": False}
        assert c.post("/v1/models", json=quiet).status_code == 201
        for name in ("watched", "quiet"):
            r = c.post(f"/v1/models/{name}/update", json={"x": [[1.0, 2.0]] * 3, "y": [0.5] * 3})
            assert r.status_code == 200
            bad = c.post(f"/v1/models/{name}/update", json={"x": [[1.0, 2.0, 3.0]], "y": [0.5]})
            assert bad.status_code == 422  # refused by the engine (the model takes 2 inputs)
            nan = c.post(
                f"/v1/models/{name}/update",
                content=b'{"x": [[1.0, NaN]], "y": [0.5]}',
                headers={"content-type": "application/json"},
            )
            assert nan.status_code == 422  # refused at the edge, by the schema
        for _ in range(4):
            assert c.post("/v1/models/quiet/predict", json={"x": [[0.0, 1.0]]}).status_code == 200
        assert c.post("/v1/models/nobody/predict", json={"x": [[0.0, 1.0]]}).status_code == 404
        samples = scrape(c)
        version = c.get("/v1/models/watched").json()["version"]

    def requests(route: str, status: str, method: str = "POST") -> float:
        return value(
            samples, "postserve_http_requests_total", method=method, route=route, status=status
        )

    assert requests("/v1/models/{name}/predict", "200") == 4
    assert requests("/v1/models/{name}/predict", "404") == 1
    assert requests("/v1/models/{name}/update", "422") == 4
    assert requests("/v1/models", "409") == 1
    count = value(
        samples,
        "postserve_http_request_duration_seconds_count",
        method="POST",
        route="/v1/models/{name}/predict",
    )
    assert count == 5
    assert value(samples, "postserve_observations_applied_total") == 6
    assert value(samples, "postserve_updates_rejected_total", reason="invalid_input") == 4
    assert value(samples, "postserve_model_observations_applied_total", model="watched") == 3
    assert version == 3
    assert (
        value(
            samples,
            "postserve_model_updates_rejected_total",
            model="watched",
            reason="invalid_input",
        )
        == 2
    )
    assert value(samples, "postserve_models") == 2
    assert value(samples, "postserve_models_monitored") == 1
    assert value(samples, "postserve_ready") == 1
    assert value(samples, "postserve_log_observations") == 6
    # only the monitored model has series of its own
    labelled = {dict(labels).get("model") for (_, labels) in samples} - {None}
    assert labelled == {"watched"}


def test_refusal_counters_exist_at_zero_before_the_first_refusal(
    app_client: MakeAppClient,
) -> None:
    """Every refusal reason is a series from the start (0 until it happens), for all models and
    for each monitored one, so dashboards and alerts never see "no data"."""
    from service.hosting.stats import REFUSALS

    with app_client() as c:
        before = scrape(c)
        assert (
            c.post("/v1/models", json=linear_model("w", {"type": "gaussian"}, 2)).status_code == 201
        )
        after_create = scrape(c)
        bad = c.post("/v1/models/w/update", json={"x": [[1.0, 2.0, 3.0]], "y": [0.5]})
        assert bad.status_code == 422
        after_refusal = scrape(c)
    assert set(REFUSALS) >= {"invalid_input", "step_rejected", "store_unavailable", "not_owner"}
    for reason in REFUSALS:
        assert value(before, "postserve_updates_rejected_total", reason=reason) == 0
        assert (
            value(after_create, "postserve_model_updates_rejected_total", model="w", reason=reason)
            == 0
        )
    assert value(after_refusal, "postserve_updates_rejected_total", reason="invalid_input") == 1
    assert value(after_refusal, "postserve_updates_rejected_total", reason="step_rejected") == 0


def test_every_dashboard_and_alert_expression_uses_exported_metrics(
    app_client: MakeAppClient,
) -> None:
    import json
    import re

    with app_client() as c:
        for name, lik in (("g", {"type": "gaussian"}), ("b", {"type": "bernoulli"})):
            assert c.post("/v1/models", json=linear_model(name, lik, 2)).status_code == 201
            r = c.post(f"/v1/models/{name}/update", json={"x": [[1.0, 0.0]] * 20, "y": [1.0] * 20})
            assert r.status_code == 200
        assert c.post("/v1/models/g/update", json={"x": [[1.0]], "y": [1.0]}).status_code == 422
        text = c.get("/metrics").text
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}

    expressions: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("expr", "query") and isinstance(v, str):
                    expressions.append((where, v))
                else:
                    walk(v, where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    dashboards = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        walk(json.loads(path.read_text()), path.name)
    rules = yaml.safe_load(ALERTS.read_text())
    walk(rules, ALERTS.name)
    assert len(expressions) >= 20, expressions
    for where, expr in expressions:
        if re.fullmatch(r"vector\([0-9.]+\)", expr.strip()):  # a nominal level drawn as a line
            continue
        used = set(re.findall(r"\bpostserve_[A-Za-z0-9_]+", expr))
        assert used, f"{where}: {expr!r} reads no postserve metric"
        missing = used - exported
        assert not missing, f"{where}: {expr!r} uses {missing}, not exported"


# -- /calibration, restarts and the report --------------------------------------------------------


def test_calibration_window_survives_a_crash(make_server: MakeServer) -> None:
    server = make_server(
        env={"POSTSERVE_SNAPSHOT_EVERY": "300", "POSTSERVE_CALIBRATION_WINDOW": "400"}
    )
    rng = np.random.default_rng(14)
    X, y = gaussian_data(rng, 730, 3, 0.5)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        spec = linear_model("kept", {"type": "gaussian", "noise_variance": 0.5}, 3)
        assert c.post("/v1/models", json=spec).status_code == 201
        feed(c, "kept", X, y, batch=10)
        before = c.get("/v1/models/kept/calibration").json()
    assert before["summary"]["observations"] == 370  # 9 closed buckets of 40, 10 open
    assert len(before["history"]) == 18
    url = server.restart(crash=True)  # snapshot at 600 holds the window; 130 rows replayed
    with httpx.Client(base_url=url, timeout=60) as c:
        after = c.get("/v1/models/kept/calibration").json()
        info = c.get("/v1/models/kept").json()
    assert after == before
    assert info["calibration"] == before["summary"]


def test_report_draws_a_png_for_gaussian_and_bernoulli_models(
    make_server: MakeServer, tmp_path: Path
) -> None:
    import matplotlib.image

    server = make_server()
    rng = np.random.default_rng(15)
    X, y = gaussian_data(rng, 600, 2, 1.0)
    yb = (X @ np.array([1.0, -2.0]) + rng.logistic(size=600) > 0).astype(float)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name, lik, labels in (
            ("level", {"type": "gaussian"}, y),
            ("click", {"type": "bernoulli"}, yb),
        ):
            assert c.post("/v1/models", json=linear_model(name, lik, 2)).status_code == 201
            feed(c, name, X, labels)
    for name in ("level", "click"):
        out = tmp_path / f"{name}.png"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "service",
                "report",
                name,
                "--out",
                str(out),
                "--url",
                server.url,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert f"wrote {out}" in done.stdout
        image = matplotlib.image.imread(out)
        assert image.shape[0] > 400 and image.shape[1] > 2000  # four panels: influence the last
        assert float(image[..., :3].std()) > 0.05  # not a blank canvas
    missing = subprocess.run(
        [sys.executable, "-m", "service", "report", "nobody", "--url", server.url],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert missing.returncode == 1 and "nobody" in missing.stderr
