"""The images of Label Studio tasks, fetched as Label Studio gives them, and only from where it is allowed.

A task's image field holds one of:

- ``/data/local-files/?d=relative/path`` (Local Storage): read under ``document_root`` when one is set (the
  folder Label Studio serves as ``LOCAL_FILES_DOCUMENT_ROOT``), the resolved path checked to stay inside it;
  otherwise fetched from Label Studio;
- ``/data/upload/...``, ``/storage-data/uploaded/?filepath=...`` or any other path on Label Studio: fetched from
  ``label_studio_url`` with the API key: a legacy token as ``Authorization: Token KEY``; a personal access token
  (a JWT refresh token, Label Studio 1.23's default) exchanged at ``/api/token/refresh/`` for short-lived access
  tokens sent as ``Bearer``;
- ``s3://``, ``gs://``, ``azure-blob://`` (cloud storage): fetched through Label Studio's presign endpoint of the task,
  which redirects to the storage (followed without the key);
- an ``http(s)`` URL: from Label Studio's own origin (with the key), or from a host on ``allowed_hosts`` (without).

Anything else is refused, as is a redirect that leaves for a host not allowed (Label Studio's own redirects are
followed). Downloads stop at ``max_bytes``.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")


class ImageAccessError(ValueError):
    """An image this backend may not or cannot read (the message names the URL and why)."""


@dataclass
class ImageSource:
    """Where task images may come from; ``fetch`` returns an image's bytes."""

    label_studio_url: str | None = None
    api_key: str | None = None
    document_root: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 64 << 20
    timeout: float = 30.0
    _origin: tuple[str, str] | None = field(init=False, default=None)
    _access: tuple[str, float] | None = field(init=False, default=None)  # access token and its expiry (epoch s)
    _access_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.label_studio_url:
            parts = urlsplit(self.label_studio_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"LABEL_STUDIO_URL must be an http(s) address such as http://127.0.0.1:8080, "
                                 f"got {self.label_studio_url!r}")
            self.label_studio_url = self.label_studio_url.rstrip("/")
            self._origin = (parts.scheme, parts.netloc.lower())
        if self.document_root is not None:
            self.document_root = Path(self.document_root).expanduser().resolve()
            if not self.document_root.is_dir() or self.document_root == Path(self.document_root.anchor):
                raise ValueError(f"document root {self.document_root} must be an existing folder, not the file "
                                 "system's root")

    def fetch(self, reference: str, task_id: int | None = None) -> bytes:
        """The bytes of a task's image reference (see the module's docstring)."""
        if not isinstance(reference, str) or not reference:
            raise ImageAccessError(f"the task's image must be a URL or path string, got {reference!r}")
        if reference.startswith(CLOUD_SCHEMES):
            if task_id is None:
                raise ImageAccessError(f"{reference}: a cloud storage image needs the task's id")
            fileuri = base64.urlsafe_b64encode(reference.encode()).decode()
            return self._from_label_studio(f"/tasks/{task_id}/presign/?fileuri={fileuri}", reference)
        parts = urlsplit(reference)
        if parts.scheme in ("http", "https"):
            if (parts.scheme, parts.netloc.lower()) == self._origin:
                return self._from_label_studio(reference[len(self.label_studio_url):] or "/", reference)
            if (parts.hostname or "") in self.allowed_hosts:
                return self._download(reference, from_label_studio=False)
            raise ImageAccessError(f"{reference}: host {parts.hostname!r} is neither Label Studio's "
                                   f"({self.label_studio_url or 'LABEL_STUDIO_URL is not set'}) nor allowed "
                                   "(--allow-host)")
        if parts.scheme or not reference.startswith("/"):
            raise ImageAccessError(f"{reference}: not an image reference this backend reads (Label Studio paths, "
                                   "http(s) URLs, s3/gs/azure-blob)")
        if parts.path.rstrip("/") == "/data/local-files" and self.document_root is not None:
            return self._local_file(reference, parts.query)
        return self._from_label_studio(reference, reference)

    def _local_file(self, reference: str, query: str) -> bytes:
        given = parse_qs(query, keep_blank_values=True).get("d", [""])[-1]
        if not given:
            raise ImageAccessError(f"{reference}: a local-files URL needs ?d=relative/path")
        path = (self.document_root / posixpath.normpath(given).lstrip("/")).resolve()
        if not path.is_relative_to(self.document_root):
            raise ImageAccessError(f"{reference}: {path} is outside the document root {self.document_root}")
        if not path.is_file():
            raise ImageAccessError(f"{reference}: no file {path} (document root {self.document_root})")
        if path.stat().st_size > self.max_bytes:
            raise ImageAccessError(f"{reference}: {path} is larger than {self.max_bytes >> 20} MB")
        return path.read_bytes()

    def _from_label_studio(self, path: str, reference: str) -> bytes:
        if not self.label_studio_url:
            raise ImageAccessError(f"{reference}: Label Studio serves this image; start the backend with "
                                   "LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) set")
        if not self.api_key:
            raise ImageAccessError(f"{reference}: Label Studio needs an API key for this image; set "
                                   "LABEL_STUDIO_API_KEY (Account & Settings -> access token)")
        return self._download(self.label_studio_url + "/" + path.lstrip("/"), from_label_studio=True)

    def _authorization(self) -> str:
        """The Authorization header for Label Studio (see the module's docstring)."""
        claims = _jwt_claims(self.api_key)
        if claims is None:
            return f"Token {self.api_key}"
        if claims.get("token_type") != "refresh":
            return f"Bearer {self.api_key}"
        with self._access_lock:
            if self._access is None or self._access[1] - time.time() < 30:
                self._access = self._refresh_access()
            return f"Bearer {self._access[0]}"

    def _refresh_access(self) -> tuple[str, float]:
        """A personal access token exchanged for an access token: (token, expiry)."""
        request = urllib.request.Request(f"{self.label_studio_url}/api/token/refresh/", method="POST",
                                         data=json.dumps({"refresh": self.api_key}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                access = json.loads(response.read(1 << 16))["access"]
        except urllib.error.HTTPError as exc:
            raise ImageAccessError(f"Label Studio refused the personal access token in LABEL_STUDIO_API_KEY "
                                   f"(HTTP {exc.code} at /api/token/refresh/)") from None
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
            raise ImageAccessError(f"cannot exchange LABEL_STUDIO_API_KEY for an access token at "
                                   f"{self.label_studio_url}/api/token/refresh/ ({exc})") from None
        claims = _jwt_claims(access) or {}
        return access, float(claims.get("exp", time.time() + 60))

    def _download(self, url: str, from_label_studio: bool) -> bytes:
        """GET ``url`` following redirects by hand: the key only to Label Studio; other hosts only if allowed
        or when Label Studio itself redirects (cloud storage)."""
        for _ in range(5):
            parts = urlsplit(url)
            to_label_studio = (parts.scheme, parts.netloc.lower()) == self._origin
            headers = {"Authorization": self._authorization()} if to_label_studio and self.api_key else {}
            request = urllib.request.Request(url, headers=headers)
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    data = response.read(self.max_bytes + 1)
            except urllib.error.HTTPError as exc:
                if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                    target = urljoin(url, exc.headers["Location"])
                    target_parts = urlsplit(target)
                    if target_parts.scheme not in ("http", "https"):
                        raise ImageAccessError(f"{url}: redirected to {target}, not http(s)") from None
                    same = (target_parts.scheme, target_parts.netloc.lower()) == self._origin
                    if not (same or from_label_studio or (target_parts.hostname or "") in self.allowed_hosts):
                        raise ImageAccessError(f"{url}: redirected to host {target_parts.hostname!r}, which is not "
                                               "allowed (--allow-host)") from None
                    url = target
                    continue
                reason = " (check LABEL_STUDIO_API_KEY)" if exc.code in (401, 403) and to_label_studio else ""
                raise ImageAccessError(f"{url}: HTTP {exc.code} {exc.reason}{reason}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise ImageAccessError(f"{url}: cannot download ({getattr(exc, 'reason', exc)})") from None
            if len(data) > self.max_bytes:
                raise ImageAccessError(f"{url}: larger than {self.max_bytes >> 20} MB")
            return data
        raise ImageAccessError(f"{url}: too many redirects")


def _jwt_claims(token: str) -> dict | None:
    """The (unverified) claims of a JWT, or None if ``token`` is not one: only to tell its type and expiry."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].startswith("ey"):
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects come back as HTTPError, so ``_download`` checks each target before following it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)
