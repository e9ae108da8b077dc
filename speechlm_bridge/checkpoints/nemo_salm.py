"""Split a NeMo SALM state dict into the causal LM (Hugging Face names) and the perception module.

SALM (nemo-toolkit 3.0) stores the LM under `llm.` with its Hugging Face names, but moves the input
embedding out of it to a top-level `embed_tokens.weight`. SALMAutomodel keeps it at
`llm.model.embed_tokens.weight`. With `model.lora`, PEFT wraps the LM: every key gains
`llm.base_model.model.`, and targeted layers become `base_layer` + `lora_A/B.<adapter>`. The audio
encoder and projector live under `perception.` and are converted elsewhere.

    llm.model.layers.0.self_attn.q_proj.weight          -> model.layers.0.self_attn.q_proj.weight
    llm.base_model.model.model.norm.weight              -> model.norm.weight
    llm.base_model.model.<m>.base_layer.weight          -> <m>.weight  (+ scale * B @ A)
    llm.lm_head.weight                                  -> lm_head.weight (dropped when tied)
    embed_tokens.weight / llm.model.embed_tokens.weight -> model.embed_tokens.weight
    perception.encoder.layers.0.norm_out.weight         -> perception: encoder.layers.0.norm_out.weight
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from speechlm_bridge.checkpoints.lazy import is_lazy, load_tensor, tensors_equal
from speechlm_bridge.checkpoints.lora import LoraAdapter, LoraSettings, merge_lora
from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"

# The LM prefix, with or without PEFT's wrapper.
_LLM = r"llm\.(?:base_model\.model\.)?"

# (pattern over the whole source key, role, target name template). The first match wins, so
# PEFT adapter names come before the generic `llm.` rule that would otherwise swallow them.
_KEY_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(pattern), role, target)
    for pattern, role, target in [
        (r".*_extra_state", "extra_state", ""),
        (r"embed_tokens\.weight", "llm", EMBED_KEY),
        (rf"{_LLM}(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight", "lora_A", r"\g<module>"),
        (rf"{_LLM}(?P<module>.+)\.lora_B\.(?P<adapter>[^.]+)\.weight", "lora_B", r"\g<module>"),
        (rf"{_LLM}(?P<module>.+)\.lora_B\.(?P<adapter>[^.]+)\.bias", "lora_B_bias", r"\g<module>"),
        (rf"{_LLM}(?P<module>.+)\.lora_embedding_A\.(?P<adapter>[^.]+)", "lora_embedding_A", r"\g<module>"),
        (rf"{_LLM}(?P<module>.+)\.lora_embedding_B\.(?P<adapter>[^.]+)", "lora_embedding_B", r"\g<module>"),
        (rf"{_LLM}(?P<module>.+)\.lora_magnitude_vector(?:\..+)?", "dora", r"\g<module>"),
        (rf"{_LLM}(?P<module>.+)\.token_adapter\..+", "trainable_tokens", r"\g<module>"),
        (rf"{_LLM}(?P<module>.+)\.base_layer\.(?P<param>[^.]+)", "lora_base", r"\g<module>.\g<param>"),
        # PEFT `modules_to_save`: the trained copy replaces the frozen original.
        (
            rf"{_LLM}(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>.+)",
            "llm",
            r"\g<module>.\g<param>",
        ),
        (rf"{_LLM}(?P<module>.+)\.original_module\.(?P<param>.+)", "superseded", r"\g<module>.\g<param>"),
        (rf"{_LLM}(?P<name>.+)", "llm", r"\g<name>"),
        (r"perception\.(?P<name>.+)", "perception", r"\g<name>"),
    ]
]

_KNOWN_LAYOUTS = (
    "NeMo SALM (`llm.<HF name>`, top-level `embed_tokens.weight`, `perception.*`), SALMAutomodel "
    "(`llm.model.embed_tokens.weight`), and PEFT LoRA under `llm.base_model.model.`"
)

_LORA_ROLES = {"lora_A", "lora_B", "lora_B_bias", "lora_embedding_A", "lora_embedding_B"}


@dataclass
class SalmWeights:
    """A SALM checkpoint's weights, split and normalized.

    `llm` contains the causal LM under its Hugging Face names with LoRA merged and
    `model.embed_tokens.weight` always present. `lm_head.weight` is present only when
    `tie_word_embeddings` is False. `perception` contains the `perception.*` tensors without the
    prefix. `source_dtype` is the dtype of the largest share of LM parameters.
    """

    llm: dict[str, torch.Tensor]
    perception: dict[str, torch.Tensor]
    tie_word_embeddings: bool
    source_dtype: torch.dtype
    lora_merged_modules: list[str] = field(default_factory=list)


def split_salm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    lora_config: Mapping[str, Any] | None,
    input_embeddings_key: str = EMBED_KEY,
) -> SalmWeights:
    """Split a SALM state dict into LM and perception weights, merging LoRA and resolving ties.

    `lora_config` is NeMo's `model.lora` dict (PEFT `LoraConfig` kwargs). It is required when the
    state dict has LoRA adapters and ignored otherwise. `input_embeddings_key` is the backbone's
    Hugging Face name of its input embedding (`model.embeddings.weight` for NemotronH); SALM's
    top-level `embed_tokens.weight` is stored under it.

    Raises:
        CheckpointError: a key matches no known layout, two keys map to one name, a LoRA
            adapter is incomplete or unmergeable, or the LM has no input embedding.
    """
    # 1. sort every key into its group by the rule table
    llm: dict[str, torch.Tensor] = {}
    perception: dict[str, torch.Tensor] = {}
    adapters: dict[tuple[str, str], LoraAdapter] = {}
    lora_bases: dict[str, str] = {}
    sources: dict[str, str] = {}
    unknown: list[str] = []
    dropped = {"extra_state": 0, "superseded": 0}
    for key, tensor in state_dict.items():
        rule = _match(key)
        if rule is None:
            unknown.append(key)
            continue
        match, role, target = rule
        if role in dropped:
            dropped[role] += 1
        elif role == "dora":
            raise CheckpointError(
                f"{key} is a DoRA magnitude vector: DoRA adapters cannot be merged as "
                "base + scale * B @ A. Export a checkpoint trained with plain LoRA."
            )
        elif role == "trainable_tokens":
            raise CheckpointError(
                f"{key} belongs to PEFT's trainable tokens (`trainable_token_indices`), which this "
                "converter does not merge. Export a checkpoint trained without them."
            )
        elif role in _LORA_ROLES:
            _add_adapter_part(adapters, key, role, target, match["adapter"], tensor)
        else:
            if role == "lora_base":
                lora_bases[target.rsplit(".", 1)[0]] = key
            group = perception if role == "perception" else llm
            _put(group, sources, key, target, tensor, role)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys match no known SALM layout: {', '.join(sorted(unknown)[:20])}"
            f"{', ...' if len(unknown) > 20 else ''}. Known layouts: {_KNOWN_LAYOUTS}."
        )
    logger.debug(
        "Dropped %d `_extra_state` entries and %d PEFT `original_module` copies",
        dropped["extra_state"],
        dropped["superseded"],
    )

    # 2. merge LoRA adapters into their base weights
    orphans = sorted(key for module, key in lora_bases.items() if module not in {m for m, _ in adapters})
    if orphans:
        raise CheckpointError(
            f"{', '.join(orphans[:10])} {'is a' if len(orphans) == 1 else 'are'} PEFT base_layer "
            "weight(s) without lora_A/lora_B adapters, so the checkpoint is partial. Export a "
            "complete one."
        )
    lora_merged: list[str] = []
    if adapters:
        _check_single_adapter_name(adapters)
        settings = LoraSettings.from_config(lora_config)
        lora_merged = merge_lora(llm, adapters.values(), settings)
        logger.info("Merged LoRA adapters into %d modules", len(lora_merged))

    # 3. decide tied embeddings from the weights
    if input_embeddings_key != EMBED_KEY and EMBED_KEY in llm:
        if input_embeddings_key in llm:
            raise CheckpointError(
                f"the checkpoint has both SALM's top-level embed_tokens.weight and llm.{input_embeddings_key}; "
                "keep one."
            )
        llm[input_embeddings_key] = llm.pop(EMBED_KEY)
    tied = _resolve_tied_embeddings(llm, input_embeddings_key)

    return SalmWeights(
        llm=llm,
        perception=perception,
        tie_word_embeddings=tied,
        source_dtype=_dominant_dtype(llm),
        lora_merged_modules=lora_merged,
    )


def _match(key: str) -> tuple[re.Match[str], str, str] | None:
    for pattern, role, template in _KEY_RULES:
        match = pattern.fullmatch(key)
        if match:
            return match, role, match.expand(template) if template else ""
    return None


def _put(
    group: dict[str, torch.Tensor],
    sources: dict[str, str],
    key: str,
    target: str,
    tensor: torch.Tensor,
    role: str,
) -> None:
    slot = f"{'perception' if role == 'perception' else 'llm'}:{target}"
    if slot in sources:
        raise CheckpointError(
            f"{sources[slot]} and {key} both map to {slot} because the state dict "
            "mixes two layouts (e.g. SALM's top-level embed_tokens and SALMAutomodel's "
            "llm.model.embed_tokens). Keep one."
        )
    sources[slot] = key
    group[target] = tensor


def _add_adapter_part(
    adapters: dict[tuple[str, str], LoraAdapter],
    key: str,
    role: str,
    module: str,
    adapter_name: str,
    tensor: torch.Tensor,
) -> None:
    adapter = adapters.setdefault((module, adapter_name), LoraAdapter(module=module, adapter=adapter_name))
    adapter.source_keys.append(key)
    if role.startswith("lora_embedding_"):
        adapter.embedding = True
    if role in ("lora_A", "lora_embedding_A"):
        adapter.lora_a = tensor
    elif role in ("lora_B", "lora_embedding_B"):
        adapter.lora_b = tensor
    else:
        adapter.lora_b_bias = tensor


def _check_single_adapter_name(adapters: dict[tuple[str, str], LoraAdapter]) -> None:
    names = sorted({name for _, name in adapters})
    if len(names) > 1:
        raise CheckpointError(
            f"The checkpoint has LoRA adapters named {', '.join(names)}, but which ones were active "
            "is not stored in the weights. Export a checkpoint with a single adapter."
        )


def _resolve_tied_embeddings(llm: dict[str, torch.Tensor], embed_key: str = EMBED_KEY) -> bool:
    embed = llm.get(embed_key)
    head = llm.get(LM_HEAD_KEY)
    if embed is None and head is None:
        raise CheckpointError(
            f"The LM weights have neither {embed_key} (SALM: top-level `embed_tokens.weight`) "
            f"nor {LM_HEAD_KEY}, so the checkpoint is incomplete."
        )
    if head is None:
        return True
    if embed is None:
        # safetensors keeps the alphabetically first name of tied aliases, which for SALMAutomodel
        # (`llm.lm_head.weight` < `llm.model.embed_tokens.weight`) is the head.
        logger.info("No input embedding in the weights, so the tied %s becomes %s", LM_HEAD_KEY, embed_key)
        llm[embed_key] = llm.pop(LM_HEAD_KEY)
        return True
    if tuple(embed.shape) == tuple(head.shape) and embed.dtype == head.dtype and _equal(embed, head):
        del llm[LM_HEAD_KEY]
        return True

    # FSDP2 shards embed_tokens and lm_head separately, so they train apart. NeMo's to_hf.py then
    # keeps only embed_tokens, and keeping both preserves the trained head.
    if tuple(embed.shape) == tuple(head.shape) and (not is_lazy(embed) or embed.nbytes <= _LAZY_DIFF_MAX_BYTES):
        detail = f"max |embed_tokens - lm_head| = {_max_abs_diff(load_tensor(embed), load_tensor(head)):.4g}"
    elif tuple(embed.shape) == tuple(head.shape):
        detail = f"{embed.nbytes / 2**20:.0f} MiB each, too large to compute the maximum difference"
    else:
        detail = f"shapes {tuple(embed.shape)} and {tuple(head.shape)}"
    logger.warning(
        "%s and %s differ (%s): exporting untied embeddings and keeping the trained lm_head "
        "(NeMo's to_hf.py would drop it).",
        embed_key,
        LM_HEAD_KEY,
        detail,
    )
    return False


# The warning gives the maximum difference of two lazy tables only up to this size, because it
# needs both in memory and took 0.6 s for two 128 MiB bf16 tables (2 cores), about half the
# export of a 1 GB checkpoint. Larger ones are compared without loading them (`tensors_equal`).
_LAZY_DIFF_MAX_BYTES = 64 * 1024 * 1024


def _equal(embed, head) -> bool:
    if not is_lazy(embed) and not is_lazy(head):
        return torch.equal(embed, head)
    return tensors_equal(embed, head)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, rows_per_chunk: int = 4096) -> float:
    # Chunked so that a 150k x 4096 embedding never needs two float32 copies at once.
    result = 0.0
    for start in range(0, a.shape[0], rows_per_chunk):
        chunk = (a[start : start + rows_per_chunk].float() - b[start : start + rows_per_chunk].float()).abs()
        if chunk.numel():
            result = max(result, chunk.max().item())
    return result


def _dominant_dtype(llm: dict[str, torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for tensor in llm.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    if len(counts) > 1:
        logger.info("LM weights mix dtypes %s", {str(k): v for k, v in counts.items()})
    return max(counts, key=counts.get) if counts else torch.float32
