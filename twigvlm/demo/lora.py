"""Low-rank adapters on the demo decoder's linear layers: trained with the vision parts, merged at load.

`DecoderLoRA` holds one pair (A: [r, in], B: [out, r]) per adapted `nn.Linear` and adds `scale · B(A x)` to its
output through forward hooks, so the stock HF decoder stays untouched while it trains (B starts at zero: the
adapted model starts as the packaged one). Shipping merges them: `merge_lora` folds `W += scale · B A` into the
weights once, and the loaded model is a plain `LlavaForConditionalGeneration` again, with no hooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import TwigVLMError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECODER_PREFIX = "model.language_model."


def layer_of(name: str) -> int | None:
    """The decoder layer a module path is in (`….layers.12.self_attn.q_proj` → 12), None outside the layers."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


def _targets(model: nn.Module, below: int | None = None) -> Iterator[tuple[str, nn.Linear]]:
    """The adapted linears: q … down of every decoder layer (of the layers below `below` only, when given)."""
    for name, module in model.named_modules():
        if name.startswith(DECODER_PREFIX) and name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, nn.Linear):
            layer = layer_of(name)
            if below is None or (layer is not None and layer < below):
                yield name, module


def _key(name: str) -> str:
    return name.replace(".", "__")


class DecoderLoRA(nn.Module):
    """LoRA pairs for every targeted linear of the decoder (of its layers below `below`, when given: the v2 recipe
    adapts only the layers that still read the picture); `attach` hooks them on, `detach` takes them off."""

    def __init__(self, model: nn.Module, rank: int, alpha: float | None = None, below: int | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise TwigVLMError(f"LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha, self.below = rank, float(alpha if alpha is not None else 2 * rank), below
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for name, lin in _targets(model, below):
            a = torch.empty(rank, lin.in_features, device=lin.weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A[_key(name)] = nn.Parameter(a)
            self.B[_key(name)] = nn.Parameter(torch.zeros(lin.out_features, rank, device=lin.weight.device))
        if not self.A:
            raise TwigVLMError("no decoder linear layers to adapt (expected q_proj … down_proj)")
        self._handles: list = []

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def attach(self, model: nn.Module) -> DecoderLoRA:
        self.detach()
        for name, lin in _targets(model, self.below):
            a, b = self.A[_key(name)], self.B[_key(name)]

            def hook(_m: nn.Module, args: tuple, out: torch.Tensor, a=a, b=b) -> torch.Tensor:  # noqa: ANN001
                x = args[0]  # [..., in]
                return out + (x.to(a.dtype) @ a.t() @ b.t()).to(out.dtype) * self.scale  # [..., out]

            self._handles.append(lin.register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """Shippable tensors: `<module path>.lora_A` / `.lora_B`."""
        out = {}
        for key in self.A:
            name = key.replace("__", ".")
            out[name + ".lora_A"] = self.A[key].detach().to("cpu", dtype).contiguous()
            out[name + ".lora_B"] = self.B[key].detach().to("cpu", dtype).contiguous()
        return out

    def load_shipped(self, state: dict[str, torch.Tensor]) -> None:
        """Take the values of a shipped state (`state()`'s names) as this LoRA's, e.g. to continue training it."""
        with torch.no_grad():
            for full, tensor in state.items():
                name, kind = full.rsplit(".", 1)
                pairs = self.A if kind == "lora_A" else self.B
                if _key(name) not in pairs:
                    raise TwigVLMError(f"the LoRA weights name {name}, which this LoRA does not adapt")
                pairs[_key(name)].copy_(tensor)


def merge_lora(model: nn.Module, state: dict[str, torch.Tensor], scale: float) -> int:
    """Fold `W += scale · B A` into each adapted linear of `model`; returns how many were merged."""
    modules = dict(_targets(model))
    names = {k.rsplit(".", 1)[0] for k in state}
    unknown = sorted(names - set(modules))
    if unknown:
        raise TwigVLMError(
            f"the demo LoRA weights name {unknown[0]}, which the decoder lacks: rebuild them with "
            "`python -m twigvlm.demo.train_vision`"
        )
    with torch.no_grad():
        for name in names:
            w = modules[name].weight  # [out, in]
            a, b = state[name + ".lora_A"].float(), state[name + ".lora_B"].float()  # [r, in], [out, r]
            w.add_((b @ a * scale).to(w.device, w.dtype))
    return len(names)
