"""Find the perception config (from the model config or the ASR `.nemo`) and convert its weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speechlm_bridge.errors import ConfigError
from speechlm_bridge.export.experiment import ModelConfig, resolve_local_dir
from speechlm_bridge.export.nemo_perception import (
    adapter_config_from_nemo,
    convert_perception_state_dict,
    feature_extractor_config_from_nemo,
    parakeet_encoder_config_from_nemo,
    projector_config_from_nemo,
)

logger = logging.getLogger(__name__)


@dataclass
class PerceptionExport:
    """The audio side of the exported model: weights under our names and the configs to rebuild it."""

    state_dict: dict[str, torch.Tensor]
    encoder_config: dict[str, Any]
    adapter_config: dict[str, Any] | None
    projector_config: dict[str, Any]
    feature_extractor_config: dict[str, Any]
    # The ASR model read for the encoder config, when the model config lacked it.
    asr_path: Path | None = None


def export_perception(
    model_config: ModelConfig,
    perception_state_dict: dict[str, torch.Tensor],
    *,
    asr_override: str | Path | None,
    search_dirs: list[Path],
) -> PerceptionExport:
    """Convert NeMo's `perception.*` weights and config to the Parakeet-based modules."""
    perception_cfg = dict(model_config.require("perception"))
    if "modality_adapter" not in perception_cfg:
        raise ConfigError(
            f"`model.perception.modality_adapter` is missing in {model_config.source}; NeMo's SALM "
            "configs always set it (e.g. IdentityConnector)."
        )

    # NeMo builds the preprocessor and encoder from the ASR model's own config when
    # `pretrained_weights` is true, so the experiment YAML does not contain them.
    asr_path = None
    if "encoder" not in perception_cfg or "preprocessor" not in perception_cfg:
        asr_path, asr_cfg = _read_asr_config(model_config, asr_override, search_dirs)
        for key in ("preprocessor", "encoder"):
            if key not in perception_cfg:
                if key not in asr_cfg:
                    raise ConfigError(f"the ASR model config has no `{key}` section; it is not a NeMo ASR model")
                perception_cfg[key] = asr_cfg[key]

    # NeMo overwrites `output_dim` with the LLM's hidden size when it loads pretrained weights;
    # the trained projector's shape is the value the weights were made with.
    if "proj.weight" in perception_state_dict:
        perception_cfg["output_dim"] = int(perception_state_dict["proj.weight"].shape[0])

    feature_extractor_config = feature_extractor_config_from_nemo(
        perception_cfg["preprocessor"], buffers=perception_state_dict
    )
    projector_config = projector_config_from_nemo(perception_cfg)
    state_dict = convert_perception_state_dict(
        perception_state_dict,
        encoder_cfg=perception_cfg["encoder"],
        adapter_cfg=perception_cfg["modality_adapter"],
        projector_cfg=projector_config,
        feature_extractor_kwargs=feature_extractor_config,
    )
    return PerceptionExport(
        state_dict=state_dict,
        encoder_config=parakeet_encoder_config_from_nemo(perception_cfg["encoder"]),
        adapter_config=adapter_config_from_nemo(perception_cfg["modality_adapter"]),
        projector_config=projector_config,
        feature_extractor_config=feature_extractor_config,
        asr_path=asr_path,
    )


def _read_asr_config(
    model_config: ModelConfig, asr_override: str | Path | None, search_dirs: list[Path]
) -> tuple[Path, dict]:
    from speechlm_bridge.checkpoints import read_nemo_archive

    asr_path = resolve_local_dir(
        model_config.get("pretrained_asr"),
        key="model.pretrained_asr",
        override=asr_override,
        option="--asr",
        base_dirs=search_dirs[1:],
        source=model_config.source,
    )
    logger.info("reading the encoder and preprocessor config from %s", asr_path)
    return asr_path, read_nemo_archive(asr_path).config
