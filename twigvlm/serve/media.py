"""Reading the images of a request: `image_url`s → RGB PIL images, under the server's access rules.

- `data:` URLs (base64) are always accepted;
- `file://` URLs only below `--allowed-local-media-path` (after resolving links and `..`);
- `http(s)://` URLs only from a host in `--allowed-media-domains`; redirects are refused (a redirect could lead
  anywhere), the body is capped at `max_image_bytes` and the whole fetch must end within `fetch_timeout_s` (a
  server that drips bytes is cut off at that deadline, not after each slow read).
A picture's size is read from its header before it is decoded: one over `max_pixels` is refused without
decoding, and `admit(pixels)` (the request's own limits and the server's memory budget) may refuse it too.
Every refusal and every unreadable image — whatever the decoder raises on hostile bytes — is an `APIError` 400
naming the message part it is about. This runs in a worker thread of the event loop's pool, never on the loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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
    timeout_s: float = 10.0  # the whole fetch of one http(s) picture
    max_pixels: int = 4096 * 4096  # one picture, from its header, before decoding


READ_CHUNK = 64 * 1024


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


def load_image_url(
    url: str, policy: MediaPolicy, param: str, admit: Callable[[int], None] | None = None
) -> Image.Image:
    """The RGB image an `image_url` names; `param` (e.g. "messages[0].content[1].image_url") goes in errors.
    admit(pixels) runs after the header is read and before decoding; it raises to refuse the picture."""
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
    return decode_image(data, param, policy.max_pixels, admit)


def decode_image(
    data: bytes, param: str, max_pixels: int | None = None, admit: Callable[[int], None] | None = None
) -> Image.Image:
    """Bytes → an RGB image. The size comes from the header first: over `max_pixels` is a 400 before any pixel is
    decoded; then `admit(width · height)` may refuse it. Any error the decoder raises on these bytes is a 400."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError:
        raise bad_request(f"{param} is too large to decode safely: send a smaller image", param) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise bad_request(f"{param} is not a readable image ({type(e).__name__}): send a PNG or JPEG", param) from None
    except Exception as e:  # noqa: BLE001 (hostile bytes make decoders raise anything: all of it is a bad picture)
        raise bad_request(f"{param} is not a readable image ({type(e).__name__}): send a PNG or JPEG", param) from None
    if max_pixels is not None and w * h > max_pixels:
        raise bad_request(
            f"{param} is {w}x{h} = {w * h} pixels, over the server's {max_pixels} per picture "
            "(--max-image-megapixels): send a smaller image",
            param,
        )
    if admit is not None:
        admit(w * h)
    try:
        img.load()
        return load_image(img)
    except TwigVLMError as e:
        raise bad_request(f"{param}: {e}", param) from None
    except MemoryError:
        raise bad_request(f"{param} is too large to decode here: send a smaller image", param) from None
    except Exception as e:  # noqa: BLE001 (as above: a truncated or malformed body fails inside the decoder)
        raise bad_request(f"{param} is not a readable image ({type(e).__name__}): send a PNG or JPEG", param) from None


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
    try:
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
        with path.open("rb") as f:
            return f.read(policy.max_bytes + 1)[: policy.max_bytes]
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, an over-long name, a link loop, a race
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise bad_request(f"{param}: the file:// URL cannot be read ({reason})", param) from None


def _http_bytes(url: str, policy: MediaPolicy, param: str) -> bytes:
    try:
        host = (urlparse(url).hostname or "").lower()
    except ValueError:  # a malformed netloc (an unclosed IPv6 bracket, …)
        host = ""
    if not host.isprintable():
        raise bad_request(f"{param}: the URL's host has control characters", param)
    if host not in {d.lower() for d in policy.allowed_domains}:
        allowed = ", ".join(policy.allowed_domains) or "none (start the server with --allowed-media-domains)"
        raise bad_request(f"{param}: host {host or '(none)'} is not an allowed media domain; allowed: {allowed}", param)
    opener = urllib.request.build_opener(_NoRedirect)
    deadline = time.monotonic() + policy.timeout_s
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=policy.timeout_s) as response:
            data = _read_until(response, policy.max_bytes + 1, deadline)
    except urllib.error.HTTPError as e:
        raise bad_request(f"{param}: fetching {url} failed: HTTP {e.code} {e.reason}", param) from None
    except TimeoutError:
        late = f"{param}: fetching {url} took over {policy.timeout_s:g} s (the fetch deadline)"
        raise bad_request(late, param) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise bad_request(f"{param}: fetching {url} failed ({reason})", param) from None
    if len(data) > policy.max_bytes:
        raise bad_request(f"{param}: {url} is over the {policy.max_bytes}-byte image limit", param)
    return data


def _read_until(response, limit: int, deadline: float) -> bytes:  # noqa: ANN001 (an http.client response)
    """Up to `limit` bytes of the response, raising TimeoutError once `deadline` (monotonic) has passed: each
    read waits at most for what is left of it."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock = getattr(getattr(response, "fp", None), "raw", None)
        sock = getattr(sock, "_sock", None)
        if sock is not None:
            sock.settimeout(left)
        part = response.read1(min(READ_CHUNK, limit - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    if time.monotonic() > deadline:
        raise TimeoutError
    return b"".join(parts)
