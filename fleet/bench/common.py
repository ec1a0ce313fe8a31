"""What every part of ``fleet bench`` shares: :class:`BenchConfig`, the results format and MLflow experiment, the
stderr console and its progress bars, the serving thread settings, latency summaries and the machine a benchmark
runs on. A process's RSS is :mod:`fleet.bench.probe`'s (a module light enough for the serving subprocesses)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from fleet.core.progress import stage_progress
from fleet.run import stages
from fleet.synthetic.synth import SynthConfig

console = Console(stderr=True)
EXPERIMENT = "fleet-bench"
SERVING_THREADS = 1  # torch intra-op threads of every serving measurement (in-process, HTTP server, scale probe)
#: The environment of the serving subprocesses (HTTP servers, probes): BLAS and OpenMP pools of SERVING_THREADS too.
SERVING_ENV = {name: str(SERVING_THREADS) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass
class BenchConfig:
    """What ``fleet bench`` runs.

    Args:
        synth: the synthetic fleet (reused from ``fleet_dir`` when its seed and shape match).
        fleet_dir: where the fleet lives (``events/``, ``teachers/``, ``synth.json``).
        out: output directory (results, plots, the bench's own store).
        compress: the fleet config of the real run; the variants change only bits / head / loss.
        peer_subset: K, campaigns the independent-student peer (c) is run on.
        scale_campaigns: simulated fleet sizes for the scale test (0 or empty: skip).
        variant_backbones: train a backbone per head-design / loss variant (as a real run with that config
            would); False (default, cheaper) reuses the real run's backbone and changes stage 3 only.
        warm_requests, cold_requests: in-process predictions timed (warm: head cached; cold: cache miss).
        http_requests, http_concurrency: HTTP predictions timed on loopback, requests in flight at once.
        tracking_uri: MLflow (None: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<out>/mlflow.db``, so that an
            output directory holds its own store and registry); ``mlflow`` False skips logging.
        address: Ray cluster address (None: local Ray).
    """

    synth: SynthConfig
    fleet_dir: str
    out: str
    compress: stages.CompressConfig = field(default_factory=stages.CompressConfig)
    peer_subset: int = 20
    scale_campaigns: tuple[int, ...] = (10_000, 1_000_000)
    warm_requests: int = 2000
    cold_requests: int = 500
    http_requests: int = 2000
    http_concurrency: int = 8
    variant_backbones: bool = False
    tracking_uri: str | None = None
    mlflow: bool = True
    address: str | None = None

    def __post_init__(self) -> None:
        if self.peer_subset < 1:
            raise ValueError(f"peer_subset must be >= 1, got {self.peer_subset}")
        if self.compress.bits != "auto":
            raise ValueError("the benchmark's real run uses bits='auto' (the variants cover fixed bits)")
        for name in ("warm_requests", "cold_requests", "http_requests", "http_concurrency"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if any(int(s) < 1 for s in self.scale_campaigns):
            raise ValueError("scale_campaigns must be positive")


def _progress() -> Progress:
    return stage_progress(console)


def _latencies(samples: list[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64) * 1000.0
    return {
        "n": int(a.size),
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
        "mean_ms": float(a.mean()),
        "samples_ms": [round(float(x), 4) for x in a],
    }


def machine_info() -> dict:
    """The machine a benchmark runs on: CPUs, memory (GiB), GPU, platform, Python and torch versions, and the
    load average now (``load_average_at_start``)."""
    import platform

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpus": os.cpu_count(),
        "memory_gib": mem,
        "gpu": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": load,
    }
