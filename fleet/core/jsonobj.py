"""The one check of JSON text that must hold an object (``$FLEET_STORAGE_OPTIONS``, ``--storage-options``,
``fleet predict``'s input lines). Ground floor: imports nothing from fleet."""

from __future__ import annotations

import json


def parse_json_object(text: str, where: str) -> dict:
    """The JSON object ``text`` holds; ValueError naming ``where`` (an environment variable, a flag, a file and
    line) when it is not JSON or not an object. The message never shows ``text`` (it may hold credentials)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object")  # noqa: TRY004 - a bad value: callers catch ValueError
    return value


__all__ = ["parse_json_object"]
