"""Tools over stored versions: `fleet diff` (version_diff), `fleet gc` (retention) and the run report (report). Imports storage and below."""
