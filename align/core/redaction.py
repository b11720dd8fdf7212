"""Secrets never reach a RunDir, a log or W&B: values of secret environment variables and secret-shaped tokens are
replaced by <redacted> wherever align writes text."""

from __future__ import annotations

import os
import re
from typing import Any

# Values of these variables, and of any variable whose name looks like a secret, never reach a
# RunDir, a log or W&B.
SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "OPENAI_API_KEY")


_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)


# Secrets recognizable by their shape, wherever they come from (a command line, a config value).
SECRET_PATTERNS = (
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "<redacted>"),  # Hugging Face tokens
    (re.compile(r"\b(?:sk|rk)-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"), "<redacted>"),  # OpenAI / Anthropic style API keys
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"), "<redacted>"),  # GitHub tokens
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "<redacted>"),  # Slack tokens
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "<redacted>"),  # AWS access key ids
    (re.compile(r"\blocal-[0-9a-f]{40}\b"), "<redacted>"),  # W&B local-server keys
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1<redacted>@"),  # user:password@ in a URL
    (re.compile(r"(?i)\b(api_?key|token|secret|password)=[^\s&]{8,}"), r"\1=<redacted>"),  # key=value in a query or argument
)


def secret_values() -> list[str]:
    """Values of the secret environment variables set now (long enough to be worth finding), longest first."""
    names = set(SECRET_ENV_VARS) | {k for k in os.environ if _SECRET_NAME.search(k)}
    return sorted({v for k in names if len(v := os.environ.get(k, "")) >= 8}, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with every secret environment value and every secret-shaped token replaced by <redacted>."""
    for s in secret_values() if secrets is None else secrets:
        text = text.replace(s, "<redacted>")
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact(obj: Any) -> Any:
    """Replace any secret (from the environment, or shaped like a token) inside strings of a nested structure."""
    secrets = secret_values()

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return redact_text(x, secrets)
        if isinstance(x, dict):
            return {walk(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return walk(obj)
