"""Credentials never leave fleet: the one scrubber every text fleet writes goes through.

Manifests, MLflow params / tags / ``fleet_model.json``, reject reasons, log lines, CLI errors and HTTP
bodies are scrubbed with :func:`scrub` (or :func:`scrub_obj` for JSON-like values): credentials embedded
in URIs (``s3://key:secret@bucket``, ``?X-Amz-Signature=...``, ``?token=...``) and the secret values of
storage options (:func:`secret_values`) become ``***``. :func:`public_options` is the part of storage
options that may be saved. No other fleet module imports; :mod:`fleet.core.errors` scrubs every error with it.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

MASK = "***"
#: Option keys / query parameters that are credentials when their whole (lower-cased) name is one of these ...
SECRET_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "pwd",
        "credentials",
        "sas",
        "sig",
        "signature",
        "auth",
        "authorization",
        "cookie",
        "apikey",
    }
)
#: ... or when it contains one of these.
SECRET_PARTS = (
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "access_key",
    "private_key",
    "api_key",
    "apikey",
    "account_key",
    "connection_string",
    "session",
    "signature",
    "authorization",
)
#: Shortest storage-option value treated as a secret (shorter ones would mask ordinary words).
MIN_SECRET_CHARS = 4

# scheme://userinfo@host: everything between "://" and the last "@" before the host's "/", "?" or "#".
_USERINFO_RE = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s?#]*@")
# ?name=value / &name=value (URL query and fragment parameters).
_PARAM_RE = re.compile(r"([?&#;])([^=&\s#?;'\"]+)=([^&\s#;'\"]*)")


def is_secret_name(name: Any) -> bool:
    """Whether an option key or query parameter name looks like a credential (``secret``, ``sig``,
    ``X-Amz-Credential``, ``aws_session_token``, ``Authorization``, ...)."""
    lowered = str(name).lower()
    return lowered in SECRET_NAMES or any(part in lowered for part in SECRET_PARTS)


def secret_values(options: Any, under_secret: bool = False) -> set[str]:
    """String values stored under secret-looking keys of storage ``options`` (nested dicts and lists),
    at least :data:`MIN_SECRET_CHARS` long: what :func:`scrub` masks wherever they appear."""
    found: set[str] = set()
    if isinstance(options, dict):
        for k, v in options.items():
            found |= secret_values(v, under_secret or is_secret_name(k))
    elif isinstance(options, (list, tuple)):
        for v in options:
            found |= secret_values(v, under_secret)
    elif under_secret and isinstance(options, str) and len(options) >= MIN_SECRET_CHARS:
        found.add(options)
    return found


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every credential replaced by ``***``: the given ``secrets`` (verbatim or
    percent-encoded; see :func:`secret_values`), the userinfo of URIs (``s3://***@bucket/x``) and the
    values of secret-looking query parameters (``?X-Amz-Signature=***``, ``&token=***``). Idempotent."""
    text = str(text)
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, MASK)
    text = _USERINFO_RE.sub(rf"\1{MASK}@", text)
    return _PARAM_RE.sub(lambda m: f"{m[1]}{m[2]}={MASK}" if is_secret_name(m[2]) else m[0], text)


def scrub_obj(obj: Any, secrets: Iterable[str] = (), under_secret: bool = False) -> Any:
    """A copy of a JSON-like value with every string :func:`scrub`-bed and every string under a
    secret-looking key replaced by ``***`` (keys are kept: a manifest still shows what was set)."""
    if isinstance(obj, dict):
        return {k: scrub_obj(v, secrets, under_secret or is_secret_name(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_obj(v, secrets, under_secret) for v in obj]
    if isinstance(obj, str):
        return MASK if under_secret else scrub(obj, secrets)
    return obj


def public_options(options: Any) -> Any:
    """A JSON-safe copy of storage options that may be saved (``fleet_model.json``): secret-looking
    keys dropped, strings :func:`scrub`-bed, values that are not JSON scalars dropped."""
    if isinstance(options, dict):
        out = {}
        for k, v in options.items():
            if is_secret_name(k):
                continue
            v = public_options(v)
            if v is not None:
                out[str(k)] = v
        return out
    if isinstance(options, (list, tuple)):
        return [v for v in (public_options(x) for x in options) if v is not None]
    if isinstance(options, str):
        return scrub(options)
    if isinstance(options, bool):
        return options
    if isinstance(options, numbers.Integral):
        return int(options)
    if isinstance(options, numbers.Real) and math.isfinite(options):
        return float(options)
    return None


__all__ = ["MASK", "is_secret_name", "public_options", "scrub", "scrub_obj", "secret_values"]
