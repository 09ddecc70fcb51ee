"""Connection to a kiln daemon: where it is, how to authenticate, and error translation."""

from __future__ import annotations

import asyncio
import email.utils
import json as jsonlib
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from .errors import KilnConnectionError, KilnError, TimeoutError, error_from_response

if TYPE_CHECKING:
    from ._stream import EventStream

__all__ = ["Client", "RetryPolicy", "default_socket", "get_default_client", "set_default_client"]

DEFAULT_TIMEOUT = 300.0
"""Seconds to wait for any one read from the daemon (a cold boot answers only once the guest is up)."""

# Query parameters as httpx takes them: a mapping, or (key, value) pairs for repeated keys.
Params = Any


class _Default:
    """Marker for "use the client's configured timeout" (``None`` means no timeout at all)."""


DEFAULT = _Default()
Timeout = float | None | _Default


@dataclass(frozen=True)
class RetryPolicy:
    """When the SDK sends a request again by itself.

    Retried: a 429 (``rate_limited``, ``capacity_exceeded``: the daemon refused the request before doing
    anything) for every method, honouring ``Retry-After``; a 502/503 or a broken connection only for
    idempotent requests (GET, HEAD, PUT, DELETE; a PUT whose body is a stream cannot be sent twice and is
    not retried); a connection that could not be opened (nothing was sent) for every method. A POST that
    got any other error response is never retried. Waits grow exponentially with jitter (a random
    50-100 % of ``backoff * 2**n``, at most ``max_backoff``); a ``Retry-After`` is waited out as given.

    Attributes:
        max_attempts: tries in all, the first included (1 turns retries off).
        backoff: seconds before the first retry (before jitter).
        max_backoff: the longest wait between two tries, unless the daemon's ``Retry-After`` says more.
        max_elapsed: seconds from the first try after which no new try starts; a ``Retry-After`` that
            would end beyond it makes the error surface at once instead.
    """

    max_attempts: int = 4
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_elapsed: float = 30.0

    @classmethod
    def disabled(cls) -> RetryPolicy:
        return cls(max_attempts=1)


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) in seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retry:
    """One request's retry state: says how long to wait before the next try, or ``None`` to give up."""

    def __init__(self, policy: RetryPolicy, method: str, idempotent: bool | None, content: Any) -> None:
        self.policy = policy
        replayable = content is None or isinstance(content, (bytes, str))
        self.idempotent = replayable and (idempotent if idempotent is not None else method in IDEMPOTENT_METHODS)
        self.started = time.monotonic()
        self.attempt = 1

    def after_response(self, resp: httpx.Response) -> float | None:
        if resp.status_code == 429 or (resp.status_code in (502, 503) and self.idempotent):
            return self._next(retry_after_seconds(resp.headers.get("retry-after")))
        return None

    def after_error(self, err: BaseException) -> float | None:
        # ConnectError: the connection was never opened, so the daemon cannot have seen the request.
        if isinstance(err, httpx.ConnectError) or (
            self.idempotent and isinstance(err, httpx.TransportError) and not isinstance(err, httpx.TimeoutException)
        ):
            return self._next(None)
        return None

    def _next(self, retry_after: float | None) -> float | None:
        p = self.policy
        if self.attempt >= p.max_attempts:
            return None
        cap = min(p.max_backoff, p.backoff * 2 ** (self.attempt - 1))
        delay = random.uniform(cap / 2, cap)
        if retry_after is not None:
            delay = retry_after + random.uniform(0, p.backoff)  # jitter spreads clients told the same time
        if time.monotonic() - self.started + delay > p.max_elapsed:
            return None
        self.attempt += 1
        return delay


def default_data_dir() -> Path:
    """kiln's data directory, chosen like the daemon does: ``$KILN_DATA_DIR``, else ``/var/lib/kiln``
    for root, else ``$XDG_DATA_HOME/kiln`` or ``~/.local/share/kiln``."""
    if d := os.environ.get("KILN_DATA_DIR"):
        return Path(d)
    if os.geteuid() == 0:
        return Path("/var/lib/kiln")
    if xdg := os.environ.get("XDG_DATA_HOME"):
        return Path(xdg) / "kiln"
    return Path.home() / ".local/share/kiln"


def default_socket() -> Path:
    """The daemon's socket when nothing is configured: ``kiln.sock`` in the data directory."""
    return default_data_dir() / "kiln.sock"


def sandbox_path(sandbox: str, suffix: str = "") -> str:
    return f"/v1/sandboxes/{quote(sandbox, safe='')}{suffix}"


def snapshot_path(snapshot: str, suffix: str = "") -> str:
    return f"/v1/snapshots/{quote(snapshot, safe='')}{suffix}"


def volume_path(volume: str) -> str:
    return f"/v1/volumes/{quote(volume, safe='')}"


def operation_path(operation: str, suffix: str = "") -> str:
    return f"/v1/operations/{quote(operation, safe='')}{suffix}"


class Client:
    """Where the daemon is and how to talk to it. Thread-safe; reuse one per process.

    With no arguments the environment decides: ``KILN_URL`` (TCP, with ``KILN_TOKEN``) if set, else the
    unix socket ``KILN_SOCKET``, else :func:`default_socket`. Explicit arguments win over the environment.

    Args:
        socket: path of the daemon's unix socket.
        url: ``HOST:PORT`` or ``http://HOST:PORT`` of a daemon started with ``--listen``.
        token: bearer token for ``url`` (default ``$KILN_TOKEN``).
        timeout: seconds to wait for each read from the daemon; ``None`` waits forever.
        retry: when to send a request again (see :class:`RetryPolicy`); ``RetryPolicy.disabled()`` never.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        if socket is not None and url is not None:
            raise ValueError("give either socket or url, not both")
        if socket is None and url is None:
            url = os.environ.get("KILN_URL") or None
            if url is None:
                socket = os.environ.get("KILN_SOCKET") or default_socket()
        self.socket: str | None = os.fspath(socket) if socket is not None else None
        self.url: str | None = None
        self._headers = {"User-Agent": "kiln-python"}
        if url is not None:
            self.url = url if "://" in url else f"http://{url}"
            token = token if token is not None else os.environ.get("KILN_TOKEN")
            if token:
                self._headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._lock = threading.Lock()
        self._sync: httpx.Client | None = None
        # An httpx.AsyncClient's connections belong to the event loop that opened them, so keep one per loop.
        self._async: httpx.AsyncClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"Client({self.where})"

    @property
    def where(self) -> str:
        """The daemon's address, for messages."""
        return f"url={self.url!r}" if self.url else f"socket={self.socket!r}"

    def _client_args(self) -> dict[str, Any]:
        return {
            "base_url": self.url or "http://kiln",
            "headers": self._headers,
            "timeout": httpx.Timeout(self.timeout, connect=min(self.timeout or 30.0, 30.0)),
        }

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._sync is None:
                transport = httpx.HTTPTransport(uds=self.socket) if self.socket else None
                self._sync = httpx.Client(transport=transport, **self._client_args())
            return self._sync

    def _ahttp(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            transport = httpx.AsyncHTTPTransport(uds=self.socket) if self.socket else None
            self._async = httpx.AsyncClient(transport=transport, **self._client_args())
            self._async_loop = loop
        return self._async

    def close(self) -> None:
        """Closes the synchronous connection pool (the async one: :meth:`aclose`)."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        if self._async is not None and self._async_loop is asyncio.get_running_loop():
            await self._async.aclose()
        self._async = None
        self._async_loop = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def events(
        self,
        *,
        kinds: str | Sequence[str] | None = None,
        sandbox: str | None = None,
        since: int | None = None,
    ) -> EventStream:
        """The daemon's events as they happen (docs/observability.md), both ``for event in ...`` and
        ``async for event in ...``. ``kinds``: kinds or prefixes such as ``"sandbox."``; ``sandbox``: id or
        name; ``since``: replay the events after this ``seq`` first (``0``: all the daemon keeps)."""
        from ._stream import EventStream

        return EventStream(self, kinds=kinds, sandbox=sandbox, since=since)

    # -- requests ---------------------------------------------------------------------------------

    def _timeout(self, timeout: Timeout) -> Any:
        return httpx.USE_CLIENT_DEFAULT if isinstance(timeout, _Default) else httpx.Timeout(timeout, connect=30.0)

    @contextmanager
    def _translate(self) -> Iterator[None]:
        """Turns transport failures into SDK errors that say where the daemon was expected."""
        try:
            yield
        except httpx.TimeoutException as e:
            raise TimeoutError(
                f"no answer from the kiln daemon at {self.where} in time ({type(e).__name__})",
                code="client_timeout",
            ) from e
        except httpx.ConnectError as e:
            hint = " — is `kiln serve` running? (set KILN_SOCKET or KILN_URL)"
            raise KilnConnectionError(
                f"cannot reach the kiln daemon at {self.where}: {e}{hint}", code="connection_failed"
            ) from e
        except httpx.TransportError as e:
            raise KilnConnectionError(
                f"connection to the kiln daemon at {self.where} failed: {e!r}", code="connection_failed"
            ) from e

    @staticmethod
    def _error(resp: httpx.Response) -> KilnError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        retry_after = retry_after_seconds(resp.headers.get("retry-after"))
        return error_from_response(resp.status_code, body, resp.text, retry_after)

    def _send(
        self,
        method: str,
        path: str,
        *,
        stream: bool,
        json: Any = None,
        params: Params = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout = DEFAULT,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Sends a request, retrying as :attr:`retry` allows; raises a :class:`KilnError` for error statuses.
        With ``stream`` the body is left unread (the caller closes the response)."""
        retry = _Retry(self.retry, method, idempotent, content)
        http = self._http()
        while True:
            req = http.build_request(
                method, path, json=json, params=params, content=content, headers=headers, timeout=self._timeout(timeout)
            )
            try:
                with self._translate():
                    resp = http.send(req, stream=stream)
            except KilnError as e:
                if e.__cause__ is None or (delay := retry.after_error(e.__cause__)) is None:
                    raise
                time.sleep(delay)
                continue
            if resp.status_code < 400:
                return resp
            with self._translate():
                resp.read()
            resp.close()
            if (delay := retry.after_response(resp)) is None:
                raise self._error(resp)
            time.sleep(delay)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Params = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout = DEFAULT,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Sends one request and returns the response, raising a :class:`KilnError` for error statuses.
        ``idempotent`` overrides the method's default for retries of 502/503 and broken connections."""
        return self._send(
            method,
            path,
            stream=False,
            json=json,
            params=params,
            content=content,
            headers=headers,
            timeout=timeout,
            idempotent=idempotent,
        )

    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Params = None,
        timeout: Timeout = DEFAULT,
        idempotent: bool | None = None,
    ) -> Iterator[httpx.Response]:
        """Like :meth:`request` but the body is read by the caller while it arrives (retries happen only
        before the first byte of a successful answer)."""
        resp = self._send(method, path, stream=True, json=json, params=params, timeout=timeout, idempotent=idempotent)
        try:
            with self._translate():
                yield resp
        finally:
            resp.close()

    @staticmethod
    def iter_ndjson(resp: httpx.Response) -> Iterator[dict[str, Any]]:
        """The JSON lines of a streamed response (use inside :meth:`stream`, which translates errors)."""
        for line in resp.iter_lines():
            if line.strip():
                yield jsonlib.loads(line)

    async def _asend(
        self,
        method: str,
        path: str,
        *,
        stream: bool,
        json: Any = None,
        params: Params = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout = DEFAULT,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Async :meth:`_send`."""
        retry = _Retry(self.retry, method, idempotent, content)
        http = self._ahttp()
        while True:
            req = http.build_request(
                method, path, json=json, params=params, content=content, headers=headers, timeout=self._timeout(timeout)
            )
            try:
                with self._translate():
                    resp = await http.send(req, stream=stream)
            except KilnError as e:
                if e.__cause__ is None or (delay := retry.after_error(e.__cause__)) is None:
                    raise
                await asyncio.sleep(delay)
                continue
            if resp.status_code < 400:
                return resp
            with self._translate():
                await resp.aread()
            await resp.aclose()
            if (delay := retry.after_response(resp)) is None:
                raise self._error(resp)
            await asyncio.sleep(delay)

    async def arequest(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Params = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: Timeout = DEFAULT,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Async :meth:`request`."""
        return await self._asend(
            method,
            path,
            stream=False,
            json=json,
            params=params,
            content=content,
            headers=headers,
            timeout=timeout,
            idempotent=idempotent,
        )

    async def arequest_json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self.arequest(method, path, **kwargs)).json()

    @asynccontextmanager
    async def astream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Params = None,
        timeout: Timeout = DEFAULT,
        idempotent: bool | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Async :meth:`stream`."""
        resp = await self._asend(
            method, path, stream=True, json=json, params=params, timeout=timeout, idempotent=idempotent
        )
        try:
            with self._translate():
                yield resp
        finally:
            await resp.aclose()

    @staticmethod
    async def aiter_ndjson(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        """Async :meth:`iter_ndjson`."""
        async for line in resp.aiter_lines():
            if line.strip():
                yield jsonlib.loads(line)


_default_client: Client | None = None


def get_default_client() -> Client:
    """The client used when no ``client=`` is passed, made from the environment on first use."""
    global _default_client
    if _default_client is None:
        _default_client = Client()
    return _default_client


def set_default_client(client: Client | None) -> None:
    """Replaces the default client (``None``: build a new one from the environment on next use)."""
    global _default_client
    _default_client = client
