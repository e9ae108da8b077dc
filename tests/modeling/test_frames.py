"""Frame counts against what the feature extractor and transformers' ParakeetEncoder really emit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import ParakeetEncoder, ParakeetEncoderConfig

from speechlm_bridge.modeling.feature_extraction import SpeechLMBridgeFeatureExtractor
from speechlm_bridge.modeling.frames import (
    audio_frame_count,
    audio_frame_counts,
    mel_frame_count,
    subsampled_frame_count,
    subsampled_frame_counts,
)
from speechlm_bridge.modeling.perception import build_audio_projector, encode_audio

HOP, N_FFT = 160, 512
# Around every boundary: below one hop, one hop, one subsampled frame (8 hops), odd lengths, the golden 1.5 s.
LENGTHS = [1, 80, 159, 160, 161, 319, 320, 321, 479, 480, 1279, 1280, 1281, 1440, 2559, 2561, 4001, 24000]


@pytest.fixture(scope="module")
def tiny_encoder() -> ParakeetEncoder:
    torch.manual_seed(0)
    config = ParakeetEncoderConfig(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        conv_kernel_size=3,
        subsampling_factor=8,
        subsampling_conv_channels=4,
        num_mel_bins=16,
    )
    return ParakeetEncoder(config).eval()


@pytest.fixture(scope="module")
def feature_extractor() -> SpeechLMBridgeFeatureExtractor:
    return SpeechLMBridgeFeatureExtractor(feature_size=16, hop_length=HOP, n_fft=N_FFT, win_length=400)


def test_golden_chain() -> None:
    assert mel_frame_count(24000, hop_length=HOP, n_fft=N_FFT) == 150
    assert subsampled_frame_count(150, subsampling_factor=8) == 19
    assert audio_frame_count(24000, hop_length=HOP, n_fft=N_FFT, subsampling_factor=8) == 19


@pytest.mark.parametrize(
    ("num_samples", "expected"),
    [(0, 0), (1, 0), (159, 0), (160, 1), (319, 1), (320, 2), (1280, 8), (1281, 8)],
)
def test_mel_frame_count_values(num_samples: int, expected: int) -> None:
    assert mel_frame_count(num_samples, hop_length=HOP, n_fft=N_FFT) == expected


@pytest.mark.parametrize(("num_frames", "expected"), [(0, 0), (1, 1), (2, 1), (8, 1), (9, 2), (16, 2), (17, 3), (150, 19)])
def test_subsampled_frame_count_values(num_frames: int, expected: int) -> None:
    assert subsampled_frame_count(num_frames, subsampling_factor=8) == expected


def test_odd_n_fft_count() -> None:
    # A centered STFT pads n_fft // 2 on each side, one sample short of n_fft when n_fft is odd.
    assert mel_frame_count(160, hop_length=160, n_fft=511) == 0
    assert mel_frame_count(161, hop_length=160, n_fft=511) == 1


def test_counts_match_feature_extractor(feature_extractor: SpeechLMBridgeFeatureExtractor) -> None:
    rng = np.random.default_rng(0)
    for num_samples in LENGTHS:
        features = feature_extractor(
            rng.standard_normal(num_samples).astype(np.float32), sampling_rate=16000, return_tensors="pt"
        )
        expected = mel_frame_count(num_samples, hop_length=HOP, n_fft=N_FFT)
        assert int(features["attention_mask"].sum()) == expected, num_samples
        # A centered STFT has one frame more than the valid ones; that frame is masked.
        assert features["input_features"].shape[1] == num_samples // HOP + 1, num_samples


def test_counts_match_encoder(
    tiny_encoder: ParakeetEncoder, feature_extractor: SpeechLMBridgeFeatureExtractor
) -> None:
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal(n).astype(np.float32) for n in LENGTHS]
    projector = build_audio_projector({"projector_type": "linear", "input_size": 8, "output_size": 3})
    expected = [audio_frame_count(n, hop_length=HOP, n_fft=N_FFT, subsampling_factor=8) for n in LENGTHS]

    # one clip at a time
    for clip, count in zip(clips, expected):
        features = feature_extractor(clip, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            output = tiny_encoder(**features)
            embeddings = encode_audio(tiny_encoder, None, projector, **features)
        assert int(output.attention_mask.sum()) == count, len(clip)
        assert embeddings[0].shape == (count, 3), len(clip)

    # all clips in one padded batch
    batch = feature_extractor(clips, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        output = tiny_encoder(**batch)
        embeddings = encode_audio(tiny_encoder, None, projector, **batch)
    assert output.attention_mask.sum(dim=-1).tolist() == expected
    assert [e.shape[0] for e in embeddings] == expected


def test_tensor_counts_match_int_counts() -> None:
    samples = torch.arange(0, 6000)
    for factor in (2, 4, 8, 16):
        counts = audio_frame_counts(samples, hop_length=HOP, n_fft=N_FFT, subsampling_factor=factor)
        expected = [audio_frame_count(n, hop_length=HOP, n_fft=N_FFT, subsampling_factor=factor) for n in range(6000)]
        assert counts.tolist() == expected, factor
        assert counts.dtype == torch.int64


@given(
    num_frames=st.integers(min_value=0, max_value=100_000),
    factor_log2=st.integers(min_value=1, max_value=5),
    kernel_size=st.sampled_from([1, 3, 5, 7]),
    stride=st.integers(min_value=1, max_value=3),
)
def test_tensor_subsampling_matches_int(num_frames: int, factor_log2: int, kernel_size: int, stride: int) -> None:
    options = {
        "subsampling_factor": 2**factor_log2,
        "subsampling_conv_kernel_size": kernel_size,
        "subsampling_conv_stride": stride,
    }
    tensor_count = subsampled_frame_counts(torch.tensor([num_frames]), **options)
    assert tensor_count.item() == subsampled_frame_count(num_frames, **options)


@pytest.mark.parametrize("factor", [0, 1, 3, 6, 12])
def test_invalid_subsampling_factor(factor: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        subsampled_frame_count(10, subsampling_factor=factor)
    with pytest.raises(ValueError, match="power of two"):
        subsampled_frame_counts(torch.tensor([10]), subsampling_factor=factor)


def test_negative_samples_rejected() -> None:
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        audio_frame_count(-1, hop_length=HOP, n_fft=N_FFT, subsampling_factor=8)
