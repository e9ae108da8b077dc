"""Configuration of an exported speech LLM: audio encoder, adapter, projector and causal LM."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.auto import CONFIG_MAPPING, AutoConfig

MODEL_TYPE = "speechlm_bridge"
DEFAULT_AUDIO_LOCATOR_TAG = "<|audio|>"


@strict
class SpeechLMBridgeConfig(PreTrainedConfig):
    r"""
    Configuration of [`SpeechLMBridgeForConditionalGeneration`].

    text_config (`dict` or `PreTrainedConfig`):
        The backbone causal LM's full config, as in its own config.json (`model_type` required).
    encoder_config (`dict` or `ParakeetEncoderConfig`):
        The audio encoder (NeMo's FastConformer) as transformers' `ParakeetEncoderConfig`.
    adapter_config (`dict`, *optional*):
        The modality adapter between encoder and projector; `None` for NeMo's IdentityConnector.
    projector_config (`dict`):
        The projector from the adapter's width to the LM's hidden size, e.g.
        `{"type": "linear", "input_size": 1024, "output_size": 2048, "bias": true}`.
    audio_locator_tag (`str`):
        The text of the special token that marks where one audio goes in a prompt. The processor
        expands each one into as many audio tokens as the encoder emits frames.
    audio_token_id (`int`):
        The tokenizer id of `audio_locator_tag`.
    prompt_format (`str`):
        The NeMo prompt format name the model was trained with, or `tokenizer_chat_template`.
    backbone_family (`str`):
        Row of `speechlm_bridge.backbones.BACKBONE_FAMILIES` the causal LM belongs to.
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig, "encoder_config": AutoConfig}

    text_config: dict | PreTrainedConfig | None = None
    encoder_config: dict | PreTrainedConfig | None = None
    adapter_config: dict | None = None
    projector_config: dict | None = None
    audio_locator_tag: str = DEFAULT_AUDIO_LOCATOR_TAG
    audio_token_id: int | None = None
    prompt_format: str = "tokenizer_chat_template"
    backbone_family: str | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, dict):
            text_config = dict(self.text_config)
            if "model_type" not in text_config:
                raise ValueError(
                    "text_config has no `model_type`; copy the backbone's config.json into it unchanged."
                )
            self.text_config = CONFIG_MAPPING[text_config["model_type"]](**text_config)
        if isinstance(self.encoder_config, dict):
            encoder_config = {"model_type": "parakeet_encoder", **self.encoder_config}
            self.encoder_config = CONFIG_MAPPING[encoder_config["model_type"]](**encoder_config)
        elif self.encoder_config is None:
            self.encoder_config = CONFIG_MAPPING["parakeet_encoder"]()
        super().__post_init__(**kwargs)
