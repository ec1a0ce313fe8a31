"""Campaign ids: validated before they ever become a path or an object key."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fleet.core.constants import NAME_PATTERN
from fleet.core.errors import InvalidCampaignIdError


def _pattern_tables() -> tuple[np.ndarray, np.ndarray, int]:
    """``(first bool[256], rest bool[256], max_length)`` of :data:`fleet.core.constants.NAME_PATTERN`, read off
    the pattern itself (the one home of the rule): which byte may open an id, which may follow, and the longest id."""
    first = np.array([NAME_PATTERN.fullmatch(chr(b)) is not None for b in range(256)])
    opener = chr(int(np.flatnonzero(first)[0]))
    rest = np.array([NAME_PATTERN.fullmatch(opener + chr(b)) is not None for b in range(256)])
    longest = 1
    while NAME_PATTERN.fullmatch(opener * (longest + 1)) is not None:
        longest += 1
    return first, rest, longest


_FIRST_BYTE, _NEXT_BYTE, _MAX_ID_LENGTH = _pattern_tables()


def validate_campaign_id(campaign_id: object, *, path: str | None = None) -> str:
    """Return ``campaign_id`` if it matches ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$``, else raise
    :class:`InvalidCampaignIdError` (so ``../x``, ``""`` and 200-character ids never reach storage)."""
    if not isinstance(campaign_id, str) or NAME_PATTERN.fullmatch(campaign_id) is None:
        shown = campaign_id if not isinstance(campaign_id, str) or len(campaign_id) <= 40 else campaign_id[:40] + "..."
        raise InvalidCampaignIdError(f"invalid campaign id {shown!r}: must match ^{NAME_PATTERN.pattern}$", path=path)
    return campaign_id


def printable_id(campaign_id: object) -> str:
    """``campaign_id`` as reports show it: itself when valid, else its ASCII escape (``ascii()`` without the
    quotes: non-ASCII, control and undecodable characters as backslash escapes), at most 256 characters; so an
    invalid id read from a directory name can always be written to a Parquet string column and a terminal."""
    if isinstance(campaign_id, str) and NAME_PATTERN.fullmatch(campaign_id):
        return campaign_id
    return (ascii(campaign_id)[1:-1] if isinstance(campaign_id, str) else ascii(campaign_id))[:256]


def encode_campaign_ids(campaign_ids: Sequence[object]) -> np.ndarray | None:
    """The ids as one fixed-width bytes array ``S<w>`` (what :meth:`fleet.serve.head_table.HeadTable.find` searches)
    when every entry is a valid campaign id (:func:`validate_campaign_id`'s rule, checked vectorised: a
    thousand ids in tens of microseconds); None when any is not (the caller then names it with
    :func:`validate_campaign_id`)."""
    if len(campaign_ids) == 0:
        return np.zeros(0, dtype="S1")
    try:
        text = "\n".join(campaign_ids)  # TypeError for an entry that is not a str
    except TypeError:
        return None
    if not text.isascii() or "\x00" in text:  # a NUL would vanish in the fixed-width bytes (padding)
        return None
    encoded = np.array(campaign_ids, dtype="S")
    if encoded.dtype.itemsize > _MAX_ID_LENGTH:
        return None
    chars = encoded.view(np.uint8).reshape(len(encoded), encoded.dtype.itemsize)  # (K, w), NUL-padded
    padding = chars[:, 1:] == 0  # no NUL inside an id (checked above): zeros are the padding after it
    if not (_FIRST_BYTE[chars[:, 0]].all() and (_NEXT_BYTE[chars[:, 1:]] | padding).all()):
        return None
    return encoded
