"""Reading the images of a request: `image_url`s → RGB PIL images, under the server's access rules.

- `data:` URLs (base64) are always accepted;
- `file://` URLs only below `--allowed-local-media-path` (after resolving links and `..`);
- `http(s)://` URLs only from a host in `--allowed-media-domains`; redirects are refused (a redirect could lead
  anywhere), the body is capped at `max_image_bytes` and the fetch times out after `fetch_timeout_s`.
Every refusal and every unreadable image is an `APIError` 400 naming the message part it is about.
This runs in a worker thread of the event loop's pool, never on the loop itself.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from ..errors import TwigVLMError
from ..inputs.images import load_image
from .errors import bad_request


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None
    allowed_domains: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


def load_image_url(url: str, policy: MediaPolicy, param: str) -> Image.Image:
    """The RGB image an `image_url` names; `param` (e.g. "messages[0].content[1].image_url") goes in errors."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param} must be a non-empty URL string", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url_bytes(url, policy, param)
    elif scheme == "file":
        data = _file_bytes(url, policy, param)
    elif scheme in ("http", "https"):
        data = _http_bytes(url, policy, param)
    else:
        raise bad_request(
            f"{param} has an unsupported scheme {scheme or '(none)'!r}: use data:, file:// or http(s)://", param
        )
    return decode_image(data, param)


def decode_image(data: bytes, param: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError:
        raise bad_request(f"{param} is too large to decode safely: send a smaller image", param) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise bad_request(f"{param} is not a readable image ({type(e).__name__}): send a PNG or JPEG", param) from None
    try:
        return load_image(img)
    except TwigVLMError as e:
        raise bad_request(f"{param}: {e}", param) from None


def _data_url_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(f"{param} is a data: URL without ';base64,': send data:image/png;base64,<data>", param)
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise bad_request(f"{param} is over the {policy.max_bytes}-byte image limit", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64: encode the image bytes with standard base64", param) from None


def _file_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.allowed_local_path is None:
        raise bad_request(
            f"{param}: file:// URLs are refused: the server reads local files only when started with "
            "--allowed-local-media-path DIR",
            param,
        )
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(
            f"{param}: a file:// URL must name a local path (file:///path), not host {parsed.netloc}", param
        )
    root = policy.allowed_local_path.resolve()
    path = Path(unquote(parsed.path)).resolve()
    if not path.is_relative_to(root):
        raise bad_request(
            f"{param}: {path} is outside the directory the server may read (--allowed-local-media-path)", param
        )
    if not path.is_file():
        raise bad_request(f"{param}: {path} is not a file", param)
    if path.stat().st_size > policy.max_bytes:
        raise bad_request(f"{param}: {path} is over the {policy.max_bytes}-byte image limit", param)
    return path.read_bytes()


def _http_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    host = (urlparse(url).hostname or "").lower()
    if host not in {d.lower() for d in policy.allowed_domains}:
        allowed = ", ".join(policy.allowed_domains) or "none (start the server with --allowed-media-domains)"
        raise bad_request(f"{param}: host {host or '(none)'} is not an allowed media domain; allowed: {allowed}", param)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=policy.timeout_s) as response:
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise bad_request(f"{param}: fetching {url} failed: HTTP {e.code} {e.reason}", param) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise bad_request(f"{param}: fetching {url} failed ({reason})", param) from None
    if len(data) > policy.max_bytes:
        raise bad_request(f"{param}: {url} is over the {policy.max_bytes}-byte image limit", param)
    return data
