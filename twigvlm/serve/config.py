"""`ServeConfig`: what `twigvlm serve` loads, where it listens, its limits and access rules, and the acceleration
settings a request gets when it does not name its own (the CLI flags of `twigvlm serve`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import QUANTIZE_MODES, PruneConfig, SpecConfig
from ..errors import TwigVLMError

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # the largest image a request may send or make the server fetch
FETCH_TIMEOUT_S = 10.0  # for http(s) image URLs


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server.

    model, twig:            a model directory or a named model ("demo"), and a twig directory or name (None: none).
    max_queue:              requests that may wait for the inference thread; one more is answered 503.
    api_key:                when set, every /v1 request must send `Authorization: Bearer <api_key>`.
    allowed_local_media_path: `file://` image URLs are read only below this directory (None: refused).
    allowed_media_domains:  `http(s)` image URLs are fetched only from these hosts (empty: refused).
    prune, speculative:     the acceleration a request gets unless its body says otherwise.
    """

    model: str = "demo"
    twig: str | None = "demo"
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    device: str = "cpu"
    kernels: str | None = None  # the CPU products' layout (`VLM.load`'s kernels: None → auto)
    quantize: str = "none"  # the decoder's weights (`VLM.load`'s quantize): none or int8
    max_queue: int = 32
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    allowed_media_domains: tuple[str, ...] = ()
    max_image_bytes: int = MAX_IMAGE_BYTES
    fetch_timeout_s: float = FETCH_TIMEOUT_S
    max_tokens: int = 256  # max_completion_tokens when a request gives none
    prune: PruneConfig = field(default_factory=PruneConfig)
    speculative: SpecConfig | None = None

    @property
    def model_id(self) -> str:
        """The id clients send as `model` (`/v1/models` lists it): the model argument as given."""
        return str(self.model)

    def validate(self) -> None:
        """One-line errors for settings that cannot work, before the model loads."""
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
        if self.quantize != "none" and not self.device.startswith("cpu"):
            raise TwigVLMError(f"--quantize {self.quantize} runs on a CPU: drop it or use --device cpu")
        self.prune.validate()
        if self.speculative is not None:
            self.speculative.validate()
