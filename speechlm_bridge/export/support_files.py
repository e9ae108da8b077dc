"""The small files beside the weights: config.json, generation, feature extractor, processor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from speechlm_bridge.export.perception_config import PerceptionExport
from speechlm_bridge.modeling.configuration import SpeechLMBridgeConfig

logger = logging.getLogger(__name__)

ARCHITECTURE = "SpeechLMBridgeForConditionalGeneration"


def write_model_config(
    directory: Path,
    *,
    text_config: dict,
    perception: PerceptionExport,
    audio_locator_tag: str,
    audio_token_id: int,
    prompt_format: str,
    backbone_family: str,
    dtype: str,
) -> SpeechLMBridgeConfig:
    """Write config.json and return the config object it describes."""
    config = SpeechLMBridgeConfig(
        text_config=text_config,
        encoder_config=perception.encoder_config,
        adapter_config=perception.adapter_config,
        projector_config=perception.projector_config,
        audio_locator_tag=audio_locator_tag,
        audio_token_id=audio_token_id,
        prompt_format=prompt_format,
        backbone_family=backbone_family,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
        architectures=[ARCHITECTURE],
        dtype=dtype,
    )
    config.save_pretrained(str(directory))
    return config


def write_generation_config(directory: Path, *, tokenizer, backbone_dir: Path) -> list[int]:
    """Write generation_config.json whose eos ids include the token that ends an assistant turn.

    Only the special-token ids are taken over from the backbone's generation config: its sampling
    defaults (temperature, top_p) were chosen for chat, and a transcription model served with
    them would silently sample. Returns the eos ids.
    """
    from transformers import GenerationConfig

    from speechlm_bridge.prompts import find_end_of_turn_token

    eos_ids: list[int] = []
    backbone_generation = backbone_dir / "generation_config.json"
    backbone_values = {}
    if backbone_generation.is_file():
        backbone_values = json.loads(backbone_generation.read_text(encoding="utf-8"))
    if tokenizer.chat_template:
        end_of_turn = find_end_of_turn_token(tokenizer)
        eos_ids.append(tokenizer.convert_tokens_to_ids(end_of_turn))
    for value in (tokenizer.eos_token_id, backbone_values.get("eos_token_id")):
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(int(token_id))

    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else backbone_values.get("pad_token_id")
    bos_token_id = backbone_values.get("bos_token_id", tokenizer.bos_token_id)
    generation = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_token_id, bos_token_id=bos_token_id)
    generation.save_pretrained(str(directory))
    logger.info("generation config: eos ids %s", eos_ids)
    return eos_ids


def write_processor_configs(directory: Path, *, perception: PerceptionExport, audio_locator_tag: str) -> None:
    """Write preprocessor_config.json (feature extractor) and processor_config.json."""
    from speechlm_bridge.modeling.feature_extraction import SpeechLMBridgeFeatureExtractor

    feature_extractor = SpeechLMBridgeFeatureExtractor(**perception.feature_extractor_config)
    feature_extractor.save_pretrained(str(directory))

    # The subsampling values repeat the encoder config because AutoProcessor loads without
    # reading config.json; they feed the one frame-count function.
    encoder = perception.encoder_config
    processor_config = {
        "processor_class": "SpeechLMBridgeProcessor",
        "audio_token": audio_locator_tag,
        "subsampling_factor": encoder.get("subsampling_factor", 8),
        "subsampling_conv_kernel_size": encoder.get("subsampling_conv_kernel_size", 3),
        "subsampling_conv_stride": encoder.get("subsampling_conv_stride", 2),
    }
    (directory / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n", encoding="utf-8")
