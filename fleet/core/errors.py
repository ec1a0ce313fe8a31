"""Exception types of fleet. Every error names the campaign (when there is one), the file and the reason,
and never a credential (:func:`fleet.core.redact.scrub`)."""

from __future__ import annotations

from fleet.core.redact import scrub


class FleetError(Exception):
    """Base class: ``FleetError(reason, campaign_id=None, path=None)``.

    ``str(err)`` reads ``campaign 'c1': s3://b/t/c1/config.json: reason``. ``reason`` and ``path`` are
    kept scrubbed: credentials in them (``s3://key:secret@...``, ``?token=...``) read ``***``.
    """

    def __init__(self, reason: str, *, campaign_id: str | None = None, path: str | None = None):
        self.reason = scrub(reason)
        self.campaign_id = campaign_id
        self.path = None if path is None else scrub(path)
        parts = []
        if campaign_id is not None:
            parts.append(f"campaign {campaign_id!r}")
        if self.path is not None:
            parts.append(self.path)
        parts.append(self.reason)
        super().__init__(": ".join(parts))


class UsageError(FleetError):
    """The command was called with an input that cannot work (a path that does not exist, a store no Ray
    worker can reach): ``fleet`` reports it as a usage error (exit 2) before anything runs."""


class InvalidCampaignIdError(FleetError, ValueError):
    """A campaign id does not match ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$``."""


class TeacherFormatError(FleetError):
    """A teacher's files are missing, malformed, unsafe (pickle) or hold bad weights."""


class EventsFormatError(FleetError):
    """Event rows do not follow the events contract (schema, ranges, lengths)."""


class StoreError(FleetError):
    """A fleet version is missing, incomplete, of an unknown format version or fails its checksums."""


class UnknownCampaignError(FleetError, KeyError):
    """A campaign id is not in the fleet version being served."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return Exception.__str__(self)


class RegistryError(FleetError):
    """A registered model, version or alias is missing, the registry cannot be read, or it is not in the
    expected state (:mod:`fleet.storage.registry`)."""


class ChampionMovedError(RegistryError):
    """``champion`` moved between the moment a move was decided and the moment it was to be written;
    nothing was changed."""
