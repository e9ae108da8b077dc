"""The transformers model of an exported speech LLM: Parakeet encoder, projector, causal LM.

Audio enters the LM the way vLLM serves it. The processor expands each audio locator tag into as
many audio tokens as the encoder emits frames. The model then overwrites the embeddings at those
positions with the projected encoder frames, in order. For one 1.5 s clip (19 frames)::

    input_ids     <|im_start|> user \\n ... : ␣ <|audio|> × 19 <|im_end|> ...
    inputs_embeds  e            e    e  ... e  e  a0 ... a18   e          ...

NeMo's training keeps one placeholder token and splices 19 embeddings in its place, so the LM
gets the same embeddings at the same positions either way.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, ParakeetEncoder, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.parakeet.modeling_parakeet import (
    ParakeetEncoderAttention,
    ParakeetEncoderRelPositionalEncoding,
)

from speechlm_bridge.modeling.configuration import SpeechLMBridgeConfig
from speechlm_bridge.modeling.perception import build_audio_adapter, build_audio_projector, encode_audio

logger = logging.getLogger(__name__)


class SpeechLMBridgePreTrainedModel(PreTrainedModel):
    config_class = SpeechLMBridgeConfig
    config: SpeechLMBridgeConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ParakeetEncoderBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    # NeMo's batch-norm step counters are training state; the export drops them.
    _keys_to_ignore_on_load_missing = [r"num_batches_tracked"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers initializes sub-models (the Parakeet encoder, the causal LM) with their own
        # `_init_weights`; the Conformer adapter's Parakeet blocks are plain modules and come here.
        # Without this, the adapter's non-persistent `inv_freq` buffer keeps whatever memory
        # `from_pretrained` allocated, which can be NaN.
        super()._init_weights(module)
        std = getattr(self.config.encoder_config, "initializer_range", 0.02)
        if isinstance(module, ParakeetEncoderAttention):
            init.normal_(module.bias_u, mean=0.0, std=std)
            init.normal_(module.bias_v, mean=0.0, std=std)
        elif isinstance(module, ParakeetEncoderRelPositionalEncoding):
            init.copy_(module.inv_freq, module.compute_default_relative_positional_parameters(module.config))


class SpeechLMBridgeForConditionalGeneration(SpeechLMBridgePreTrainedModel, GenerationMixin):
    """Speech LLM: `audio_encoder` -> `audio_adapter` (optional) -> `audio_projector` -> `language_model`."""

    def __init__(self, config: SpeechLMBridgeConfig):
        super().__init__(config)
        self.audio_encoder = ParakeetEncoder(config.encoder_config)
        self.audio_adapter = build_audio_adapter(config.adapter_config)
        self.audio_projector = build_audio_projector(config.projector_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def get_audio_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Encode a padded batch of log-mel features into one `(frames_i, hidden)` tensor per audio.

        `input_features` is `(batch, mel_frames, mel_bins)`; `input_features_mask` `(batch, mel_frames)`
        marks the valid mel frames of each audio.
        """
        return encode_audio(
            self.audio_encoder,
            self.audio_adapter,
            self.audio_projector,
            input_features.to(self.audio_encoder.dtype),
            input_features_mask,
        )

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed `input_ids` and put the audio frames in place of the audio tokens, in order."""
        audio_token_mask = input_ids == self.config.audio_token_id
        # The audio token's own embedding row is never read (NeMo replaces its id by 0 too), so a
        # backbone whose embedding table has no row for it still works.
        text_ids = input_ids.masked_fill(audio_token_mask, 0)
        inputs_embeds = self.get_input_embeddings()(text_ids)

        audio_token_count = int(audio_token_mask.sum())
        if input_features is None:
            if audio_token_count:
                raise ValueError(
                    f"input_ids contain {audio_token_count} audio tokens (id {self.config.audio_token_id}) "
                    "but no input_features were passed; run the processor on the audio too."
                )
            return inputs_embeds

        audio_embeds = torch.cat(self.get_audio_features(input_features, input_features_mask), dim=0)
        if audio_embeds.shape[0] != audio_token_count:
            raise ValueError(
                f"input_ids contain {audio_token_count} audio tokens but the encoder produced "
                f"{audio_embeds.shape[0]} audio frames for {input_features.shape[0]} audio(s). Expand "
                "each audio locator tag with the processor, which counts frames the same way."
            )
        mask = audio_token_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, audio_embeds.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        input_features (`torch.Tensor` of shape `(batch, mel_frames, mel_bins)`, *optional*):
            Log-mel features from the processor, one row per audio in prompt order.
        input_features_mask (`torch.Tensor` of shape `(batch, mel_frames)`, *optional*):
            1 on the valid mel frames of each audio.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, input_features, input_features_mask)

        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
