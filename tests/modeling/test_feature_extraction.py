"""SpeechLMBridgeFeatureExtractor: NeMo's log-mel features, filter rounding, save/load, short clips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch
from transformers import ParakeetFeatureExtractor

from speechlm_bridge.errors import ConfigError
from speechlm_bridge.modeling.feature_extraction import SpeechLMBridgeFeatureExtractor


def _tone(num_samples: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def test_float32_matches_parakeet() -> None:
    # With float32 filters and NeMo's defaults, nothing may differ from transformers' implementation.
    audio = _tone(24000)
    ours = SpeechLMBridgeFeatureExtractor(feature_size=128)(audio, sampling_rate=16000, return_tensors="pt")
    theirs = ParakeetFeatureExtractor(feature_size=128)(audio, sampling_rate=16000, return_tensors="pt")
    assert torch.equal(ours["input_features"], theirs["input_features"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["input_features"].shape == (1, 151, 128)


def test_bfloat16_rounded_filters() -> None:
    extractor = SpeechLMBridgeFeatureExtractor(
        feature_size=128, mel_filters_dtype="bfloat16", window_dtype="bfloat16"
    )
    librosa_filters = torch.from_numpy(
        librosa.filters.mel(sr=16000, n_fft=512, n_mels=128, fmin=0.0, fmax=8000.0, norm="slaney")
    )
    assert torch.equal(extractor.mel_filters, librosa_filters.bfloat16().float())
    assert torch.equal(extractor.window, torch.hann_window(400, periodic=False).bfloat16().float())
    assert extractor.mel_filters.dtype == torch.float32
    assert not torch.equal(extractor.mel_filters, librosa_filters)


def test_save_and_load(tmp_path: Path) -> None:
    extractor = SpeechLMBridgeFeatureExtractor(
        feature_size=64, window_function="hamming", mel_max_frequency=7000.0, mel_filters_dtype="bfloat16",
        log_zero_guard_value="tiny", preemphasis=None,
    )  # fmt: skip
    extractor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "SpeechLMBridgeFeatureExtractor"
    assert saved["window_function"] == "hamming"
    assert saved["mel_filters_dtype"] == "bfloat16"
    assert saved["window_dtype"] == "float32"
    assert saved["log_zero_guard_value"] == "tiny"
    assert saved["preemphasis"] is None
    assert "mel_filters" not in saved
    assert "window" not in saved

    loaded = SpeechLMBridgeFeatureExtractor.from_pretrained(tmp_path)
    audio = _tone(4000)
    expected = extractor(audio, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert torch.equal(loaded(audio, sampling_rate=16000, return_tensors="pt")["input_features"], expected)


@pytest.mark.parametrize(("num_samples", "valid_frames"), [(1, 0), (159, 0), (160, 1), (319, 1), (320, 2)])
def test_short_clip_rows(num_samples: int, valid_frames: int) -> None:
    extractor = SpeechLMBridgeFeatureExtractor(feature_size=32)
    features = extractor(_tone(num_samples), sampling_rate=16000, return_tensors="pt")
    input_features = features["input_features"]
    assert int(features["attention_mask"].sum()) == valid_frames
    assert not torch.isnan(input_features).any()
    if valid_frames <= 1:
        # NeMo: zero std becomes 1e-5 and (x - mean) is 0 for a single frame.
        assert torch.count_nonzero(input_features) == 0
    else:
        assert torch.count_nonzero(input_features[0, :valid_frames]) > 0


def test_batch_equals_single_clips() -> None:
    extractor = SpeechLMBridgeFeatureExtractor(feature_size=32, mel_filters_dtype="bfloat16", window_dtype="bfloat16")
    clips = [_tone(n, seed=n) for n in (300, 2400, 24000, 7777)]
    batch = extractor(clips, sampling_rate=16000, return_tensors="pt")
    for row, clip in enumerate(clips):
        single = extractor(clip, sampling_rate=16000, return_tensors="pt")
        frames = single["input_features"].shape[1]
        # The FFT of a longer padded batch rounds differently in the last float32 bits.
        torch.testing.assert_close(
            batch["input_features"][row, :frames], single["input_features"][0], rtol=1e-4, atol=1e-5
        )
        assert torch.count_nonzero(batch["input_features"][row, frames:]) == 0
        assert torch.equal(batch["attention_mask"][row, :frames], single["attention_mask"][0])


def test_log_zero_guard() -> None:
    silence = torch.zeros(1, 1600)
    values = {
        ("add", 2**-24): math.log(2**-24),
        ("clamp", 1e-3): math.log(1e-3),
        ("add", "eps"): math.log(torch.finfo(torch.float32).eps),
        ("clamp", "tiny"): math.log(torch.finfo(torch.float32).tiny),
    }
    for (guard_type, guard_value), expected in values.items():
        extractor = SpeechLMBridgeFeatureExtractor(
            feature_size=16, log_zero_guard_type=guard_type, log_zero_guard_value=guard_value
        )
        log_mel = extractor._torch_extract_fbank_features(silence)
        torch.testing.assert_close(log_mel, torch.full_like(log_mel, expected))


def test_mag_power() -> None:
    waveform = torch.from_numpy(_tone(1600))[None]
    stft = torch.stft(
        waveform, 512, hop_length=160, win_length=400, window=torch.hann_window(400, periodic=False),
        center=True, pad_mode="constant", return_complex=True,
    )  # fmt: skip
    for mag_power in (1.0, 2.0):
        extractor = SpeechLMBridgeFeatureExtractor(feature_size=16, mag_power=mag_power, log_zero_guard_value=0.0)
        expected = torch.log(extractor.mel_filters @ stft.abs().pow(mag_power)).permute(0, 2, 1)
        log_mel = extractor._torch_extract_fbank_features(waveform)
        torch.testing.assert_close(log_mel, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window_function": "kaiser"}, "window_function='kaiser'"),
        ({"normalize": "all_features"}, "normalize='all_features'"),
        ({"log_zero_guard_type": "floor"}, "log_zero_guard_type='floor'"),
        ({"log_zero_guard_value": "huge"}, "log_zero_guard_value='huge'"),
        ({"mel_filters_dtype": "float64"}, "mel_filters_dtype='float64'"),
        ({"window_dtype": "int8"}, "window_dtype='int8'"),
        ({"win_length": 600}, "win_length=600"),
    ],
)
def test_invalid_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SpeechLMBridgeFeatureExtractor(**options)
