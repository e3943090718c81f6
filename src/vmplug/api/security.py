"""Who may talk to the TCP listener: a bearer token, or a browser session made from it.

The unix socket is guarded by the file system (root, or the ``[api] group``);
the TCP listener is on loopback only (config.py refuses anything else) and
every request on it must carry the token:

* ``Authorization: Bearer <token>`` -- scripts, Prometheus (``bearer_token_file``).
  Browsers never send this header on their own, so a request carrying it is
  no cross-site request: no CSRF check.
* the ``vmplug_session`` cookie -- the web page.  ``GET /?token=<token>`` (or
  the login form) trades the token for a random session id in an HttpOnly,
  SameSite=Strict cookie.  A state-changing request with the cookie must also
  carry the session's CSRF token in ``X-CSRF-Token`` and an ``Origin`` (or
  ``Referer``) naming this very host and port.

Every TCP request must name a loopback ``Host`` (a DNS-rebinding page cannot
reach the port under a name of its own), and no response carries CORS headers.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

from vmplug.errors import VmplugError

SESSION_COOKIE = "vmplug_session"
CSRF_HEADER = "X-CSRF-Token"
MAX_SESSIONS = 64
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def load_or_create_token(path: Path) -> str:
    """The token in ``path``; a new random one (file mode 0600) when it is missing."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return load_or_create_token(path)
        except OSError as exc:
            raise VmplugError(f"cannot create the API token file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token
    except OSError as exc:
        raise VmplugError(f"cannot read the API token file {path}: {exc.strerror}") from None
    if len(text) < 16:
        raise VmplugError(f"the API token in {path} is shorter than 16 characters")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise VmplugError(
            f"the API token file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            "chmod 600 it"
        )
    return text


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Sessions:
    """Browser sessions: session id -> CSRF token; the oldest go first past a bound."""

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, str] = OrderedDict()

    def new(self) -> tuple[str, str]:
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._by_id[sid] = csrf
        while len(self._by_id) > MAX_SESSIONS:
            self._by_id.popitem(last=False)
        return sid, csrf

    def csrf(self, sid: str | None) -> str | None:
        if not sid:
            return None
        # constant-time over the ids we hold: an id is a secret too
        found = None
        for known, csrf in self._by_id.items():
            if same(known, sid):
                found = csrf
        return found


def host_is_loopback(host_header: str | None) -> bool:
    if not host_header:
        return False
    host = urlsplit(f"//{host_header}").hostname or ""
    return host in LOOPBACK_NAMES or f"[{host}]" in LOOPBACK_NAMES


def origin_matches(origin: str | None, host_header: str | None) -> bool:
    """``origin`` (an Origin or Referer value) is ``http://<Host>`` exactly."""
    if not origin or not host_header or origin == "null":
        return False
    parts = urlsplit(origin)
    return parts.scheme == "http" and parts.netloc.lower() == host_header.lower()
