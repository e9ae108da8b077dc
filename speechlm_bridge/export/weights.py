"""Assemble the exported state_dict under the model's names and write it as safetensors shards.

Values may be tensors or lazy `TensorRef`s; padding and casting of lazy values are deferred to
the moment the writer loads them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from speechlm_bridge.backbones import BackboneFamily
from speechlm_bridge.checkpoints.lazy import CastTensor, TensorRef, as_ref, is_lazy, padded_rows
from speechlm_bridge.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

LANGUAGE_MODEL_PREFIX = "language_model."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def language_model_state_dict(
    llm: dict[str, torch.Tensor],
    *,
    family: BackboneFamily,
    tie_word_embeddings: bool,
    text_config: dict,
    audio_token_id: int,
    config_source: str | Path = "the backbone config",
) -> dict[str, torch.Tensor]:
    """Put the causal LM's weights under `language_model.` and make them fit `text_config`.

    Updates `text_config` in place: `tie_word_embeddings` from what the weights show, and
    `vocab_size` when the embedding table needs a row for the audio token. `config_source` names
    the backbone config.json in errors.
    """
    llm = dict(llm)
    if family.input_embeddings_key not in llm:
        raise CheckpointError(
            f"the checkpoint has no input embedding matrix ({family.input_embeddings_key} or NeMo's "
            "top-level embed_tokens.weight); it is needed to run the language model."
        )
    _check_backbone_matches(llm, family, text_config, config_source)

    if tie_word_embeddings:
        llm.pop("lm_head.weight", None)
    text_config["tie_word_embeddings"] = tie_word_embeddings

    # NeMo never resizes the embedding table: the audio token only needs a row when the
    # backbone's table has no padding room left. The row is never read (the model overwrites
    # audio positions), so zeros are enough.
    embeddings = llm[family.input_embeddings_key]
    rows_needed = max(audio_token_id + 1, int(text_config.get("vocab_size") or 0))
    if embeddings.shape[0] < rows_needed:
        logger.info(
            "padding the embedding table from %d to %d rows (the config's vocab_size, or room for "
            "the audio token id %d)", embeddings.shape[0], rows_needed, audio_token_id,
        )
        for key in (family.input_embeddings_key, "lm_head.weight"):
            if key in llm:
                llm[key] = padded_rows(llm[key], rows_needed)
    text_config["vocab_size"] = llm[family.input_embeddings_key].shape[0]
    return {LANGUAGE_MODEL_PREFIX + key: tensor for key, tensor in llm.items()}


def _check_backbone_matches(
    llm: dict[str, torch.Tensor], family: BackboneFamily, text_config: dict, config_source: str | Path
) -> None:
    # The two numbers that tell a wrong --backbone apart at once, before a long audit list.
    hidden_size = llm[family.input_embeddings_key].shape[1]
    layers = {int(match.group(1)) for key in llm if (match := re.match(r"model\.layers\.(\d+)\.", key))}
    expected = {"hidden_size": text_config.get("hidden_size"), "num_hidden_layers": text_config.get("num_hidden_layers")}
    found = {"hidden_size": hidden_size, "num_hidden_layers": max(layers) + 1 if layers else 0}
    # Hybrid configs derive the layer count from their block pattern and may not store it.
    mismatches = [
        f"{name} {found[name]} in the checkpoint vs {expected[name]} in the config"
        for name in found
        if expected[name] is not None and expected[name] != found[name]
    ]
    if mismatches:
        raise ConfigError(
            f"the backbone config {config_source} does not describe the checkpoint's language model "
            f"({'; '.join(mismatches)}). Pass --backbone with the backbone the model was trained from."
        )


def cast_floating(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to `dtype` (None keeps each tensor's dtype); others are untouched.

    Lazy values become `CastTensor`s, cast when the writer loads them.
    """
    if dtype is None:
        return state_dict
    return {key: _cast(tensor, dtype) for key, tensor in state_dict.items()}


def _cast(value: torch.Tensor | TensorRef, dtype: torch.dtype) -> torch.Tensor | TensorRef:
    if not value.is_floating_point() or value.dtype == dtype:
        return value
    return CastTensor(value, dtype) if is_lazy(value) else value.to(dtype)


def dominant_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """Return the floating dtype with the most parameters: the dtype the model was saved in."""
    totals: dict[torch.dtype, int] = {}
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            totals[tensor.dtype] = totals.get(tensor.dtype, 0) + tensor.numel()
    return max(totals, key=totals.get) if totals else torch.float32


def audit_state_dict(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Compare names and shapes with the model that will load them; raise with sorted lists."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    tied = tied_keys(model)
    ignored = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    missing = sorted(
        key
        for key in expected
        if key not in state_dict and key not in tied and not any(re.search(pattern, key) for pattern in ignored)
    )
    unexpected = sorted(key for key in state_dict if key not in expected)
    wrong_shape = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {expected[key]}"
        for key in state_dict
        if key in expected and tuple(state_dict[key].shape) != expected[key]
    )
    if missing or unexpected or wrong_shape:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                lines.append(f"{title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError(
            "the converted weights do not match the exported model: " + "; ".join(lines) + ". The "
            "checkpoint and the config (backbone config.json, perception settings) describe different models."
        )


def tied_keys(model: torch.nn.Module) -> set[str]:
    """Return the state_dict names that share their tensor with an earlier name (a tied lm_head)."""
    # A tied lm_head is the same Parameter object as the input embedding, so the file stores
    # it once under the first name.
    seen: set[int] = set()
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied


def write_safetensors_shards(
    state_dict: dict[str, torch.Tensor | TensorRef],
    directory: Path,
    *,
    max_shard_size: str | int,
    workers: int = 1,
    progress: bool | None = False,
) -> int:
    """Write `model-XXXXX-of-YYYYY.safetensors` (+ index) or a single `model.safetensors`.

    The files equal what `huggingface_hub.save_torch_state_dict` writes for the same tensors,
    except that tensors sharing storage are each written in full. Returns the number of shard files.
    """
    from speechlm_bridge.export.parallel import write_shards
    from speechlm_bridge.export.safetensors_writer import plan_shards, write_index
    from speechlm_bridge.export.shard_size import parse_shard_size

    shards = plan_shards({key: as_ref(value) for key, value in state_dict.items()}, max_shard_size=parse_shard_size(max_shard_size))
    total_bytes = sum(shard.nbytes for shard in shards)
    logger.info(
        "writing %.1f MB of weights as %d safetensors file(s) (max shard size %s)",
        total_bytes / 1e6, len(shards), max_shard_size,
    )
    write_shards(shards, directory, indices=list(range(len(shards))), workers=workers, progress=progress)
    write_index(shards, directory)
    return len(shards)
