"""Direct-URL downloads (the tinyllamas checkpoints and their tokenizer): plain HTTP with a progress bar.

Each file is written to `<name>.part` beside its destination and renamed when complete; an interrupted
transfer keeps the `.part` file and the next attempt asks the server for the rest (a Range request),
starting over if the server ignores it. The size is checked against the server's, and the sha256
against the hub's when a Hugging Face URL gives one (its `X-Linked-Etag` header, also on redirects).

URLs on huggingface.co go to HF_ENDPOINT instead when it is set, like huggingface_hub's own downloads."""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from torchchat.errors import DownloadError

HF_HOST = "https://huggingface.co/"
# Read size: the progress bar moves once per chunk, so it must stay small for a slow link (64 KiB is
# about a second at 0.5 Mbit/s).
_CHUNK = 64 << 10
_SHA256_RE = re.compile(r'^(?:W/)?"?([0-9a-f]{64})"?$')
_TIMEOUT_S = 60


def resolve_url(url: str) -> str:
    """huggingface.co URLs -> the HF_ENDPOINT mirror, if one is configured."""
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT.rstrip("/")
    if url.startswith(HF_HOST) and endpoint + "/" != HF_HOST:
        return endpoint + "/" + url[len(HF_HOST) :]
    return url


class _RecordingRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does, remembering the hub's checksum header from each hop
    (huggingface.co answers a file request with a redirect that carries X-Linked-Etag)."""

    def __init__(self):
        super().__init__()
        self.sha256: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.sha256 = _sha256_header(headers) or self.sha256
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _sha256_header(headers) -> str | None:
    value = headers.get("X-Linked-Etag")
    m = _SHA256_RE.match(value.strip()) if value else None
    return m.group(1) if m else None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class _Restart(Exception):
    """The server's answer to a resume does not continue the partial file: start over from byte 0."""


def _expected_total(response, have: int, url: str) -> tuple[int, int | None]:
    """(offset the body starts at, total file size or None) from the status, Content-Range and
    Content-Length, refusing answers that do not add up. A 206 must start exactly at `have`: a mirror
    that resends the file from byte 0 under a 206 would otherwise be appended to what we have."""
    length = response.headers.get("Content-Length")
    try:
        length = int(length) if length is not None else None
    except ValueError:
        raise DownloadError(f"{url}: the server sent a malformed Content-Length {length!r}; try again later") from None
    if response.status != 206:
        if response.status != 200:
            raise DownloadError(f"{url}: unexpected HTTP {response.status} for a file download")
        return 0, length  # a whole file: any partial one is overwritten, never appended to
    m = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range") or "")
    if m is None:
        raise _Restart("a partial answer (206) without a valid Content-Range")
    first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
    total = int(total) if total != "*" else None
    if first != have or last < first or (total is not None and last >= total):
        raise _Restart(f"the server resumed at byte {first}, not {have}")
    if length is not None and length != last - first + 1:
        raise DownloadError(f"{url}: Content-Length {length} and Content-Range {first}-{last} disagree; try again later")
    return first, total if total is not None else last + 1


def fetch_url(url: str, dest: Path) -> None:
    """Download `url` to `dest` (resuming `dest.part` if present). Raises DownloadError on any failure,
    keeping what was received for the next attempt unless it is known to be wrong."""
    try:
        _fetch_once(url, dest)
    except _Restart:
        # What we hold cannot be continued from this server's answer: fetch the whole file instead.
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)
        try:
            _fetch_once(url, dest)
        except _Restart as e:
            raise DownloadError(f"{url}: the server's answer does not fit the request ({e}); try again later") from None


def _fetch_once(url: str, dest: Path) -> None:
    from tqdm.auto import tqdm

    url = resolve_url(url)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "torchchat"}
    if have:
        headers["Range"] = f"bytes={have}-"
    redirects = _RecordingRedirects()
    opener = urllib.request.build_opener(redirects)
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at or past the end: the .part is not a prefix we can trust
            part.unlink()
            raise DownloadError(f"{url}: the partial download did not match the server's file and was deleted; run download again") from e
        hint = " (the file needs a login: set HF_TOKEN or check the URL)" if e.code in (401, 403) else ""
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot reach {urlsplit(url).netloc} for {url} ({reason}); check the network connection") from e
    with response:
        start, total = _expected_total(response, have, url)
        resumed = start > 0
        sha256 = _sha256_header(response.headers) or redirects.sha256
        received = start
        try:
            with part.open("ab" if resumed else "wb") as out, tqdm(
                total=total, initial=received, unit="B", unit_scale=True, desc=dest.name, disable=None
            ) as bar:
                while chunk := response.read(_CHUNK):
                    if total is not None and received + len(chunk) > total:
                        raise DownloadError(f"{url}: the server sent more than the {total} bytes it announced; try again later")
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(
                f"{dest.name}: download interrupted after {received} bytes ({e}); the partial file is kept, run "
                "download again to resume"
            ) from e
    if total is not None and received != total:
        raise DownloadError(
            f"{dest.name}: download interrupted after {received} of {total} bytes; the partial file is kept, run "
            "download again to resume"
        )
    if sha256 is not None and _file_sha256(part) != sha256:
        part.unlink()
        raise DownloadError(f"{dest.name}: corrupted download (sha256 differs from the hub's); it was deleted, run download again")
    os.replace(part, dest)
