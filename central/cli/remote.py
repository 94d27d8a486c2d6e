"""The operator CLI's side of central's HTTP API: the saved login and a client that turns
HTTP refusals into typed errors (STYLE.md §7, turned into one line by the commands).

`central login` stores `{url, user, token}` in a file only its owner may read (0600), by
default `$XDG_CONFIG_HOME/fieldlink/cli-session.json` (`~/.config/…`), or the path in
`$FIELDLINK_CLI_TOKEN`. A session file that others may read is refused, as ssh refuses a key
others may read. The token is a bearer token of `POST /api/login` (DESIGN.md §8): it is never
printed, and it ends when central's idle timeout passes, on `central logout`, or when the
user's password changes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from central import CentralError

TOKEN_ENV = "FIELDLINK_CLI_TOKEN"
TIMEOUT_S = 30.0


class CliError(CentralError):
    """Base of the operator CLI's errors: each is one clear line and exit code 1."""


class NotLoggedInError(CliError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}: log in first (central login --url URL --user NAME)")


class RoleMissingError(CliError):
    """403: the user's role (or area) does not allow it."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"refused (403), your role or area does not allow it: {detail}")
        self.detail = detail


class UnreachableError(CliError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"central unreachable at {url}: {reason}")
        self.url = url


class ApiError(CliError):
    """Any other refusal: the status and central's problem title and detail."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{title} ({status}): {detail}" if detail else f"{title} ({status})")
        self.status = status
        self.title = title
        self.detail = detail


class SessionFileError(CliError):
    pass


@dataclass(frozen=True, slots=True)
class Session:
    url: str
    user: str
    token: str

    def __repr__(self) -> str:  # never the token, also not in a traceback
        return f"Session(url={self.url!r}, user={self.user!r})"


def session_path(env: Mapping[str, str]) -> Path:
    """$FIELDLINK_CLI_TOKEN, else $XDG_CONFIG_HOME (or ~/.config)/fieldlink/cli-session.json."""
    if env.get(TOKEN_ENV):
        return Path(env[TOKEN_ENV]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "fieldlink" / "cli-session.json"


def save_session(path: Path, session: Session) -> None:
    """Write the session readable and writable by its owner only (0600; the folder 0700 when
    made here), replacing any earlier one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # an older file may have had a wider mode
        json.dump({"url": session.url, "user": session.user, "token": session.token}, f)
        f.write("\n")


def load_session(path: Path) -> Session:
    """The saved session; `NotLoggedInError` when there is none."""
    try:
        st = path.stat()
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotLoggedInError("not logged in") from None
    except OSError as exc:
        raise SessionFileError(f"cannot read {path}: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SessionFileError(f"{path} may be read by others (mode {st.st_mode & 0o777:o}): "
                               "remove it and log in again")
    try:
        data = json.loads(raw)
        return Session(url=str(data["url"]), user=str(data["user"]), token=str(data["token"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SessionFileError(f"{path} is not a session file: remove it and log in "
                               "again") from exc


def forget_session(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _problem(rsp: httpx.Response) -> tuple[str, str]:
    try:
        body = rsp.json()
    except ValueError:
        return rsp.reason_phrase or "HTTP error", rsp.text[:200]
    if isinstance(body, dict):
        return str(body.get("title") or rsp.reason_phrase), str(body.get("detail") or "")
    return rsp.reason_phrase or "HTTP error", ""


def check(rsp: httpx.Response) -> Any:
    """The JSON body of a 2xx response (None for 204); a typed error otherwise."""
    if rsp.is_success:
        return None if rsp.status_code == 204 or not rsp.content else rsp.json()
    title, detail = _problem(rsp)
    if rsp.status_code == 401:
        raise NotLoggedInError(f"central says: {detail or title} (the session ended?)")
    if rsp.status_code == 403:
        raise RoleMissingError(detail or title)
    raise ApiError(rsp.status_code, title, detail)


class Api:
    """A blocking client for one central, as the logged-in user."""

    def __init__(self, url: str, token: str | None = None, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT_S,
                                  transport=transport, follow_redirects=False)

    @classmethod
    def from_session(cls, session: Session) -> Api:
        return cls(session.url, session.token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Any = None) -> Any:
        """One request; the JSON answer, or a typed error (refused, unreachable)."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            rsp = self._http.request(method, path, params=clean, json=body)
        except httpx.ConnectError as exc:
            raise UnreachableError(self.url, "connection refused or no route") from exc
        except httpx.TimeoutException as exc:
            raise UnreachableError(self.url, f"no answer within {TIMEOUT_S:.0f} s") from exc
        except httpx.HTTPError as exc:  # a bad URL, a broken connection
            raise UnreachableError(self.url, str(exc) or type(exc).__name__) from exc
        return check(rsp)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body=body if body is not None else {})

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body=body)


def login(url: str, user: str, password: str) -> tuple[Session, dict[str, Any]]:
    """Log in over HTTP; the session to save and the user as central describes it."""
    if "://" not in url:
        url = f"http://{url}"  # `central login --url 127.0.0.1:8080`
    with Api(url) as api:
        try:
            body = api.request("POST", "/api/login", body={"name": user, "password": password,
                                                           "kind": "bearer"})
        except NotLoggedInError as exc:  # 401 here is a wrong name or password
            raise CliError(f"login failed for {user!r}: wrong name or password, or the user "
                           "is disabled") from exc
    return Session(url=api.url, user=user, token=str(body["token"])), dict(body["user"])


__all__ = ["Api", "ApiError", "CliError", "NotLoggedInError", "RoleMissingError", "Session",
           "SessionFileError", "UnreachableError", "forget_session", "load_session", "login",
           "save_session", "session_path"]
