"""fleet: compress fleets of per-campaign recurrent models into one shared backbone + tiny heads.

``fleet.diff(a, b)`` is :func:`fleet.version_diff.diff_versions` (what ``fleet diff`` prints), imported on
first use so that ``import fleet`` stays light.
"""

__version__ = "0.1.0"

_LAZY = {"diff": ("fleet.version_diff", "diff_versions")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
