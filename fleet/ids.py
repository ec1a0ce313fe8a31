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
