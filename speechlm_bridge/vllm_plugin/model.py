"""The vLLM model of an exported speech LLM.

The audio tower is the transformers model's own perception (`ParakeetEncoder`, the optional
adapter and the projector), so vLLM and transformers compute the same audio embeddings. The
language model is vLLM's implementation of the backbone architecture named in `text_config`
(Qwen3, Qwen2, Llama, NemotronH, ...), taken from vLLM's registry. Weights load under the
export's names: `audio_encoder.*`, `audio_adapter.*`, `audio_projector.*`, `language_model.*`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers import ParakeetEncoder
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from speechlm_bridge.modeling.perception import build_audio_adapter, build_audio_projector, encode_audio
from speechlm_bridge.vllm_plugin.processing import (
    SpeechLMBridgeDummyInputsBuilder,
    SpeechLMBridgeMultiModalProcessor,
    SpeechLMBridgeProcessingInfo,
)

logger = logging.getLogger(__name__)


@MULTIMODAL_REGISTRY.register_processor(
    SpeechLMBridgeMultiModalProcessor,
    info=SpeechLMBridgeProcessingInfo,
    dummy_inputs=SpeechLMBridgeDummyInputsBuilder,
)
class SpeechLMBridgeForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """Speech LLM for vLLM: perception from transformers, causal LM from vLLM."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        # No placeholder is added for audio content parts: vLLM would put it before the text,
        # joined by a newline, while training put the tag where the user wrote it. Requests carry
        # the locator tag in their text, and the processor rejects a count mismatch.
        if modality.startswith("audio"):
            return None
        raise ValueError(f"{cls.__name__} accepts audio only, not {modality}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config

        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_encoder = ParakeetEncoder(config.encoder_config)
            self.audio_adapter = build_audio_adapter(config.adapter_config)
            self.audio_projector = build_audio_projector(config.projector_config)

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=list(config.text_config.architectures or []) or None,
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        features = kwargs.get("input_features")
        masks = kwargs.get("input_features_mask")
        if features is None:
            return []
        input_features, attention_mask = _pad_batch(features, masks)
        dtype = next(self.audio_encoder.parameters()).dtype
        return tuple(
            encode_audio(
                self.audio_encoder,
                self.audio_adapter,
                self.audio_projector,
                input_features.to(dtype),
                attention_mask,
            )
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # BatchNorm step counters are training state, which the export drops. No other name is skipped.
        return AutoWeightsLoader(self, ignore_unexpected_suffixes=["num_batches_tracked"]).load_weights(weights)


def _pad_batch(
    features: torch.Tensor | list[torch.Tensor], masks: torch.Tensor | list[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-audio `(mel_frames_i, mel_bins)` features into one zero-padded batch and mask.

    vLLM hands over a stacked tensor when every audio of the batch has the same length, and a
    list otherwise. Padding is masked out by the encoder, so it does not change any audio's output.
    """
    if isinstance(features, torch.Tensor) and features.ndim == 3:
        features_list = list(features)
    else:
        features_list = list(features)
    if masks is None:
        masks_list = [torch.ones(item.shape[0], dtype=torch.long) for item in features_list]
    else:
        masks_list = list(masks)
    longest = max(item.shape[0] for item in features_list)
    batch = features_list[0].new_zeros((len(features_list), longest, features_list[0].shape[-1]))
    mask = torch.zeros((len(features_list), longest), dtype=torch.long, device=batch.device)
    for row, (item, item_mask) in enumerate(zip(features_list, masks_list)):
        batch[row, : item.shape[0]] = item
        mask[row, : item_mask.shape[0]] = item_mask.to(mask.dtype)
    return batch, mask
