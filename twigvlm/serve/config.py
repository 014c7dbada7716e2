"""`ServeConfig`: what `twigvlm serve` loads, where it listens, its limits and access rules, and the acceleration
settings a request gets when it does not name its own (the CLI flags of `twigvlm serve`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import COMPILE_MODES, QUANTIZE_MODES, PruneConfig, SpecConfig
from ..errors import TwigVLMError

MB = 2**20
MAX_IMAGE_BYTES = 20 * MB  # the largest image a request may send or make the server fetch
FETCH_TIMEOUT_S = 10.0  # the whole fetch of one http(s) image URL
MAX_BODY_BYTES = 64 * MB  # a request body, counted while it is read (chunked or not)
MAX_IMAGES = 16  # pictures per request
MEGAPIXEL = 1_000_000
MAX_IMAGE_PIXELS = 16 * MEGAPIXEL  # one picture (4000 x 4000), from its header, before decoding
MAX_REQUEST_PIXELS = 32 * MEGAPIXEL  # all pictures of one request
MAX_BUFFERED_BYTES = 512 * MB  # bodies being read and decoded pictures, all requests together
PIXEL_BYTES = 4  # what a decoded picture is counted as holding per pixel (RGB, plus the decoder's own buffer)
REQUEST_TIMEOUT_S = 300.0  # arrival to the end of the answer
SHUTDOWN_GRACE_S = 30.0  # after SIGTERM, how long running requests may go on


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server.

    model, twig:            a model directory or a named model ("demo"), and a twig directory or name (None: none).
    max_queue:              requests that may wait for the inference thread beyond the batch's free places; one
                            more is answered 503.
    api_key:                when set, every /v1 request must send `Authorization: Bearer <api_key>`.
    allowed_local_media_path: `file://` image URLs are read only below this directory (None: refused).
    allowed_media_domains:  `http(s)` image URLs are fetched only from these hosts (empty: refused).
    allowed_origins:        browser origins (scheme://host[:port]) that may call /v1 cross-origin (CORS); with
                            no API key, any other cross-origin request is refused.
    prune, speculative:     the acceleration a request gets unless its body says otherwise.
    The limits (docs/serve.md, "Limits") bound what one request, and all of them together, can make the server
    do and hold.
    """

    model: str = "demo"
    twig: str | None = "demo"
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    device: str = "cpu"
    kernels: str | None = None  # the CPU products' layout (`VLM.load`'s kernels: None → auto)
    quantize: str = "none"  # the decoder's weights (`VLM.load`'s quantize): none or int8
    compile: str | None = None  # compiled decode steps (`VLM.load`'s compile: None → auto)
    max_queue: int = 32
    max_batch: int = 16  # requests sharing each decode step (1: one at a time)
    max_step_tokens: int = 256  # a batched step's token budget: drafts are cut to keep a verification within it
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    allowed_media_domains: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_image_bytes: int = MAX_IMAGE_BYTES
    fetch_timeout_s: float = FETCH_TIMEOUT_S
    max_body_bytes: int = MAX_BODY_BYTES
    max_images: int = MAX_IMAGES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_request_pixels: int = MAX_REQUEST_PIXELS
    max_buffered_bytes: int = MAX_BUFFERED_BYTES
    request_timeout_s: float = REQUEST_TIMEOUT_S
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    max_tokens: int = 256  # max_completion_tokens when a request gives none (capped by what the context leaves)
    prune: PruneConfig = field(default_factory=PruneConfig)
    speculative: SpecConfig | None = None

    @property
    def model_id(self) -> str:
        """The id clients send as `model` (`/v1/models` lists it): the model argument as given."""
        return str(self.model)

    def validate(self) -> None:
        """One-line errors for settings that cannot work, before the model loads."""
        if self.max_batch < 1:
            raise TwigVLMError(f"--max-batch {self.max_batch} is invalid: allow at least one request per step")
        if self.max_step_tokens < 1:
            raise TwigVLMError(f"--max-step-tokens {self.max_step_tokens} is invalid: allow at least one token a step")
        if self.max_queue < 1:
            raise TwigVLMError(f"--max-queue {self.max_queue} is invalid: allow at least one waiting request")
        if not 0 <= self.port < 65536:
            raise TwigVLMError(f"--port {self.port} is invalid: use 0..65535")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise TwigVLMError(
                f"--allowed-local-media-path {self.allowed_local_media_path} is not a directory: name an existing one"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise TwigVLMError("--api-key is empty: give a key, or leave the flag out to serve without one")
        if self.quantize not in QUANTIZE_MODES:
            raise TwigVLMError(f"--quantize {self.quantize} is unknown: use one of {', '.join(QUANTIZE_MODES)}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise TwigVLMError(f"--compile {self.compile} is unknown: use one of {', '.join(COMPILE_MODES)}")
        if self.quantize != "none" and not self.device.startswith("cpu"):
            raise TwigVLMError(f"--quantize {self.quantize} runs on a CPU: drop it or use --device cpu")
        for flag, value in (
            ("--fetch-timeout", self.fetch_timeout_s),
            ("--request-timeout", self.request_timeout_s),
            ("--max-body-mb", self.max_body_bytes),
            ("--max-images", self.max_images),
            ("--max-image-megapixels", self.max_image_pixels),
            ("--max-request-megapixels", self.max_request_pixels),
        ):
            if not value > 0:
                raise TwigVLMError(f"{flag} {value} is invalid: it must be positive")
        if self.shutdown_grace_s < 0:
            raise TwigVLMError(f"--shutdown-grace {self.shutdown_grace_s} is invalid: use 0 or more seconds")
        one_request = max(self.max_body_bytes * 2, self.max_request_pixels * PIXEL_BYTES)
        if self.max_buffered_bytes < one_request:
            raise TwigVLMError(
                f"--max-buffered-mb {self.max_buffered_bytes // MB} cannot hold one request: it needs at least "
                f"{-(-one_request // MB)} (twice --max-body-mb, and {PIXEL_BYTES} bytes per pixel of "
                "--max-request-megapixels)"
            )
        bad_origin = [o for o in self.allowed_origins if not o.startswith(("http://", "https://")) or o.endswith("/")]
        if bad_origin:
            raise TwigVLMError(
                f"--allowed-origins {bad_origin[0]} is not an origin: write scheme://host[:port], no path"
            )
        self.prune.validate()
        if self.speculative is not None:
            self.speculative.validate()
