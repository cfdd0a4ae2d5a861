"""Who may read an HTTP endpoint: loopback by default, anyone else only with the token.

    host, port = parse_addr("[::1]:8765")
    token = listen_token("0.0.0.0:8765", "~/.config/nkat/token")   # AccessError if refused
    token_matches(token, presented)                                 # constant time

No aiohttp here: the config check and the CLI use this before any server exists.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from pathlib import Path

MIN_TOKEN_CHARS = 16
# Characters that survive a URL query, a cookie and a header without any quoting.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]+$")
_MAKE_TOKEN = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE"


class AccessError(ValueError):
    """A listen address or token file that cannot be used; the message says how to fix it."""


def parse_addr(addr: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` (``[::1]:8765`` for IPv6) as the pair to bind; port 0 picks a free one."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise AccessError(f"{what}: expected host:port such as 127.0.0.1:8765, got {addr!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; any other name may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path) -> str:
    """The token in ``path`` (surrounding whitespace ignored)."""
    where = Path(path).expanduser()
    try:
        token = where.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AccessError(f"token file {where}: cannot read it ({reason}); create one with: "
                          f"{_MAKE_TOKEN}") from None
    if len(token) < MIN_TOKEN_CHARS or not _TOKEN_RE.match(token):
        raise AccessError(f"token file {where}: the token must be at least {MIN_TOKEN_CHARS} of "
                          f"A-Z a-z 0-9 . _ ~ -; create one with: {_MAKE_TOKEN}")
    return token


def listen_token(addr: str, token_file: str | Path | None, what: str = "address") -> str | None:
    """The token readers of ``addr`` must present, or None on loopback without a token file.
    AccessError for a non-loopback address without one: the page would be open to anyone
    who can reach the machine."""
    host, _port = parse_addr(addr, what)
    if token_file:
        return read_token(token_file)
    if not is_loopback(host):
        raise AccessError(
            f"{what} {addr} is not a loopback address: refusing to serve it without a token. "
            f"Give a token file (--token-file FILE, or the config key http_token_file) holding "
            f"a secret of at least {MIN_TOKEN_CHARS} characters ({_MAKE_TOKEN}), or bind "
            "127.0.0.1 and reach it through an SSH tunnel")
    return None


def token_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison (hmac.compare_digest); only the length can leak."""
    if presented is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), presented.encode("utf-8", "replace"))
