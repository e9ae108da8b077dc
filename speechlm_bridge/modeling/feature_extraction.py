"""Log-mel features that match NeMo's ``AudioToMelSpectrogramPreprocessor`` at inference.

transformers' ``ParakeetFeatureExtractor`` already implements NeMo's pipeline (pre-emphasis, centered
STFT with a symmetric window, power spectrum, Slaney mel filters from librosa, ``log(x + 2**-24)``,
per-feature normalization over the valid frames with an unbiased std plus 1e-5). This subclass keeps
its padding, pre-emphasis and normalization and makes configurable what NeMo configs vary:
window function, mel range and norm, spectrum power and log guard.

It also reproduces the filterbank and window a NeMo checkpoint actually used. NeMo stores both as
buffers, so a model trained with ``precision: bf16-true`` computes its features with bf16-rounded
values. ``mel_filters_dtype`` and ``window_dtype`` round the freshly computed float32 values to that
dtype (and back), which matches such a checkpoint bit for bit. It matters: on the tiny FastConformer
test fixture (tests/export/test_nemo_perception.py, CPU, fp32) the audio embeddings differ from
NeMo's by 4.6e-3 (max abs) with float32 filters and window, by 3.6e-7 with bf16-rounded ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import librosa
import numpy as np
import torch
from transformers import BatchFeature, ParakeetFeatureExtractor

from speechlm_bridge.errors import ConfigError

__all__ = [
    "FILTER_DTYPES",
    "LOG_ZERO_GUARD_TYPES",
    "NORMALIZE_TYPES",
    "SpeechLMBridgeFeatureExtractor",
    "WINDOW_FUNCTIONS",
    "compute_mel_filters",
    "compute_window",
]

# The symmetric windows NeMo's FilterbankFeatures builds (always with periodic=False).
WINDOW_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "hann": torch.hann_window,
    "hamming": torch.hamming_window,
    "blackman": torch.blackman_window,
    "bartlett": torch.bartlett_window,
}
FILTER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
LOG_ZERO_GUARD_TYPES = ("add", "clamp")
NORMALIZE_TYPES = ("per_feature",)


class SpeechLMBridgeFeatureExtractor(ParakeetFeatureExtractor):
    r"""Log-mel feature extractor for a speech LLM's FastConformer audio encoder.

    Returns ``input_features`` of shape ``(batch, frames, feature_size)`` and a boolean
    ``attention_mask`` of shape ``(batch, frames)``. Frames past a clip's valid length are zero.
    Never dithers: NeMo dithers only in training.

    Args:
        feature_size: Number of mel bins (NeMo ``features``).
        sampling_rate: Sampling rate of the input audio in Hz.
        hop_length: STFT hop in samples (NeMo ``n_window_stride``).
        n_fft: FFT size.
        win_length: Window length in samples (NeMo ``n_window_size``), at most ``n_fft``.
        preemphasis: Pre-emphasis coefficient, or ``None`` for none (NeMo ``preemph``).
        padding_value: Value used to pad raw audio in a batch.
        window_function: One of ``WINDOW_FUNCTIONS``, built symmetric (``periodic=False``).
        mel_min_frequency: Lowest mel filter edge in Hz (NeMo ``lowfreq``).
        mel_max_frequency: Highest mel filter edge in Hz, ``None`` for ``sampling_rate / 2`` (NeMo ``highfreq``).
        mel_norm: librosa's ``norm`` for the mel filters: ``"slaney"``, ``None`` or a p-norm order.
        mag_power: Power applied to the STFT magnitude before the mel filters.
        log_zero_guard_type: ``"add"`` for ``log(x + guard)``, ``"clamp"`` for ``log(max(x, guard))``.
        log_zero_guard_value: The guard, a number or ``"tiny"``/``"eps"`` of float32.
        normalize: Feature normalization, only ``"per_feature"``.
        mel_filters_dtype: Dtype the mel filters are rounded to before use, one of ``FILTER_DTYPES``.
        window_dtype: Dtype the window is rounded to before use, one of ``FILTER_DTYPES``.
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 80,
        sampling_rate: int = 16000,
        hop_length: int = 160,
        n_fft: int = 512,
        win_length: int = 400,
        preemphasis: float | None = 0.97,
        padding_value: float = 0.0,
        *,
        window_function: str = "hann",
        mel_min_frequency: float = 0.0,
        mel_max_frequency: float | None = None,
        mel_norm: str | float | None = "slaney",
        mag_power: float = 2.0,
        log_zero_guard_type: str = "add",
        log_zero_guard_value: float | str = 2**-24,
        normalize: str = "per_feature",
        mel_filters_dtype: str = "float32",
        window_dtype: str = "float32",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            hop_length=hop_length,
            n_fft=n_fft,
            win_length=win_length,
            preemphasis=preemphasis,
            padding_value=padding_value,
            **kwargs,
        )
        self.window_function = window_function
        self.mel_min_frequency = mel_min_frequency
        self.mel_max_frequency = mel_max_frequency
        self.mel_norm = mel_norm
        self.mag_power = mag_power
        self.log_zero_guard_type = log_zero_guard_type
        self.log_zero_guard_value = log_zero_guard_value
        self.normalize = normalize
        self.mel_filters_dtype = mel_filters_dtype
        self.window_dtype = window_dtype
        self._validate()

        # to_dict() leaves out the "window" and "mel_filters" attributes, so both tensors are rebuilt
        # from the fields above on every load instead of being serialized.
        self.window = compute_window(
            window_function, win_length=win_length, dtype=FILTER_DTYPES[window_dtype]
        )
        self.mel_filters = compute_mel_filters(
            sampling_rate=sampling_rate,
            n_fft=n_fft,
            feature_size=feature_size,
            mel_min_frequency=mel_min_frequency,
            mel_max_frequency=mel_max_frequency,
            mel_norm=mel_norm,
            dtype=FILTER_DTYPES[mel_filters_dtype],
        )

    def __call__(
        self,
        raw_speech: np.ndarray | list[np.ndarray] | torch.Tensor | list[torch.Tensor],
        *,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Compute features for one clip or a batch; see ``ParakeetFeatureExtractor.__call__`` for options."""
        features = super().__call__(raw_speech, return_tensors="pt", **kwargs)

        # With a single valid frame the unbiased std is 0/0, and ParakeetFeatureExtractor returns NaN
        # there. NeMo replaces that std by 0 before adding 1e-5, which makes the frame (x - mean) = 0,
        # and with no valid frame everything is masked. Either way NeMo's row is all zeros.
        input_features = features["input_features"]
        attention_mask = features["attention_mask"]
        short_rows = attention_mask.sum(dim=-1) <= 1
        if bool(short_rows.any()):
            input_features = input_features.masked_fill(short_rows[:, None, None], 0.0)

        return BatchFeature(
            data={"input_features": input_features, "attention_mask": attention_mask},
            tensor_type=return_tensors,
        )

    def _torch_extract_fbank_features(self, waveform: torch.Tensor, device: str = "cpu") -> torch.Tensor:
        stft = torch.stft(
            waveform,
            self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.to(device),
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        # |X| through sqrt(re^2 + im^2), then the power, in the same order as NeMo, so the float32
        # rounding matches too.
        magnitudes = torch.view_as_real(stft).pow(2).sum(-1).sqrt()
        if self.mag_power != 1.0:
            magnitudes = magnitudes.pow(self.mag_power)

        mel_spec = self.mel_filters.to(device) @ magnitudes
        guard = _resolve_log_zero_guard(self.log_zero_guard_value, mel_spec.dtype)
        if self.log_zero_guard_type == "add":
            mel_spec = torch.log(mel_spec + guard)
        else:
            mel_spec = torch.log(torch.clamp(mel_spec, min=guard))

        # (batch, mel, frames) -> (batch, frames, mel)
        return mel_spec.permute(0, 2, 1)

    def _validate(self) -> None:
        name = type(self).__name__
        if self.window_function not in WINDOW_FUNCTIONS:
            raise ConfigError(
                f"{name}: window_function={self.window_function!r} is not supported; "
                f"use one of {sorted(WINDOW_FUNCTIONS)}."
            )
        for field in ("mel_filters_dtype", "window_dtype"):
            if getattr(self, field) not in FILTER_DTYPES:
                raise ConfigError(
                    f"{name}: {field}={getattr(self, field)!r} is not supported; use one of {sorted(FILTER_DTYPES)}."
                )
        if self.log_zero_guard_type not in LOG_ZERO_GUARD_TYPES:
            raise ConfigError(
                f"{name}: log_zero_guard_type={self.log_zero_guard_type!r} is not supported; "
                f"use one of {list(LOG_ZERO_GUARD_TYPES)}."
            )
        _resolve_log_zero_guard(self.log_zero_guard_value, torch.float32)
        if self.normalize not in NORMALIZE_TYPES:
            raise ConfigError(
                f"{name}: normalize={self.normalize!r} is not supported; only {list(NORMALIZE_TYPES)} is implemented."
            )
        if not 0 < self.win_length <= self.n_fft:
            raise ConfigError(
                f"{name}: win_length={self.win_length} must be between 1 and n_fft={self.n_fft}."
            )
        if self.hop_length <= 0:
            raise ConfigError(f"{name}: hop_length={self.hop_length} must be positive.")


def compute_window(window_function: str, *, win_length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Build NeMo's symmetric STFT window of ``win_length`` samples, rounded to ``dtype``, as float32."""
    window = WINDOW_FUNCTIONS[window_function](win_length, periodic=False)
    return window.to(dtype).to(torch.float32)


def compute_mel_filters(
    *,
    sampling_rate: int,
    n_fft: int,
    feature_size: int,
    mel_min_frequency: float = 0.0,
    mel_max_frequency: float | None = None,
    mel_norm: str | float | None = "slaney",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Build NeMo's librosa mel filterbank ``(feature_size, n_fft // 2 + 1)``, rounded to ``dtype``, as float32."""
    # NeMo uses `highfreq or sample_rate / 2`, so 0 means Nyquist as well.
    fmax = mel_max_frequency or sampling_rate / 2
    filters = librosa.filters.mel(
        sr=sampling_rate, n_fft=n_fft, n_mels=feature_size, fmin=mel_min_frequency, fmax=fmax, norm=mel_norm
    )
    return torch.from_numpy(filters).to(torch.float32).to(dtype).to(torch.float32)


def _resolve_log_zero_guard(value: float | str, dtype: torch.dtype) -> float:
    if isinstance(value, str):
        if value == "tiny":
            return torch.finfo(dtype).tiny
        if value == "eps":
            return torch.finfo(dtype).eps
        raise ConfigError(
            f"log_zero_guard_value={value!r} is not supported; use a number, 'tiny' or 'eps'."
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"log_zero_guard_value={value!r} must be a number, 'tiny' or 'eps'.")
    return float(value)
