"""Campaign ids: validated before they ever become a path or an object key."""

from __future__ import annotations

import re

from fleet.errors import InvalidCampaignIdError

CAMPAIGN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_campaign_id(campaign_id: object, *, path: str | None = None) -> str:
    """Return ``campaign_id`` if it matches ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$``, else raise
    :class:`InvalidCampaignIdError` (so ``../x``, ``""`` and 200-character ids never reach storage)."""
    if not isinstance(campaign_id, str) or CAMPAIGN_ID_PATTERN.fullmatch(campaign_id) is None:
        shown = campaign_id if not isinstance(campaign_id, str) or len(campaign_id) <= 40 else campaign_id[:40] + "..."
        raise InvalidCampaignIdError(
            f"invalid campaign id {shown!r}: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}$", path=path
        )
    return campaign_id


def printable_id(campaign_id: object) -> str:
    """``campaign_id`` as reports show it: itself when valid, else its ASCII escape (``ascii()`` without the
    quotes: non-ASCII, control and undecodable characters as backslash escapes), at most 256 characters; so an
    invalid id read from a directory name can always be written to a Parquet string column and a terminal."""
    if isinstance(campaign_id, str) and CAMPAIGN_ID_PATTERN.fullmatch(campaign_id):
        return campaign_id
    return (ascii(campaign_id)[1:-1] if isinstance(campaign_id, str) else ascii(campaign_id))[:256]
