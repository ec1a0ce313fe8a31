"""fleet: compress fleets of per-campaign recurrent models into one shared backbone + tiny heads.

The Python API (docs/api.md), the functions the ``fleet`` command line calls:

- ``fleet.compress(teachers, events, ...)``: :func:`fleet.run.pipeline.compress` (what ``fleet compress`` runs);
- ``fleet.FleetModel``: :class:`fleet.serve.serving.FleetModel` (what ``fleet predict`` / ``fleet serve`` score with);
- ``fleet.diff(a, b)``: :func:`fleet.versions.version_diff.diff_versions` (what ``fleet diff`` prints);
- ``fleet.CompressConfig``: :class:`fleet.run.stages.CompressConfig` (what ``--config`` holds).

Each is imported on first use (a module ``__getattr__``), so ``import fleet`` and ``fleet --help`` load
none of torch, Ray, MLflow or pyarrow.
"""

__version__ = "0.1.0"

#: Where ``fleet compress`` / ``fleet.compress`` write fleet versions and which fleet (MLflow registered
#: model) they write, unless told otherwise.
DEFAULT_STORE = "fleet-data/store"
DEFAULT_FLEET = "adfleet"

_LAZY = {
    "compress": ("fleet.run.pipeline", "compress"),
    "FleetModel": ("fleet.serve.serving", "FleetModel"),
    "diff": ("fleet.versions.version_diff", "diff_versions"),
    "CompressConfig": ("fleet.run.stages", "CompressConfig"),
}
__all__ = ["DEFAULT_FLEET", "DEFAULT_STORE", "CompressConfig", "FleetModel", "__version__", "compress", "diff"]


def __getattr__(name: str):
    """The lazily imported API names of :data:`_LAZY` (module ``__getattr__``, PEP 562)."""
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
