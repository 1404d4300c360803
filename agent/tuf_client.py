"""The device side of the signed release: fetch and verify with ``tuf.ngclient``.

:class:`DeviceFetcher` is ngclient's network adapter (a ``FetcherInterface``) over the standard
library's ``urllib`` (the agent has no httpx): every request carries the device's credentials
(a callable given the method and request target returns the headers, so each request can be
signed, see :mod:`protocol.device_auth`); redirects are not followed; an interrupted body
is resumed with an HTTP ``Range`` request; transient failures (connection errors, timeouts,
408/429/5xx) are retried with exponential backoff and jitter, counting only attempts that made
no progress; and it never reads more than the signed length allows (a server that sends more is
cut off with ``DownloadLengthMismatchError``, one byte past the limit at most).

:class:`ReleaseClient` wraps ``tuf.ngclient.Updater``: it refreshes the fleet's metadata from
the root pinned at provisioning (root rotation, expiry, versions, snapshot consistency,
signatures by the roles' current keys — all ngclient's work), then downloads a target into
``<dest>.part`` through the same fetcher, resuming that file across restarts, checks length and
hashes against the verified target metadata and only then renames it to ``dest``. (ngclient's
own ``download_target`` keeps partial data in a temporary file that a power cut loses, and writes
the destination in place.) :meth:`ReleaseClient.trusted_root` hands the verified root to
:func:`protocol.desired.verify_desired`.

This module does not decide what to install (the update state machine does), does not parse a
release's custom metadata (:mod:`protocol.release`) and keeps no state beyond ngclient's metadata
cache and the ``.part`` file.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import random
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import IO, BinaryIO, NoReturn
from urllib.parse import quote

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent.atomic import fsync_dir
from agent.errors import AgentError

logger = logging.getLogger(__name__)

# (method, request target exactly as sent: path with percent-encoding, plus ?query) -> headers;
# called for every request, so it can sign each one (protocol.device_auth.sign_request).
AuthHeaders = Callable[[str, str], Mapping[str, str]]
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class ReleaseError(AgentError):
    """Fetching or verifying a release failed; ``transient`` says whether retrying later can
    help (network trouble) or not (the data failed verification)."""

    transient = False


class ReleaseFetchError(ReleaseError):
    """The fleet could not be reached or kept failing; try again later."""

    transient = True


class ReleaseAuthError(ReleaseError):
    """The fleet refused this device's credentials (HTTP 401/403)."""


class ReleaseVerificationError(ReleaseError):
    """TUF metadata or a target failed verification, or the server sent more than signed."""


@dataclass(frozen=True)
class RetryPolicy:
    """How :class:`DeviceFetcher` retries. ``attempts`` counts consecutive attempts that
    received no byte; an attempt that made progress resets the count."""

    attempts: int = 5
    base_delay: float = 0.5  # seconds before the first retry; doubles each time
    max_delay: float = 30.0
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    timeout: float = 30.0  # socket timeout of one request
    chunk_size: int = 64 * 1024

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.max_delay, self.base_delay * 2 ** max(0, failures - 1))
        return max(0.0, base * (1 + self.jitter * rng.uniform(-1.0, 1.0)))


class _Restart(Exception):
    """The server ignored our Range: drop the partial data and read from the start."""


def _no_redirects(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        # A redirect would send the device's credentials to wherever the server says.
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    return urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


class DeviceFetcher(FetcherInterface):
    """ngclient fetcher with device credentials, Range resume, retries and a length cap."""

    def __init__(
        self,
        auth: AuthHeaders | None = None,
        retry: RetryPolicy | None = None,
        *,
        user_agent: str = "edgefleet-agent",
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context`` verifies an https fleet (the CA pinned at provisioning)."""
        self._auth: AuthHeaders = auth or (lambda method, target: {})
        self.retry = retry or RetryPolicy()
        self._user_agent = user_agent
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._opener = _no_redirects(ssl_context)

    # --- FetcherInterface -----------------------------------------------------------------

    def _fetch(self, url: str) -> Iterator[bytes]:
        with tempfile.TemporaryFile() as f:
            self.download_into(url, f, None)
            f.seek(0)
            yield from iter(lambda: f.read(self.retry.chunk_size), b"")

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        with tempfile.TemporaryFile() as f:
            self.download_into(url, f, max_length)
            f.seek(0)
            yield f

    # --- the download loop ----------------------------------------------------------------

    def download_to(self, url: str, part: Path, max_length: int) -> None:
        """Download ``url`` into the file ``part``, resuming from the bytes it already holds."""
        with open(part, "a+b") as f:
            self.download_into(url, f, max_length)
            f.flush()
            os.fsync(f.fileno())

    def download_into(self, url: str, f: BinaryIO, max_length: int | None) -> None:
        """Append ``url``'s content to ``f`` from ``f``'s current size on (resuming with Range);
        raise ``DownloadLengthMismatchError`` rather than let ``f`` grow past ``max_length``."""
        failures = 0
        high_water = f.seek(0, os.SEEK_END)  # progress means getting past this
        while True:
            offset = f.seek(0, os.SEEK_END)
            if max_length is not None and offset > max_length:
                raise tuf_errors.DownloadLengthMismatchError(
                    f"{url}: {offset} bytes on hand, more than the {max_length} expected"
                )
            if max_length is not None and offset and offset == max_length:
                return  # a resumed file that is complete by length; the hash check decides
            restart = False
            try:
                wait = self._attempt(url, f, offset, max_length)
            except _Restart:
                f.seek(0)
                f.truncate()
                wait, restart = 0.0, True
            if wait is None:
                return
            size = f.seek(0, os.SEEK_END)
            if size > high_water:
                high_water, failures = size, 0
            else:
                failures += 1
            if failures >= self.retry.attempts:
                raise tuf_errors.DownloadError(
                    f"{url}: gave up after {failures} attempts without progress; the fleet "
                    "is unreachable or failing — the device retries on its next update check"
                )
            if restart or (size > offset and not wait):
                continue  # progressed before the connection dropped, or must start over: go on
            delay = min(self.retry.max_delay, max(wait, self.retry.delay(failures, self._rng)))
            logger.info("download of %s stalled at byte %d; retrying in %.2fs", url, size, delay)
            self._sleep(delay)

    def _open(self, url: str, offset: int) -> HTTPResponse:
        request = urllib.request.Request(url, method="GET")
        headers = {"User-Agent": self._user_agent, **self._auth("GET", request.selector)}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        for name, value in headers.items():
            request.add_header(name, value)
        response = self._opener.open(request, timeout=self.retry.timeout)
        assert isinstance(response, HTTPResponse)
        return response

    def _attempt(self, url: str, f: BinaryIO, offset: int, max_length: int | None) -> float | None:
        """One request, appending to ``f``. Returns None when the body is complete, else the
        seconds the server asked us to wait before the next attempt (0.0 for none)."""
        try:
            response = self._open(url, offset)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                raise _Restart from exc  # our partial data is not a prefix of this file
            if exc.code in TRANSIENT_STATUS:
                logger.info("%s: HTTP %d", url, exc.code)
                return _retry_after(exc.headers.get("Retry-After")) or 0.0
            self._http_error(url, exc.code)
        except (OSError, HTTPException) as exc:  # URLError, refused, reset, timeout
            logger.info("%s: %s", url, exc)
            return 0.0
        with response:
            status = response.status
            if status == 200 and offset:
                raise _Restart  # the server ignored Range and sends everything
            if status == 206:
                self._check_content_range(url, response.headers.get("Content-Range"), offset)
            elif status != 200:
                self._http_error(url, status)
            declared = response.headers.get("Content-Length")
            body_length = int(declared) if declared and declared.isdigit() else None
            if (
                max_length is not None
                and body_length is not None
                and offset + body_length > max_length
            ):
                raise tuf_errors.DownloadLengthMismatchError(
                    f"{url}: the server announces {offset + body_length} bytes, more than "
                    f"the {max_length} bytes the signed metadata allow; refusing the download"
                )
            received = 0
            while True:
                want = self.retry.chunk_size
                if max_length is not None:
                    want = min(want, max_length - offset - received + 1)
                try:
                    chunk = response.read(want)
                except (OSError, HTTPException) as exc:
                    logger.info("%s: body interrupted after %d bytes: %s", url, received, exc)
                    return 0.0
                if not chunk:
                    break
                if max_length is not None and offset + received + len(chunk) > max_length:
                    raise tuf_errors.DownloadLengthMismatchError(
                        f"{url}: the server sent more than the {max_length} bytes the signed "
                        "metadata allow; refusing the download"
                    )
                f.write(chunk)
                received += len(chunk)
            if body_length is not None and received < body_length:
                logger.info(
                    "%s: connection closed after %d of %d bytes", url, received, body_length
                )
                return 0.0
            return None

    @staticmethod
    def _check_content_range(url: str, value: str | None, offset: int) -> None:
        # "bytes 100-199/200": the part must start where our data ends.
        try:
            unit, _, rest = (value or "").partition(" ")
            start = int(rest.split("-", 1)[0])
        except ValueError:
            start = -1
            unit = ""
        if unit != "bytes" or start != offset:
            raise tuf_errors.DownloadError(
                f"{url}: asked for bytes from {offset}, the server answered Content-Range "
                f"{value!r}; the server's Range support is broken"
            )

    @staticmethod
    def _http_error(url: str, status: int) -> NoReturn:
        if status in (401, 403):
            message = (
                f"{url}: HTTP {status}: the fleet refused this device's credentials; check the "
                "device's enrollment (`edge-agent enroll`) and clock"
            )
        else:
            message = f"{url}: HTTP {status}"
        raise tuf_errors.DownloadHTTPError(message, status)


# --- the release client ------------------------------------------------------------------------


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Map ngclient's and the fetcher's exceptions onto :class:`ReleaseError`s."""
    try:
        yield
    except tuf_errors.DownloadLengthMismatchError as exc:
        raise ReleaseVerificationError(f"{what}: {exc}") from exc
    except tuf_errors.DownloadHTTPError as exc:
        if exc.status_code in (401, 403):
            raise ReleaseAuthError(f"{what}: {exc}") from exc
        raise ReleaseFetchError(f"{what}: {exc}") from exc  # e.g. 404 while a release lands
    except tuf_errors.DownloadError as exc:
        raise ReleaseFetchError(f"{what}: {exc}") from exc
    except tuf_errors.RepositoryError as exc:
        raise ReleaseVerificationError(
            f"{what}: TUF verification failed ({type(exc).__name__}: {exc}); the fleet's "
            "metadata or files were tampered with, are stale, or the device's clock is wrong"
        ) from exc


class ReleaseClient:
    """Verified access to the fleet's TUF repository from one device.

    ``base_url`` serves the metadata under ``metadata/`` and the targets under ``targets/``;
    ``pinned_root`` is the root.json the device received at provisioning.
    """

    def __init__(
        self,
        metadata_dir: Path,
        pinned_root: bytes,
        base_url: str,
        fetcher: DeviceFetcher,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self._pinned_root = pinned_root
        base = base_url.rstrip("/")
        self.metadata_url = f"{base}/metadata/"
        self.targets_url = f"{base}/targets/"
        self.fetcher = fetcher
        self._updater: Updater | None = None
        self._root: Root | None = None

    def refresh(self) -> None:
        """Fetch and verify the newest metadata (root chain, timestamp, snapshot, targets)."""
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        with _translated("refreshing the fleet's TUF metadata"):
            # ngclient refreshes once per Updater; a new one reloads the cache (cheap).
            updater = Updater(
                metadata_dir=str(self.metadata_dir),
                metadata_base_url=self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=self.fetcher,
                bootstrap=self._pinned_root,
            )
            updater.refresh()
            # ngclient links root.json to the newest root it verified in this refresh.
            root_md = Metadata[Root].from_bytes((self.metadata_dir / "root.json").read_bytes())
        if not isinstance(root_md.signed, Root):
            raise ReleaseVerificationError("ngclient's cached root.json is not root metadata")
        self._updater = updater
        self._root = root_md.signed

    def _refreshed(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def trusted_root(self) -> Root:
        """The root verified by the last :meth:`refresh` (refreshing first if needed): the
        keys that may sign desired documents."""
        self._refreshed()
        assert self._root is not None
        return self._root

    def target_info(self, path: str) -> TargetFile:
        """The verified metadata (length, hashes, custom) of target ``path``."""
        updater = self._refreshed()
        with _translated(f"looking up target {path}"):
            info = updater.get_targetinfo(path)
        if info is None:
            raise ReleaseVerificationError(
                f"{path} is not a target of the fleet's signed metadata; the desired document "
                "names a release that is not published"
            )
        return info

    def target_url(self, info: TargetFile) -> str:
        """Where the consistent-snapshot copy of ``info`` is served (``dir/<sha256>.name``)."""
        dirname, sep, basename = info.path.rpartition("/")
        digest = next(iter(info.hashes.values()))
        return f"{self.targets_url}{quote(f'{dirname}{sep}{digest}.{basename}')}"

    def download_target(self, path: str, dest: Path) -> Path:
        """Download target ``path`` to ``dest`` and return ``dest`` once its length and hashes
        match the verified metadata. Partial data waits in ``<dest>.part`` for the next try."""
        dest = Path(dest)
        info = self.target_info(path)
        with contextlib.suppress(OSError, tuf_errors.LengthOrHashMismatchError):
            with open(dest, "rb") as f:
                info.verify_length_and_hashes(f)
            return dest  # already there and verified
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        try:
            with _translated(f"downloading target {path}"):
                self.fetcher.download_to(self.target_url(info), part, info.length)
                with open(part, "rb") as f:
                    info.verify_length_and_hashes(f)
        except ReleaseVerificationError:
            part.unlink(missing_ok=True)  # never resume from data that failed verification
            raise
        os.replace(part, dest)
        fsync_dir(dest.parent)
        logger.info("downloaded and verified %s (%d bytes)", path, info.length)
        return dest
