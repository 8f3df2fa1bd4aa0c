"""Secret redaction applied to every log line, report and installer output."""

from __future__ import annotations

import os
import re

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_***"),
    (re.compile(r"\b(gh[pousr]_)[A-Za-z0-9]{16,}"), r"\1***"),
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{16,}"), "github_pat_***"),
    # user:pass@ or token@ in URLs
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@"), r"\1***@"),
    (re.compile(r"(?i)(authorization\s*[:=]\s*)(bearer\s+|basic\s+|token\s+)?[^\s'\"]+"), r"\1\2***"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"), r"\1***"),
    (re.compile(r"(?i)([?&](?:token|access_token|api_key|apikey|key|password|secret|sig)=)[^&\s'\"]+"), r"\1***"),
]

_SECRET_ENV = re.compile(r"(?i)(token|secret|password|passwd|api_key|apikey)")


def _env_secrets() -> list[str]:
    return sorted(
        (v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 6),
        key=len,
        reverse=True,
    )


def redact(text: str) -> str:
    """Return text with tokens, credentials in URLs and secret env values masked."""
    if not text:
        return text
    for value in _env_secrets():
        if value in text:
            text = text.replace(value, "***")
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text
