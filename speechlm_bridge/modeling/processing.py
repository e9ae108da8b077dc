"""Processor: audio + prompt text into model inputs, with one audio token per encoder frame."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

from speechlm_bridge.modeling.frames import audio_frame_count

logger = logging.getLogger(__name__)


class SpeechLMBridgeProcessor(ProcessorMixin):
    """Feature extractor + the backbone's tokenizer with the audio locator tag added.

    `__call__(text, audio)` turns each audio locator tag in `text` into as many copies of the tag
    as the encoder emits frames for the matching audio (`audio_frame_count`). It then tokenizes
    the text without adding special tokens, because the prompt comes from the chat template,
    which already contains every special token serving feeds the model.
    """

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        chat_template: str | dict | None = None,
        audio_token: str = "<|audio|>",
        subsampling_factor: int = 8,
        subsampling_conv_kernel_size: int = 3,
        subsampling_conv_stride: int = 2,
    ):
        self.audio_token = audio_token
        self.subsampling_factor = subsampling_factor
        self.subsampling_conv_kernel_size = subsampling_conv_kernel_size
        self.subsampling_conv_stride = subsampling_conv_stride
        # The export keeps the template in one place, the tokenizer config; the processor uses it
        # from there so the two can never disagree.
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.audio_token)

    def audio_frame_count(self, num_samples: int) -> int:
        """Number of audio tokens (encoder frames) for an audio of `num_samples` samples."""
        return audio_frame_count(
            num_samples,
            hop_length=self.feature_extractor.hop_length,
            n_fft=self.feature_extractor.n_fft,
            subsampling_factor=self.subsampling_factor,
            subsampling_conv_kernel_size=self.subsampling_conv_kernel_size,
            subsampling_conv_stride=self.subsampling_conv_stride,
        )

    def render_prompt(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> str:
        """Render a dialog with the backbone's chat template, ready for generation.

        Audio content parts (`{"type": "audio", ...}`) become the audio locator tag, as in training.
        """
        from speechlm_bridge.prompts import serving_prompt_text

        return serving_prompt_text(
            self.tokenizer, messages, audio_locator_tag=self.audio_token, **template_kwargs
        )

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio: np.ndarray | list[np.ndarray] | None = None,
        *,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str = "left",
        template_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize prompts and featurize their audios.

        Pass either `text` (rendered prompts) or `messages` (one dialog, or a list of dialogs,
        rendered here with `render_prompt(**template_kwargs)`). The prompts contain one audio
        locator tag per audio, in order across the batch. With `messages` and no `audio`, the
        arrays come from the audio content parts (`{"type": "audio", "audio": array}`). Returns `input_ids`, `attention_mask`
        and, with audio, `input_features` `(num_audios, mel_frames, mel_bins)` and
        `input_features_mask` `(num_audios, mel_frames)`. Prompts are padded on the left by
        default, so that `generate()` continues every row right after its own prompt.
        """
        if (text is None) == (messages is None):
            raise ValueError("pass exactly one of text (rendered prompts) and messages (chat dialogs)")
        if messages is not None:
            dialogs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
            text = [self.render_prompt(dialog, **(template_kwargs or {})) for dialog in dialogs]
            if audio is None:
                audio = _audio_from_parts(dialogs) or None
        texts = [text] if isinstance(text, str) else list(text)
        if isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim > 1:
            raise ValueError(
                f"audio has shape {tuple(audio.shape)}; pass one mono 1-D array, or a list of them "
                "for several audios (average the channels of stereo audio first)"
            )
        if audio is None:
            audios = []
        elif _is_single_audio(audio):
            audios = [audio]
        else:
            audios = list(audio)

        tag_counts = [sample.count(self.audio_token) for sample in texts]
        if sum(tag_counts) != len(audios):
            raise ValueError(
                f"the text contains {sum(tag_counts)} audio locator tag(s) {self.audio_token!r} "
                f"(per prompt: {tag_counts}) but {len(audios)} audio(s) were passed; pass one audio "
                "per tag, in prompt order."
            )

        data: dict[str, Any] = {}
        if audios:
            audios = [np.asarray(item, dtype=np.float32) for item in audios]
            for index, item in enumerate(audios):
                if item.ndim != 1:
                    raise ValueError(
                        f"audio {index} has shape {item.shape}; pass mono audio as a 1-D array of samples"
                    )
            features = self.feature_extractor(
                audios, sampling_rate=sampling_rate, return_tensors="pt", return_attention_mask=True
            )
            data["input_features"] = features["input_features"]
            data["input_features_mask"] = features["attention_mask"]
            texts = self._expand_audio_tags(texts, [len(item) for item in audios])

        encoded = self.tokenizer(
            texts,
            add_special_tokens=False,
            padding=padding,
            padding_side=padding_side,
            return_tensors=return_tensors,
            **kwargs,
        )
        data.update(encoded)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand_audio_tags(self, texts: list[str], audio_lengths: list[int]) -> list[str]:
        counts = [self.audio_frame_count(length) for length in audio_lengths]
        for index, (length, count) in enumerate(zip(audio_lengths, counts)):
            if count == 0:
                raise ValueError(
                    f"audio {index} has {length} samples, too short for one encoder frame; pass at "
                    f"least {self.feature_extractor.hop_length} samples "
                    f"({self.feature_extractor.hop_length / self.feature_extractor.sampling_rate * 1000:.0f} ms)."
                )
        frame_counts = iter(counts)
        expanded = []
        for sample in texts:
            pieces = sample.split(self.audio_token)
            out = [pieces[0]]
            for piece in pieces[1:]:
                out.append(self.audio_token * next(frame_counts))
                out.append(piece)
            expanded.append("".join(out))
        return expanded

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def _audio_from_parts(dialogs: list[list[dict[str, Any]]]) -> list[np.ndarray]:
    """Collect the arrays of `{"type": "audio", "audio": array}` content parts, in order."""
    arrays = []
    for dialog in dialogs:
        for message in dialog:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for part in content:
                if isinstance(part, dict) and part.get("type") == "audio" and "audio" in part:
                    arrays.append(np.asarray(part["audio"], dtype=np.float32))
    return arrays


def _is_single_audio(audio: Any) -> bool:
    if isinstance(audio, torch.Tensor):
        return audio.ndim == 1
    return isinstance(audio, np.ndarray) and audio.ndim == 1
