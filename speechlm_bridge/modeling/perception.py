"""Audio perception around transformers' ``ParakeetEncoder``: optional adapter, projector, unpadding.

A speech LLM turns log-mel features into LLM input embeddings in three steps::

    input_features (B, T_mel, mel) --audio_encoder--> (B, T_a, d_enc)      ParakeetEncoder, 8x subsampling
                                   --audio_adapter--> (B, T_a, d_adapter)  optional, keeps T_a
                                   --audio_projector-> (B, T_a, d_llm)     Linear
                                   --unpad----------> [(T_a_i, d_llm) for each clip]

The final model stores these as ``audio_encoder``, ``audio_adapter`` (absent for NeMo's
IdentityConnector) and ``audio_projector``. Adapter and projector are described by plain dicts so that
they fit in a model's ``config.json``:

    adapter_config = {
        "adapter_type": "conformer",
        "input_size": 1024,                # encoder hidden size
        "conformer_config": {...},         # ParakeetEncoderConfig kwargs of the adapter's blocks
    }
    projector_config = {"projector_type": "linear", "input_size": 1024, "output_size": 2048, "bias": True}
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import ParakeetEncoder, ParakeetEncoderConfig
from transformers.models.parakeet.modeling_parakeet import (
    ParakeetEncoderBlock,
    ParakeetEncoderRelPositionalEncoding,
)

from speechlm_bridge.errors import ConfigError
from speechlm_bridge.modeling.frames import subsampled_frame_counts

__all__ = [
    "ADAPTER_TYPES",
    "PROJECTOR_TYPES",
    "ConformerAudioAdapter",
    "build_audio_adapter",
    "build_audio_projector",
    "encode_audio",
]

ADAPTER_TYPES = ("conformer",)
PROJECTOR_TYPES = ("linear",)


class ConformerAudioAdapter(nn.Module):
    """NeMo's ``ConformerEncoder`` modality adapter with ``subsampling_factor: 1``.

    With a subsampling factor of 1, NeMo's pre-encode is a plain ``Linear(feat_in, d_model)`` and
    the sequence length is unchanged. The rest is a FastConformer stack: inputs scaled by
    ``sqrt(d_model)`` when ``xscaling`` is on, relative sinusoidal positions, and Conformer blocks
    that mask padded frames in attention and before the depthwise convolution. The positions and
    blocks are transformers' own Parakeet modules, so the adapter computes exactly what
    ``ParakeetEncoder`` computes after its subsampling.
    """

    def __init__(self, config: ParakeetEncoderConfig, *, input_size: int) -> None:
        super().__init__()
        self.config = config
        self.input_proj = nn.Linear(input_size, config.hidden_size)
        self.input_scale = math.sqrt(config.hidden_size) if config.scale_input else 1.0
        self.encode_positions = ParakeetEncoderRelPositionalEncoding(config)
        self.layers = nn.ModuleList(
            [ParakeetEncoderBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, frames, input_size)`` to ``(batch, frames, hidden_size)``.

        ``attention_mask`` is ``(batch, frames)``, true for valid frames. Rows past a clip's length
        come out as unspecified values, as in NeMo.
        """
        hidden_states = self.input_proj(hidden_states) * self.input_scale
        position_embeddings = self.encode_positions(hidden_states)

        # (batch, 1, frames, frames): a pair attends only when both frames are valid, the mask
        # layout ParakeetEncoder builds for its own blocks.
        valid = attention_mask.bool()
        pair_mask = (valid[:, None, :] & valid[:, :, None]).unsqueeze(1)

        for layer in self.layers:
            hidden_states = layer(
                hidden_states, attention_mask=pair_mask, position_embeddings=position_embeddings
            )
        return hidden_states


def build_audio_adapter(adapter_config: dict[str, Any] | None) -> nn.Module | None:
    """Build the modality adapter described by ``adapter_config``, or return ``None`` for no adapter."""
    if adapter_config is None:
        return None
    adapter_type = adapter_config.get("adapter_type")
    if adapter_type not in ADAPTER_TYPES:
        raise ConfigError(
            f"audio adapter_type={adapter_type!r} is not supported; use one of {list(ADAPTER_TYPES)}, "
            "or no adapter config for an identity adapter."
        )
    _require_keys(adapter_config, ("input_size", "conformer_config"), what="audio adapter config")

    config = ParakeetEncoderConfig(**adapter_config["conformer_config"])
    # A standalone block reads the attention backend from its own config, which no PreTrainedModel
    # sets here. Eager is the reference implementation.
    if config._attn_implementation is None:
        config._attn_implementation = "eager"
    return ConformerAudioAdapter(config, input_size=int(adapter_config["input_size"]))


def build_audio_projector(projector_config: dict[str, Any]) -> nn.Module:
    """Build the projector from audio features to LLM embeddings described by ``projector_config``."""
    projector_type = projector_config.get("projector_type")
    if projector_type not in PROJECTOR_TYPES:
        raise ConfigError(
            f"audio projector_type={projector_type!r} is not supported; use one of {list(PROJECTOR_TYPES)}."
        )
    _require_keys(projector_config, ("input_size", "output_size"), what="audio projector config")
    return nn.Linear(
        int(projector_config["input_size"]),
        int(projector_config["output_size"]),
        bias=bool(projector_config.get("bias", True)),
    )


def encode_audio(
    encoder: ParakeetEncoder,
    adapter: nn.Module | None,
    projector: nn.Module,
    input_features: torch.Tensor,
    attention_mask: torch.Tensor,
) -> list[torch.Tensor]:
    """Encode a padded batch of log-mel features into one ``(T_a_i, hidden)`` tensor per clip.

    ``input_features`` is ``(batch, frames, mel)`` and ``attention_mask`` ``(batch, frames)``, as
    returned by ``SpeechLMBridgeFeatureExtractor``. ``T_a_i`` is
    :func:`~speechlm_bridge.modeling.frames.subsampled_frame_counts` of the clip's valid mel frames,
    zero for clips shorter than one STFT hop.
    """
    if attention_mask.shape != input_features.shape[:2]:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match the first two dimensions "
            f"of input_features {tuple(input_features.shape)}"
        )

    # 1. encoder: 8x shorter, padded rows unspecified
    output = encoder(input_features=input_features, attention_mask=attention_mask)
    hidden_states = output.last_hidden_state

    # 2. lengths from the shared frame-count formula, checked against the encoder's own mask
    config = encoder.config
    lengths = subsampled_frame_counts(
        attention_mask.sum(dim=-1),
        subsampling_factor=config.subsampling_factor,
        subsampling_conv_kernel_size=config.subsampling_conv_kernel_size,
        subsampling_conv_stride=config.subsampling_conv_stride,
    )
    encoder_lengths = output.attention_mask.sum(dim=-1).to(lengths.device)
    if not torch.equal(lengths, encoder_lengths.long()):
        raise RuntimeError(
            f"audio frame counts {lengths.tolist()} differ from the encoder's output lengths "
            f"{encoder_lengths.tolist()}; speechlm_bridge.modeling.frames no longer matches ParakeetEncoder"
        )

    # 3. adapter and projector on the padded batch, then drop each clip's padding
    if adapter is not None:
        valid = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None, :] < lengths[:, None]
        hidden_states = adapter(hidden_states, attention_mask=valid)
    embeddings = projector(hidden_states)
    return [embeddings[row, :length] for row, length in enumerate(lengths.tolist())]


def _require_keys(config: dict[str, Any], keys: tuple[str, ...], *, what: str) -> None:
    missing = [key for key in keys if key not in config]
    if missing:
        raise ConfigError(f"{what} is missing {missing}; it has {sorted(config)}.")
