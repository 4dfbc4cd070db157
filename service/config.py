"""Settings, read once from ``POSTSERVE_*`` environment variables (pydantic-settings).

Every setting, its variable and its default are listed in the README's configuration table; a bad
value fails at start with a message naming the variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Scope", "Settings"]

Scope = Literal["read", "write", "admin"]
_SCOPES: tuple[str, ...] = ("read", "write", "admin")


class Settings(BaseSettings):
    """Postserve's configuration. Construct directly in tests; ``Settings()`` reads the environment."""

    model_config = SettingsConfigDict(env_prefix="POSTSERVE_", extra="ignore", frozen=True)

    store: Literal["sqlite", "memory", "redis"] = "sqlite"
    data_dir: Path = Path("./postserve-data")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_lease_ms: int = Field(10_000, ge=100, description="write lease per model")
    redis_lease_idle_s: float = Field(
        120.0, gt=0, description="release a model's lease after this long without writes"
    )
    redis_wait_aof: Literal["auto", "off"] = "auto"
    redis_timeout_s: float = Field(2.0, gt=0)
    replica_id: str = Field(
        "", description="stable name of this replica (e.g. the pod name); empty: host-pid-random"
    )

    snapshot_every: int = Field(1000, ge=1, description="snapshot after this many observations")
    snapshot_interval_s: float = Field(60.0, gt=0, description="...or after this many seconds")
    idempotency_ttl_s: float = Field(86400.0, gt=0)

    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_rows: int = Field(10_000, ge=1)
    max_samples: int = Field(1000, ge=0)
    max_answer_numbers: int = Field(
        2_000_000,
        ge=1,
        description="numbers in one /predict answer: rows x (4 + num_samples) x outputs",
    )
    max_state_bytes: int = Field(1 << 30, ge=1, description="cap on one model's state")
    max_total_state_bytes: int = Field(
        0, ge=0, description="cap on all models' states together; 0: half of this machine's memory"
    )

    @property
    def state_budget(self) -> int:
        """``max_total_state_bytes``, or half of the machine's physical memory when it is 0."""
        if self.max_total_state_bytes:
            return self.max_total_state_bytes
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        except (ValueError, OSError, AttributeError):  # no sysconf: no cap
            return 1 << 62

    propensity_samples: int = Field(
        256, ge=1, le=100_000, description="posterior draws behind Thompson-sampling propensities"
    )
    calibration_window: int = Field(
        1000, ge=10, description="observations in each model's calibration window"
    )
    influence_window: int = Field(
        10_000,
        ge=10,
        description="recent rows of each model whose most influential ones GET .../influence lists",
    )
    max_monitored_models: int = Field(
        100, ge=0, description='models that may set "monitor": true (per-model Prometheus series)'
    )

    api_keys: str = Field(
        "", description="comma-separated KEY:SCOPE pairs, scope one of read, write, admin"
    )
    device: str = "auto"
    threads: int = Field(1, ge=1, description="torch intra-op threads")
    compute_threads: int = Field(
        0, ge=0, description="filter steps run at once off the event loop; 0: one per CPU core"
    )
    compile_steps: bool = Field(
        False,
        description="compile each model's step (AOTInductor, needs a C++ compiler) in the "
        "background after it is created or restored; it steps eagerly until then",
    )
    batch_steps: bool = Field(
        False,
        description="step concurrent one-row updates of different models of one shape together "
        "(exact Kalman models: one batched step over their stacked states)",
    )
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="how long a batch waits for more models' rows after its first; 0: the rows "
        "that arrive in the same turn of the event loop",
    )
    batch_max: int = Field(1024, ge=1, le=65536, description="rows in one batched step at most")
    kernel_dir: Path | None = Field(
        None, description="where compiled steps are kept; unset: DATA_DIR/kernels"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def kernel_directory(self) -> Path:
        """``kernel_dir``, or ``data_dir/kernels``."""
        return self.kernel_dir if self.kernel_dir is not None else self.data_dir / "kernels"

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: str) -> str:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            key, sep, scope = pair.rpartition(":")
            if not sep or not key or scope not in _SCOPES:
                raise ValueError(
                    f"POSTSERVE_API_KEYS entry {pair[:4]}... must be KEY:SCOPE with scope one of "
                    f"{', '.join(_SCOPES)}"
                )
        return value

    @property
    def keys(self) -> list[tuple[str, Scope]]:
        """(API key, scope) pairs; a key listed with several scopes holds each of them."""
        out: list[tuple[str, Scope]] = []
        for pair in filter(None, (p.strip() for p in self.api_keys.split(","))):
            key, _, scope = pair.rpartition(":")
            out.append((key, scope))  # type: ignore[arg-type]
        return out
