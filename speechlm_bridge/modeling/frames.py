"""Number of audio embeddings an audio clip produces: the one frame-count formula for every caller.

The processor expands each audio placeholder to this many positions, the model checks that the encoder
returned this many rows, and a serving engine must reserve the same number of tokens. All of them call
these functions, so the count cannot drift between training, export and serving.

The chain for NeMo's FastConformer perception (16 kHz, hop 160, n_fft 512, 8x subsampling)::

    24000 samples --STFT, centered--> 150 mel frames --conv s2--> 75 --conv s2--> 38 --conv s2--> 19

A centered STFT emits ``num_samples // hop_length + 1`` frames, but NeMo counts only
``(num_samples + 2 * (n_fft // 2) - n_fft) // hop_length`` of them as valid. The feature extractor
zeroes the extra frame, and the encoder masks it out.
"""

from __future__ import annotations

import torch

__all__ = [
    "audio_frame_count",
    "audio_frame_counts",
    "mel_frame_count",
    "subsampled_frame_count",
    "subsampled_frame_counts",
]


def audio_frame_count(
    num_samples: int,
    *,
    hop_length: int,
    n_fft: int,
    subsampling_factor: int,
    subsampling_conv_kernel_size: int = 3,
    subsampling_conv_stride: int = 2,
) -> int:
    """Return the number of audio embeddings for a clip of ``num_samples`` samples.

    Zero for clips shorter than ``hop_length`` samples, because they have no valid mel frame.
    """
    num_frames = mel_frame_count(num_samples, hop_length=hop_length, n_fft=n_fft)
    return subsampled_frame_count(
        num_frames,
        subsampling_factor=subsampling_factor,
        subsampling_conv_kernel_size=subsampling_conv_kernel_size,
        subsampling_conv_stride=subsampling_conv_stride,
    )


def mel_frame_count(num_samples: int, *, hop_length: int, n_fft: int) -> int:
    """Return the number of valid mel frames of a centered STFT over ``num_samples`` samples."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if hop_length <= 0 or n_fft <= 0:
        raise ValueError(f"hop_length and n_fft must be positive, got {hop_length} and {n_fft}")
    return (num_samples + 2 * (n_fft // 2) - n_fft) // hop_length


def subsampled_frame_count(
    num_frames: int,
    *,
    subsampling_factor: int,
    subsampling_conv_kernel_size: int = 3,
    subsampling_conv_stride: int = 2,
) -> int:
    """Return the encoder output length for ``num_frames`` valid mel frames.

    The encoder applies ``log2(subsampling_factor)`` convolutions with padding
    ``(kernel_size - 1) // 2`` on each side. Each maps a length ``n`` to
    ``floor((n + 2 * padding - kernel_size) / stride) + 1``, which keeps 0 at 0.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    padding, num_convs = _subsampling_geometry(
        subsampling_factor, subsampling_conv_kernel_size, subsampling_conv_stride
    )
    length = num_frames
    for _ in range(num_convs):
        length = (length + 2 * padding - subsampling_conv_kernel_size) // subsampling_conv_stride + 1
    return length


def audio_frame_counts(
    num_samples: torch.Tensor,
    *,
    hop_length: int,
    n_fft: int,
    subsampling_factor: int,
    subsampling_conv_kernel_size: int = 3,
    subsampling_conv_stride: int = 2,
) -> torch.Tensor:
    """Tensor form of :func:`audio_frame_count`: ``(batch,)`` sample counts to ``(batch,)`` int64 counts."""
    if hop_length <= 0 or n_fft <= 0:
        raise ValueError(f"hop_length and n_fft must be positive, got {hop_length} and {n_fft}")
    num_frames = torch.div(num_samples.long() + 2 * (n_fft // 2) - n_fft, hop_length, rounding_mode="floor")
    return subsampled_frame_counts(
        num_frames,
        subsampling_factor=subsampling_factor,
        subsampling_conv_kernel_size=subsampling_conv_kernel_size,
        subsampling_conv_stride=subsampling_conv_stride,
    )


def subsampled_frame_counts(
    num_frames: torch.Tensor,
    *,
    subsampling_factor: int,
    subsampling_conv_kernel_size: int = 3,
    subsampling_conv_stride: int = 2,
) -> torch.Tensor:
    """Tensor form of :func:`subsampled_frame_count`: ``(batch,)`` mel frame counts to ``(batch,)`` int64."""
    padding, num_convs = _subsampling_geometry(
        subsampling_factor, subsampling_conv_kernel_size, subsampling_conv_stride
    )
    lengths = num_frames.long()
    for _ in range(num_convs):
        lengths = (
            torch.div(
                lengths + 2 * padding - subsampling_conv_kernel_size,
                subsampling_conv_stride,
                rounding_mode="floor",
            )
            + 1
        )
    return lengths


def _subsampling_geometry(subsampling_factor: int, kernel_size: int, stride: int) -> tuple[int, int]:
    # ParakeetEncoder builds log2(subsampling_factor) strided convolutions whatever the stride is, so
    # the factor must be a power of two, and a factor of 1 would still build one convolution.
    if subsampling_factor < 2 or subsampling_factor & (subsampling_factor - 1):
        raise ValueError(f"subsampling_factor must be a power of two >= 2, got {subsampling_factor}")
    if kernel_size <= 0 or stride <= 0:
        raise ValueError(
            f"subsampling_conv_kernel_size and subsampling_conv_stride must be positive, got {kernel_size} and {stride}"
        )
    return (kernel_size - 1) // 2, subsampling_factor.bit_length() - 1
