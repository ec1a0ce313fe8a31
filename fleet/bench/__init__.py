"""``fleet bench``: fleet against its peers, side by side, on the same teachers and hold-out rows.

One run measures (DESIGN.md section 5):

(a) ``teacher_fp32``          the teachers as they are (the reference; its time is stage 1, the floor)
(b) ``teacher_int8_dynamic``  each teacher through ``torch.ao.quantization.quantize_dynamic`` (LSTM/GRU +
                              Linear -> qint8), the classic post-training baseline
(c) ``independent_students``  one small student per campaign (fleet's backbone + head shape, fp32), distilled
                              alone with fleet's backbone step budget; run on K random campaigns, time and
                              total bytes *extrapolated* to N (labelled so)
(d) ``fleet_*``               one real ``run_compress`` (default config, bits auto: the headline wall time)
                              plus variants (bits 8/4/2/1, heads lowrank/linear, loss class_distance) that
                              share its stage 1 and, where the config allows, its backbone

plus serving latencies (in-process warm/cold, HTTP on loopback), serving RSS, a *simulated* scale
test (random heads of the real shape and bit mix, 10k and 1M campaigns, in the real store format), and
issue 12's serving targets side by side with the K-teacher peer (:func:`fleet.bench.serving.serving_targets`;
alone: ``fleet bench --serving-only --model VERSION --fleet-dir DIR``). The REAL scale benchmark (real runs at
1,000 to 100,000 entities) is ``fleet bench --scale`` (:mod:`fleet.bench.scale`); ``--zoo`` is
:mod:`fleet.bench.zoo`.
Every size is a serialized file measured on disk or in memory, never a parameter count.
Outputs under ``--out``: ``results.json``, ``results.md``, ``*.png``; the run is logged to MLflow
(experiment ``fleet-bench``).

The modules, lowest first (each imports only those above it in this list):

- :mod:`fleet.bench.probe`: the serving subprocesses (``python -m fleet.bench.probe KIND ARGS``: HTTP server, probes),
  a process's RSS; it imports only the standard library at module level;
- :mod:`fleet.bench.common`: :class:`BenchConfig`, the results format, console, latency summaries, machine;
- :mod:`fleet.bench.methods`: the methods (a)-(d) and fleet's variants, summed up the same way;
- :mod:`fleet.bench.serving`: serving latencies, HTTP, issue 12's serving targets and the K-teacher peer;
- :mod:`fleet.bench.simulated`: the SIMULATED scale test;
- :mod:`fleet.bench.report`: results.md, plots, MLflow, docs/benchmarks.md (:func:`write_docs`);
- :mod:`fleet.bench.run`: :func:`run_bench`, the whole benchmark;
- :mod:`fleet.bench.zoo` and :mod:`fleet.bench.scale`: ``--zoo`` and ``--scale`` (its driver process:
  ``python -m fleet.bench.scale SPEC.json``);
- :mod:`fleet.bench.cli`: ``fleet bench``'s options and dispatch (:func:`add_arguments`, :func:`run_from_args`).

The names below are imported on first use (a module ``__getattr__``), so that importing a part of the package
(the scale driver, a Ray worker running a task body) loads no more than that part.
"""

_LAZY = {
    "BenchConfig": "fleet.bench.common",
    "run_bench": "fleet.bench.run",
    "write_docs": "fleet.bench.report",
    "add_arguments": "fleet.bench.cli",
    "run_from_args": "fleet.bench.cli",
}
__all__ = ["BenchConfig", "add_arguments", "run_bench", "run_from_args", "write_docs"]


def __getattr__(name: str):
    """The lazily imported names of :data:`_LAZY` (module ``__getattr__``, PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'fleet.bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
