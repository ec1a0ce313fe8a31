"""``fleet bench``'s serving subprocesses, ``python -m fleet.bench.probe KIND ARGS``, and what the benchmark shares
with them: a process's RSS from ``/proc`` (:func:`proc_status_mb`, :func:`proc_rss_mb`), a free loopback port,
stopping a subprocess, running a probe in a fresh process (:func:`run_in_fresh_process`).

The kinds (:func:`main`):

- ``server URI PORT THREADS HEADS``: the HTTP app of ``URI`` under uvicorn on 127.0.0.1 (:func:`serve`), the server
  :func:`fleet.bench.serving.bench_http` and the serving targets' HTTP rows measure;
- ``targets URI SEQUENCES.json COUNT SCORE ALL K SEED``: ``score_campaigns`` on a SIMULATED version
  (:func:`score_targets`, for :func:`fleet.bench.serving.serving_targets`);
- ``cold URI COUNT SEED CAMPAIGNS``: cold lookups on a SIMULATED version (:func:`cold_lookups`, for
  :func:`fleet.bench.simulated.bench_scale`).

This module imports only ``json``, ``os``, ``sys`` and ``time`` at module level: a probe's ``rss_before_open`` is the
RSS of a process that has imported numpy and :mod:`fleet.serve.serving` (the probe's own imports) and nothing else,
and the server's RSS is that of uvicorn and :mod:`fleet.serve.http`.
"""

from __future__ import annotations

import json
import os
import sys
import time


def proc_status_mb(pid: int | str = "self") -> dict:
    """``{"VmRSS", "VmHWM"}``: the resident set of process ``pid`` now and its peak, in MiB, from
    ``/proc/<pid>/status`` (OSError where there is no ``/proc`` or no such process)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    return out


def proc_rss_mb(pid: int | str = "self") -> dict:
    """``{"rss_mb", "peak_rss_mb"}`` (VmRSS, VmHWM; MiB) of process ``pid`` (:func:`proc_status_mb`)."""
    vm = proc_status_mb(pid)
    return {"rss_mb": vm.get("VmRSS"), "peak_rss_mb": vm.get("VmHWM")}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc, timeout: float) -> None:
    """Stop the subprocess ``proc`` (a :class:`subprocess.Popen`): SIGTERM, then SIGKILL if it has not exited
    within ``timeout`` seconds; reaped either way."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_in_fresh_process(kind: str, args: list, *, timeout: float, env: dict | None = None) -> dict:
    """The result of probe ``kind`` (``targets``, ``cold``) run as ``python -m fleet.bench.probe KIND ARGS`` in a
    new process (``env``: its environment; None: this one's): the JSON line it prints last. FleetError (with the
    end of its stderr) when it prints none."""
    import subprocess

    from fleet.core.errors import FleetError

    proc = subprocess.run(
        [sys.executable, "-m", "fleet.bench.probe", kind, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise FleetError(f"{kind} probe failed (exit {proc.returncode}): {proc.stderr[-2000:]}") from None


# ----------------------------------------------------------------------------- the probes (in the subprocess)


def serve(uri: str, port: int, threads: int, heads: str) -> None:
    """Serve the version ``uri`` on 127.0.0.1:``port`` until stopped: ``fleet.serve.http.app_from_uri`` (``threads``
    torch threads, ``heads`` mode) under uvicorn, warnings only, no access log."""
    import uvicorn

    from fleet.serve.http import app_from_uri

    app = app_from_uri(uri, num_threads=threads, heads=heads)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def score_targets(uri: str, seqs_path: str, count: int, n_score: int, n_all: int, k: int, seed: int) -> dict:
    """``score_campaigns`` on the SIMULATED version ``uri`` of ``count`` campaigns (FleetModel's defaults, one
    thread): after 20 warm-up calls, ``n_score`` timed calls of one sequence x ``k`` random campaigns, then
    ``n_all`` of one sequence x every campaign (top 10); the sequences are ``seqs_path``'s ``[event_types,
    features]`` pairs. Returns the seconds of each call, the open time, the cache info and the RSS (VmRSS, VmHWM)
    before and after opening and after each part."""
    import numpy as np

    from fleet.serve.serving import FleetModel

    before = proc_status_mb()
    t0 = time.perf_counter()
    model = FleetModel.open(uri, verify=False, num_threads=1)
    open_s = time.perf_counter() - t0
    after_open = proc_status_mb()
    with open(seqs_path) as fh:
        seqs = [{"event_types": t, "features": f} for t, f in json.load(fh)]
    rng = np.random.default_rng(seed)
    requests = [[f"sim-{int(j):08d}" for j in rng.choice(count, size=min(k, count), replace=False)] for _ in range(50)]
    for i in range(20):
        model.score_campaigns(seqs[i % len(seqs)], requests[i % len(requests)])
    score = []
    for i in range(n_score):
        seq, ids = seqs[i % len(seqs)], requests[i % len(requests)]
        t0 = time.perf_counter()
        model.score_campaigns(seq, ids)
        score.append(time.perf_counter() - t0)
    after_score = proc_status_mb()
    every = []
    for i in range(n_all):
        t0 = time.perf_counter()
        model.score_campaigns(seqs[i % len(seqs)], top_k=10)
        every.append(time.perf_counter() - t0)
    return {
        "open_s": open_s,
        "score": score,
        "score_all": every,
        "rss_before_open": before,
        "rss_after_open": after_open,
        "rss_after_score": after_score,
        "rss_after_all": proc_status_mb(),
        "heads": model.cache_info(),
    }


def cold_lookups(uri: str, count: int, seed: int, n_campaigns: int) -> dict:
    """Cold lookups on the SIMULATED version ``uri`` of ``n_campaigns`` campaigns (``heads="lru"``, one thread):
    the open time without and with checksum verification, then the seconds of ``count`` predicts of one random
    sequence each for distinct random campaigns (every lookup a cache miss), the cache info and the RSS (VmRSS,
    VmHWM) before opening and at the end."""
    import numpy as np

    from fleet.serve.serving import FleetModel

    before = proc_status_mb()
    t0 = time.perf_counter()
    model = FleetModel.open(uri, verify=False, num_threads=1, heads="lru")
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    FleetModel.open(uri, verify=True, heads="lru")
    open_verify_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    cfg = model.config
    lat = []
    for k in rng.choice(n_campaigns, size=min(count, n_campaigns), replace=False):  # distinct ids: every lookup a miss
        cid = f"sim-{int(k):08d}"
        t = rng.integers(0, cfg.num_event_types, size=20).tolist()
        f = rng.normal(size=20 * cfg.num_features).astype("float32").tolist()
        t0 = time.perf_counter()
        model.predict(cid, [{"event_types": t, "features": f}])
        lat.append(time.perf_counter() - t0)
    return {
        "open_s": open_s,
        "open_verify_s": open_verify_s,
        "lat": lat,
        "rss_before_open": before,
        "rss_after": proc_status_mb(),
        "cache": model.cache_info(),
    }


def main(argv: list[str]) -> None:
    """``python -m fleet.bench.probe KIND ARGS`` (the kinds: this module's docstring). ``server`` runs until
    stopped; the others print their result as one line of JSON and leave without the interpreter's teardown."""
    kind, args = (argv[0], argv[1:]) if argv else ("", [])
    if kind == "server":
        serve(args[0], int(args[1]), int(args[2]), args[3])
        return
    if kind == "targets":
        result = score_targets(args[0], args[1], *map(int, args[2:]))
    elif kind == "cold":
        result = cold_lookups(args[0], *map(int, args[1:]))
    else:
        sys.exit(f"usage: python -m fleet.bench.probe server|targets|cold ARGS (got {kind!r})")
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip interpreter teardown: native thread pools have been seen to abort the process there


if __name__ == "__main__":
    main(sys.argv[1:])
