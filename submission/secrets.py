"""Does a file about to go into the submission zip hold a secret? Patterns, and reading any encoding.

A token is ASCII, but the file around it need not be UTF-8: a latin-1 or cp1252 file decodes byte
for byte as latin-1, and a UTF-16/32 file (with or without a byte-order mark) is read in that
encoding too, so every file is scanned, binary ones included (``scan`` reads each byte string all
the ways it could hold text). Patterns follow the usual scanners' rules (gitleaks, trufflehog):
vendor prefixes where a token has one, and where it has none (W&B keys, AWS secret keys, generic
``api_key:`` settings) the key name or the token's shape, with placeholders left alone.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator

# A value that is surely not a secret: a reference to one or an example.
PLACEHOLDER = re.compile(r"(?i)^(?:\$|<|\{|%|none$|null$|true$|false$|os\.|env|getenv|your|example|changeme|dummy|fake|x{4,}|\*{3,}|\.{3})")
_KEY_NAME = (
    r"(?:api[_-]?key|api[_-]?token|apikey|secret[_-]?key|secret[_-]?access[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|password|passwd)"
)

PATTERNS: dict[str, re.Pattern[str]] = {
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    # W&B keys are 40 hex digits with no prefix: any such run on a line that names wandb
    # (wandb login KEY, wandb.login(key="KEY"), os.environ["WANDB_API_KEY"] = "KEY", WANDB_API_KEY=KEY).
    "Weights & Biases API key": re.compile(r"(?i)wandb[^\n]{0,80}?(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "AWS access key": re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"),
    # 40 characters of base64 standing alone (``aws_secret_access_key = KEY``, or a lone ``"KEY"``);
    # ``_aws_secret_shaped`` keeps those that look random (git shas are hex; identifiers and URL paths are not bounded so).
    "AWS secret access key": re.compile(r"(?<![A-Za-z0-9/+=~._%-])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=~._%-])"),
    "OpenAI API key": re.compile(r"\bsk-[A-Za-z0-9_-]{32,}\b"),
    "GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,})\b"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
}
# ``api_key: value`` (YAML), ``API_KEY=value`` (.env, shell), ``"api_key": "value"`` (JSON), ``api_key = "value"`` (Python, TOML).
ASSIGNED = re.compile(r"(?im)(?<![\w-])(?:[\w-]*[_-])?" + _KEY_NAME + r"['\"]?\s*[:=]\s*['\"]?([^\s'\"#,;)}\]]{12,})")


def texts(data: bytes) -> Iterator[str]:
    """Every reading of ``data`` as text that could hide an ASCII token (UTF-8 or latin-1, UTF-16, UTF-32)."""
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig")):
        if data.startswith(bom):
            yield data.decode(encoding, errors="replace")
            break
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError:
        yield data.decode("latin-1")  # maps every byte; ASCII stays ASCII
    if b"\0" in data:  # UTF-16 (BOM or not, either byte order) puts a NUL beside every ASCII character
        for encoding in ("utf-16-le", "utf-16-be"):
            for start in (0, 1):
                chunk = data[start:]
                yield chunk[: len(chunk) // 2 * 2].decode(encoding, errors="replace")


def _counts(value: str) -> tuple[int, int, int]:
    return sum(c.isdigit() for c in value), sum(c.isupper() for c in value), sum(c.islower() for c in value)


def _aws_secret_shaped(value: str) -> bool:
    """Random base64 of 40 characters has ~6 digits and ~16 of each case; an identifier or a word has few digits."""
    digits, upper, lower = _counts(value)
    return digits >= 3 and upper >= 3 and lower >= 3


def _assigned_secret(value: str) -> bool:
    """A value that looks random, not code (``access_token=access_token``, ``password: config.password``) or an example."""
    if PLACEHOLDER.match(value) or any(c in value for c in "()[]{}") or re.fullmatch(r"[A-Za-z_]\w*(?:\.\w+)+", value):
        return False
    digits, upper, lower = _counts(value)
    return (digits >= 2 and upper + lower >= 2) or (upper >= 2 and lower >= 2 and len(value) >= 20)


def scan(data: bytes) -> tuple[str, int, str] | None:
    """The first secret found: (kind, line, the start of it), or None."""
    for text in texts(data):
        for kind, pattern in PATTERNS.items():
            for match in pattern.finditer(text):
                if kind != "AWS secret access key" or _aws_secret_shaped(match.group(0)):
                    return kind, text.count("\n", 0, match.start()) + 1, match.group(0)[:8]
        for match in ASSIGNED.finditer(text):
            if _assigned_secret(match.group(1)):
                return "API key or password setting", text.count("\n", 0, match.start()) + 1, match.group(0)[:8]
    return None
