"""Orchestration on Ray: the only module that imports ray. Stages are plain functions run as Ray tasks
over *batches* of campaigns; everything they exchange goes through the store URI, never driver disk."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fleet import synth
from fleet.events import write_events

console = Console(stderr=True)
TRANSIENT_ERRORS = (OSError, TimeoutError, ConnectionError)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Connect to ``address`` (a Ray cluster) or start a local Ray sized to the machine.
    Reuses an already initialised Ray (tests share one per session) and leaves it running."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _run_with_threads(fn: Callable, threads: int, *args: Any) -> Any:
    import torch

    torch.set_num_threads(threads)  # one task per core: never oversubscribe
    return fn(*args)


def map_on_ray(fn: Callable, batches: Sequence[Any], args: tuple, desc: str, *, threads: int = 1) -> list[Any]:
    """Run ``fn(batch, *args)`` for every batch as Ray tasks (retried on crashes and transient I/O
    errors), with a progress bar; results are returned in ``batches`` order."""
    remote = ray.remote(num_cpus=threads, max_retries=3, retry_exceptions=list(TRANSIENT_ERRORS))(_run_with_threads)
    refs = [remote.remote(fn, threads, batch, *args) for batch in batches]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    with _progress() as progress:
        task = progress.add_task(desc, total=len(refs))
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                progress.advance(task)
    return results


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def balanced_batches(costs: dict[str, float], num_batches: int) -> list[list[str]]:
    """Split items into at most ``num_batches`` batches of similar total cost (largest first, greedy)."""
    bins: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(max(1, min(num_batches, len(costs))))]
    for item in sorted(costs, key=lambda k: (-costs[k], k)):
        lightest = min(range(len(bins)), key=lambda i: bins[i][0])
        bins[lightest] = (bins[lightest][0] + costs[item], bins[lightest][1] + [item])
    return [sorted(items) for _, items in bins if items]


def run_synth(config: synth.SynthConfig, out_uri: str, storage_options: dict | None = None,
              address: str | None = None) -> dict:
    """``fleet synth``: write ``out/events/`` on the driver, then train every teacher on Ray."""
    import pyarrow as pa

    started = time.perf_counter()
    ids = synth.campaign_ids(config.campaigns)
    tables = [synth.generate_campaign(config, i) for i in range(config.campaigns)]
    events_uri, teachers_uri = f"{out_uri.rstrip('/')}/events", f"{out_uri.rstrip('/')}/teachers"
    write_events(events_uri, pa.concat_tables(tables), storage_options)
    rows = {cid: len(t) for cid, t in zip(ids, tables)}
    with ray_session(address):
        num_cpus = int(ray.cluster_resources().get("CPU", 1))
        batches = balanced_batches({cid: float(n) for cid, n in rows.items()}, num_batches=4 * num_cpus)
        per_batch = map_on_ray(synth.train_teachers, batches, (config, events_uri, teachers_uri, storage_options),
                               "training teachers")
    stats = sorted((s for batch in per_batch for s in batch), key=lambda s: s["campaign_id"])
    return {"seconds": time.perf_counter() - started, "events_uri": events_uri, "teachers_uri": teachers_uri,
            "campaigns": stats}
