"""Audio adapter, projector and encode_audio around transformers' ParakeetEncoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import ParakeetEncoder, ParakeetEncoderConfig

from speechlm_bridge.errors import ConfigError
from speechlm_bridge.modeling.perception import (
    ConformerAudioAdapter,
    build_audio_adapter,
    build_audio_projector,
    encode_audio,
)

ADAPTER_CONFIG = {
    "adapter_type": "conformer",
    "input_size": 12,
    "conformer_config": {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "conv_kernel_size": 5,
        "scale_input": True,
        "dropout": 0.0,
        "dropout_positions": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
    },
}


class _LinearFront(nn.Module):
    """Stands in for ParakeetEncoder's subsampling: a Linear that keeps the frame count."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(input_features)


class _UnsubsampledEncoder(ParakeetEncoder):
    def _get_output_attention_mask(self, attention_mask: torch.Tensor, target_length: int | None = None) -> torch.Tensor:
        return attention_mask.bool()


def _randomize_batch_norms(module: nn.Module) -> None:
    # Fresh running stats are 0 and 1, which would hide a missing or misplaced batch norm.
    for submodule in module.modules():
        if isinstance(submodule, nn.BatchNorm1d):
            submodule.running_mean.uniform_(-0.5, 0.5)
            submodule.running_var.uniform_(0.5, 2.0)


@pytest.fixture
def adapter() -> ConformerAudioAdapter:
    torch.manual_seed(0)
    adapter = build_audio_adapter(ADAPTER_CONFIG)
    assert isinstance(adapter, ConformerAudioAdapter)
    with torch.no_grad():
        _randomize_batch_norms(adapter)
    return adapter.eval()


def test_identity_adapter_is_none() -> None:
    assert build_audio_adapter(None) is None


def test_adapter_matches_parakeet_encoder(adapter: ConformerAudioAdapter) -> None:
    # Reference: transformers' own ParakeetEncoder forward over the same blocks, its subsampling
    # replaced by the adapter's Linear, so scaling, positions and masking come from transformers.
    reference = _UnsubsampledEncoder(ParakeetEncoderConfig(**ADAPTER_CONFIG["conformer_config"], num_mel_bins=16))
    reference.subsampling = _LinearFront(adapter.input_proj)
    reference.layers.load_state_dict(adapter.layers.state_dict())
    reference.eval()

    torch.manual_seed(1)
    hidden_states = torch.randn(3, 11, 12)
    lengths = torch.tensor([11, 7, 1])
    mask = torch.arange(11)[None, :] < lengths[:, None]
    with torch.no_grad():
        ours = adapter(hidden_states, attention_mask=mask)
        theirs = reference(hidden_states, attention_mask=mask).last_hidden_state

    assert ours.shape == (3, 11, 16)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(ours[row, :length], theirs[row, :length], rtol=1e-5, atol=1e-5)


def test_adapter_ignores_padding(adapter: ConformerAudioAdapter) -> None:
    torch.manual_seed(2)
    clip = torch.randn(1, 6, 12)
    padded = torch.cat([clip, 100 * torch.randn(1, 5, 12)], dim=1)
    mask = torch.arange(11)[None, :] < 6
    with torch.no_grad():
        alone = adapter(clip, attention_mask=torch.ones(1, 6, dtype=torch.bool))
        in_batch = adapter(padded, attention_mask=mask)
    torch.testing.assert_close(in_batch[:, :6], alone, rtol=1e-5, atol=1e-5)


def test_adapter_scale_input() -> None:
    config = {**ADAPTER_CONFIG, "conformer_config": {**ADAPTER_CONFIG["conformer_config"], "scale_input": False}}
    assert build_audio_adapter(config).input_scale == 1.0
    assert build_audio_adapter(ADAPTER_CONFIG).input_scale == 4.0


def test_projector_shapes() -> None:
    projector = build_audio_projector({"projector_type": "linear", "input_size": 16, "output_size": 8})
    assert isinstance(projector, nn.Linear)
    assert projector.weight.shape == (8, 16)
    assert projector.bias is not None
    no_bias = build_audio_projector({"projector_type": "linear", "input_size": 16, "output_size": 8, "bias": False})
    assert no_bias.bias is None


@pytest.mark.parametrize(
    ("builder", "config", "message"),
    [
        (build_audio_projector, {"projector_type": "mlp", "input_size": 4, "output_size": 4}, "projector_type='mlp'"),
        (build_audio_projector, {"projector_type": "linear", "input_size": 4}, r"missing \['output_size'\]"),
        (build_audio_adapter, {"adapter_type": "qformer"}, "adapter_type='qformer'"),
        (build_audio_adapter, {"adapter_type": "conformer", "input_size": 4}, r"missing \['conformer_config'\]"),
    ],
)
def test_invalid_configs(builder, config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        builder(config)


def test_encode_audio_with_adapter(adapter: ConformerAudioAdapter) -> None:
    torch.manual_seed(3)
    encoder = ParakeetEncoder(
        ParakeetEncoderConfig(
            hidden_size=12, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, conv_kernel_size=3,
            subsampling_factor=8, subsampling_conv_channels=4, num_mel_bins=16,
        )  # fmt: skip
    ).eval()
    projector = build_audio_projector({"projector_type": "linear", "input_size": 16, "output_size": 5})
    features = torch.randn(2, 151, 16)
    mask = torch.arange(151)[None, :] < torch.tensor([150, 40])[:, None]
    features = features * mask[..., None]

    with torch.no_grad():
        embeddings = encode_audio(encoder, adapter, projector, features, mask)
        alone = encode_audio(encoder, adapter, projector, features[1:, :41], mask[1:, :41])

    assert [tuple(e.shape) for e in embeddings] == [(19, 5), (5, 5)]
    torch.testing.assert_close(embeddings[1], alone[0], rtol=1e-5, atol=1e-5)


def test_encode_audio_mask_shape() -> None:
    encoder = ParakeetEncoder(
        ParakeetEncoderConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                              subsampling_conv_channels=4, num_mel_bins=16)  # fmt: skip
    )
    projector = build_audio_projector({"projector_type": "linear", "input_size": 8, "output_size": 2})
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 9\)"):
        encode_audio(encoder, None, projector, torch.zeros(1, 10, 16), torch.ones(1, 9, dtype=torch.bool))
