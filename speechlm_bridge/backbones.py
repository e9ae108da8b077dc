"""The backbone family table: every difference between causal-LM backbones lives here.

Export, the transformers model and the checks consult `backbone_family_for(config)` instead of
branching on `model_type`, so supporting a new backbone is one new row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from speechlm_bridge.errors import ConfigError


@dataclass(frozen=True)
class BackboneFamily:
    """Weight names and generation state of one family of causal LMs."""

    name: str
    architectures: tuple[str, ...]
    # Hugging Face name of the input embedding matrix inside the causal LM.
    input_embeddings_key: str
    # (regex, replacement) pairs that turn older published names into the current transformers
    # names, e.g. NemotronH checkpoints on the Hub still use `backbone.` where transformers 5.x
    # modules use `model.`.
    legacy_renames: tuple[tuple[str, str], ...] = ()
    # True when generation keeps recurrent (Mamba) state besides the attention KV cache.
    has_recurrent_state: bool = False


BACKBONE_FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(
        name="dense-decoder",
        architectures=(
            "Qwen3ForCausalLM",
            "Qwen2ForCausalLM",
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "GraniteForCausalLM",
            "Phi3ForCausalLM",
        ),
        input_embeddings_key="model.embed_tokens.weight",
    ),
    BackboneFamily(
        name="hybrid-mamba",
        architectures=("NemotronHForCausalLM",),
        input_embeddings_key="model.embeddings.weight",
        legacy_renames=((r"^backbone\.", "model."),),
        has_recurrent_state=True,
    ),
)


def backbone_family_for(config: dict, *, source: str | Path = "the backbone config") -> BackboneFamily:
    """Look up the family of a backbone from the `architectures` of its config.json.

    `source` names the file in error messages.
    """
    architectures = config.get("architectures")
    if not architectures:
        raise ConfigError(
            f"{source} has no `architectures` list, so the backbone family cannot be detected. "
            'Add the causal-LM class name, e.g. "architectures": ["Qwen3ForCausalLM"], to that '
            "config.json (save the model once with transformers' save_pretrained to get it written)."
        )
    for family in BACKBONE_FAMILIES:
        if any(name in family.architectures for name in architectures):
            return family
    known = ", ".join(name for family in BACKBONE_FAMILIES for name in family.architectures)
    raise ConfigError(
        f"{source} names architectures {architectures}, which no backbone family of speechlm-bridge "
        f"covers. Supported causal LMs: {known}. Add a row to BACKBONE_FAMILIES in "
        "speechlm_bridge/backbones.py if the new backbone is a plain transformers causal LM."
    )


def read_backbone_config(backbone_dir: str | Path) -> dict:
    """Read `config.json` of a local backbone directory, with errors that name the path."""
    path = Path(backbone_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"backbone config {path} not found. Pass --backbone with a local directory that contains "
            "the causal LM's config.json and tokenizer files (the Hub is not used)."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"backbone config {path} is not valid JSON: {err}") from err


def apply_legacy_renames(state_dict: dict, family: BackboneFamily, *, prefixes: tuple[str, ...] = ("",)) -> dict:
    """Rename old published weight names of `family` to the names transformers uses now.

    Only keys under one of `prefixes` are renamed, with the prefix kept (the first matching
    prefix wins, so list longer ones first).
    """
    if not family.legacy_renames:
        return state_dict
    renamed = {}
    for key, tensor in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                name = key[len(prefix):]
                for pattern, replacement in family.legacy_renames:
                    name = re.sub(pattern, replacement, name)
                key = prefix + name
                break
        renamed[key] = tensor
    return renamed
