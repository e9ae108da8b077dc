"""Merge PEFT LoRA adapters into their base weights, without PEFT installed.

For a targeted linear layer PEFT stores `<module>.base_layer.weight` `(out, in)`,
`<module>.lora_A.<adapter>.weight` `(r, in)` and `<module>.lora_B.<adapter>.weight` `(out, r)`
(plus `lora_B.<adapter>.bias` `(out,)` with `lora_bias=True`). The merged layer is

    weight = base + scale * B @ A        bias = base_bias + scale * B_bias
    scale  = lora_alpha / r              (lora_alpha / sqrt(r) with use_rslora)

with `r` and `lora_alpha` taken from `rank_pattern`/`alpha_pattern` when a pattern matches the
module name. An embedding layer stores `lora_embedding_A.<adapter>` `(r, num_embeddings)` and
`lora_embedding_B.<adapter>` `(dim, r)` and adds `scale * (B @ A).T`.

The sum is computed in float32 and rounded to the base dtype once. On CPU, PEFT's
`merge_and_unload` rounds the bf16 delta before adding it in bf16, so its result can differ from
this one in the last bit of some elements.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from speechlm_bridge.checkpoints.lazy import TensorRef, is_lazy
from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

# LoraConfig options that make a plain `base + scale * B @ A` merge wrong.
_UNMERGEABLE_OPTIONS = {
    "use_dora": "DoRA rescales each output row by a learned magnitude vector",
    "use_alora": "aLoRA applies the adapter only after its invocation tokens",
    "layer_replication": "layer replication changes which layers exist",
    "target_parameters": "adapters on bare nn.Parameters use a different layout",
}


@dataclass(frozen=True)
class LoraSettings:
    """The scaling options of a PEFT `LoraConfig` (NeMo's `model.lora` dict)."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> LoraSettings:
        """Validate a LoRA config dict and keep what the merge needs.

        `r` and `lora_alpha` are required: PEFT's defaults for them changed between versions and
        NeMo's vLLM plugin assumes others (r 128, alpha 256), so guessing would scale silently wrong.
        """
        if config is None:
            raise CheckpointError(
                "The checkpoint has LoRA adapter weights but no LoRA config was given. Pass the "
                "`model.lora` section of the experiment config (it needs `r` and `lora_alpha`)."
            )
        for option, reason in _UNMERGEABLE_OPTIONS.items():
            if config.get(option):
                raise CheckpointError(
                    f"The LoRA config sets `{option}: {config[option]!r}`, which cannot be merged "
                    f"into the base weights ({reason}). Export a checkpoint trained without it."
                )
        missing = [key for key in ("r", "lora_alpha") if config.get(key) is None]
        if missing:
            raise CheckpointError(
                f"The LoRA config lacks {' and '.join(missing)} (keys present: "
                f"{', '.join(sorted(config)) or 'none'}). Add the values used in training, because the "
                "merge scale is lora_alpha / r."
            )
        r, alpha = config["r"], config["lora_alpha"]
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise CheckpointError(f"LoRA `r` must be a positive integer, got {r!r}.")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool):
            raise CheckpointError(f"LoRA `lora_alpha` must be a number, got {alpha!r}.")
        return cls(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
        )

    def rank_for(self, module: str) -> int:
        """Return the configured rank of `module` (a `rank_pattern` match, else `r`)."""
        key = _matching_pattern(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def scale_for(self, module: str) -> float:
        """Return the merge scale of `module`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        key = _matching_pattern(self.alpha_pattern, module)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.lora_alpha
        rank = self.rank_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@dataclass
class LoraAdapter:
    """The adapter tensors of one module, collected from the state dict by their PEFT names.

    `module` is the adapted module's name in the causal LM (`model.layers.0.self_attn.q_proj`).
    """

    module: str
    adapter: str
    embedding: bool = False
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    lora_b_bias: torch.Tensor | None = None
    source_keys: list[str] = field(default_factory=list)


def merge_lora(
    weights: dict[str, torch.Tensor],
    adapters: Iterable[LoraAdapter],
    settings: LoraSettings,
) -> list[str]:
    """Merge each adapter into `weights[<module>.weight]` (and `.bias`) in place.

    Returns the merged module names, sorted. When any input is a lazy `TensorRef`, the merged
    weight is a `LoraMergedTensor` computed when it is loaded.

    Raises:
        CheckpointError: an adapter lacks A or B or its base weight, or the shapes or rank do not
            match the config.
    """
    merged = []
    for adapter in adapters:
        _check_complete(adapter, weights)
        base_key = f"{adapter.module}.weight"
        base = weights[base_key]
        a, b = adapter.lora_a, adapter.lora_b
        _check_shapes(adapter, base, settings)

        scale = settings.scale_for(adapter.module)
        weights[base_key] = _merged(base, b, a, scale=scale, transpose=adapter.embedding)
        if adapter.lora_b_bias is not None:
            bias_key = f"{adapter.module}.bias"
            weights[bias_key] = _merged(weights[bias_key], adapter.lora_b_bias, None, scale=scale, transpose=False)

        logger.debug("Merged LoRA adapter %r into %s with scale %g", adapter.adapter, adapter.module, scale)
        merged.append(adapter.module)
    return sorted(merged)


class LoraMergedTensor(TensorRef):
    """`base + scale * (B @ A)` (or `base + scale * B` for a bias), computed in float32 when loaded."""

    def __init__(
        self, base: TensorRef | torch.Tensor, lora_b: TensorRef | torch.Tensor, lora_a: TensorRef | torch.Tensor | None,
        *, scale: float, transpose: bool,
    ) -> None:
        self.base, self.lora_b, self.lora_a = base, lora_b, lora_a
        self.scale = scale
        self.transpose = transpose
        self.shape = tuple(base.shape)
        self.dtype = base.dtype

    def load(self, cache: dict | None = None) -> torch.Tensor:
        def value(part: TensorRef | torch.Tensor) -> torch.Tensor:
            return part.load(cache) if is_lazy(part) else part

        lora_a = None if self.lora_a is None else value(self.lora_a)
        return _merge_values(value(self.base), value(self.lora_b), lora_a, scale=self.scale, transpose=self.transpose)

    def leaves(self):
        for part in (self.base, self.lora_b, self.lora_a):
            if is_lazy(part):
                yield from part.leaves()


def _merged(base, lora_b, lora_a, *, scale: float, transpose: bool):
    if any(is_lazy(part) for part in (base, lora_b, lora_a)):
        return LoraMergedTensor(base, lora_b, lora_a, scale=scale, transpose=transpose)
    return _merge_values(base, lora_b, lora_a, scale=scale, transpose=transpose)


def _merge_values(
    base: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor | None, *, scale: float, transpose: bool
) -> torch.Tensor:
    delta = lora_b.float() if lora_a is None else lora_b.float() @ lora_a.float()
    if transpose:
        delta = delta.T
    return (base.float() + scale * delta).to(base.dtype)


def _check_complete(adapter: LoraAdapter, weights: dict[str, torch.Tensor]) -> None:
    prefix = "lora_embedding_" if adapter.embedding else "lora_"
    absent = [
        f"{adapter.module}.{prefix}{part}.{adapter.adapter}"
        for part, tensor in (("A", adapter.lora_a), ("B", adapter.lora_b))
        if tensor is None
    ]
    if f"{adapter.module}.weight" not in weights:
        absent.append(f"{adapter.module}.base_layer.weight")
    if adapter.lora_b_bias is not None and f"{adapter.module}.bias" not in weights:
        absent.append(f"{adapter.module}.base_layer.bias (needed to merge lora_B's bias)")
    if absent:
        raise CheckpointError(
            f"LoRA adapter {adapter.adapter!r} on {adapter.module} is incomplete: found "
            f"{', '.join(sorted(adapter.source_keys))} but not {', '.join(absent)}. "
            "The checkpoint is partial, so export a complete one."
        )


def _check_shapes(adapter: LoraAdapter, base: torch.Tensor, settings: LoraSettings) -> None:
    a, b = adapter.lora_a, adapter.lora_b
    if a.dim() != 2 or b.dim() != 2 or base.dim() != 2:
        raise CheckpointError(
            f"LoRA on {adapter.module} has A {tuple(a.shape)}, B {tuple(b.shape)} and base "
            f"{tuple(base.shape)}, but only 2-D (linear and embedding) adapters can be merged."
        )
    rank = a.shape[0]
    delta_shape = (a.shape[1], b.shape[0]) if adapter.embedding else (b.shape[0], a.shape[1])
    if b.shape[1] != rank or delta_shape != tuple(base.shape):
        raise CheckpointError(
            f"LoRA on {adapter.module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not "
            f"combine into the base weight's shape {tuple(base.shape)}."
        )
    expected = settings.rank_for(adapter.module)
    if rank != expected:
        raise CheckpointError(
            f"LoRA on {adapter.module} has rank {rank} in the weights but the LoRA config gives "
            f"r={expected}, so the scale lora_alpha / r would be wrong. Pass the config used in training."
        )


def _matching_pattern(patterns: Mapping[str, Any], module: str) -> str | None:
    # Same rule as PEFT's `get_pattern_key` (peft/utils/other.py): a key applies when it matches a
    # dot-bounded suffix of the module name, and the first such key wins.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None
