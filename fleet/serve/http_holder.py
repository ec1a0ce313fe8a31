"""The served model of ``fleet serve`` (:mod:`fleet.serve.http`): :class:`ModelHolder` swaps it atomically and
reloads it (``POST /admin/reload``, and a poller thread while the app runs).

A request takes the model reference once (:meth:`ModelHolder.get`), so a swap never changes a version under a
request in flight.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fleet.core.redact import scrub
from fleet.serve.http_schemas import public_detail
from fleet.serve.serving import FleetModel

log = logging.getLogger("fleet.serve.http")  # the HTTP service's one logger (its modules share it)


class ReloadUnavailable(RuntimeError):
    """The holder has no reload callable."""


class ModelHolder:
    """Holds the served :class:`FleetModel`; :meth:`swap` replaces it atomically.

    Args:
        model: the model served first.
        reload: optional ``reload(current) -> FleetModel | None`` (a new model, or None when nothing
            changed), e.g. :func:`fleet.serve.serving.alias_reloader`; used by ``POST /admin/reload`` and
            by the poller.
        poll_seconds: when set (and ``reload`` given), a background thread calls :meth:`reload`
            every ``poll_seconds`` while the app runs (:meth:`start` / :meth:`stop`).
    """

    def __init__(
        self,
        model: FleetModel,
        *,
        reload: Callable[[FleetModel], FleetModel | None] | None = None,
        poll_seconds: float | None = None,
    ):
        if poll_seconds is not None and poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self._model = model
        self._reload = reload
        self.poll_seconds = poll_seconds
        self._swap_lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time (admin and poller)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0
        self.reload_errors = 0
        self.last_reload_error: str | None = None
        self._retired = {"hits": 0, "misses": 0}  # cache counters of models swapped out

    def get(self) -> FleetModel:
        """The current model (take it once per request)."""
        return self._model

    def swap(self, new: FleetModel) -> FleetModel:
        """Serve ``new`` from now on; return the old model (requests holding it finish on it)."""
        if not isinstance(new, FleetModel):
            raise TypeError(f"swap needs a FleetModel, got {type(new).__name__}")
        with self._swap_lock:
            old, self._model = self._model, new
            info = old.cache_info()
            self._retired["hits"] += info["hits"]
            self._retired["misses"] += info["misses"]
            self.swaps += 1
        log.info("serving fleet version %s (was %s)", new.version_id, old.version_id)
        return old

    @property
    def can_reload(self) -> bool:
        """Whether a reload callable was given (``POST /admin/reload`` answers 409 without one)."""
        return self._reload is not None

    def reload(self) -> bool:
        """Call the reload callable; swap and return True when it yields another version."""
        if self._reload is None:
            raise ReloadUnavailable("this server has no reload source (serve a models:/ URI to enable it)")
        with self._reload_lock:
            current = self.get()
            try:
                new = self._reload(current)
            except Exception as exc:
                self.reload_errors += 1
                self.last_reload_error = f"{type(exc).__name__}: {public_detail(exc)}"  # shown by /healthz
                raise
            self.last_reload_error = None
            if new is None or new is current or new.version_id == current.version_id:
                return False
            self.swap(new)
            return True

    def cache_totals(self) -> dict:
        """Head-cache ``hits`` and ``misses`` since start (models swapped out included), and the current
        model's ``size`` and ``capacity``."""
        info = self.get().cache_info()
        return {
            "hits": self._retired["hits"] + info["hits"],
            "misses": self._retired["misses"] + info["misses"],
            "size": info["size"],
            "capacity": info["capacity"],
        }

    def start(self) -> None:
        """Start the poller (no-op without ``poll_seconds`` or reload callable, or when running)."""
        if self._reload is None or self.poll_seconds is None or (self._thread and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="fleet-model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the poller and wait for it (at most 30 s); no-op when it is not running."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001 - keep serving the current version
                log.warning("model poll failed, still serving %s: %s", self.get().version_id, scrub(str(exc)))


__all__ = ["ModelHolder", "ReloadUnavailable"]
