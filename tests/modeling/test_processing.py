"""SpeechLMBridgeProcessor: audio locator tags expanded to one audio token per encoder frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

import speechlm_bridge  # noqa: F401  (registers the auto classes)
from speechlm_bridge.demo.backbone import write_demo_backbone
from speechlm_bridge.export.tokenizer import export_tokenizer
from speechlm_bridge.modeling.feature_extraction import SpeechLMBridgeFeatureExtractor
from speechlm_bridge.modeling.frames import audio_frame_count
from speechlm_bridge.modeling.processing import SpeechLMBridgeProcessor

TAG = "<|audio|>"


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> SpeechLMBridgeProcessor:
    root = tmp_path_factory.mktemp("processor")
    write_demo_backbone(root / "backbone")
    export = root / "export"
    export.mkdir()
    export_tokenizer(root / "backbone", export, audio_locator_tag=TAG)
    SpeechLMBridgeFeatureExtractor(feature_size=80).save_pretrained(export)
    (export / "processor_config.json").write_text(
        '{"processor_class": "SpeechLMBridgeProcessor", "audio_token": "<|audio|>", "subsampling_factor": 8}'
    )
    return AutoProcessor.from_pretrained(export)


def _frames(samples: int) -> int:
    return audio_frame_count(samples, hop_length=160, n_fft=512, subsampling_factor=8)


def test_tag_expanded_to_frame_count(processor):
    audio = np.zeros(24000, dtype=np.float32)
    inputs = processor(text=f"hello {TAG} there", audio=audio, sampling_rate=16000)
    audio_token_id = processor.audio_token_id
    assert _frames(24000) == 19
    assert int((inputs["input_ids"] == audio_token_id).sum()) == 19
    assert inputs["input_features"].shape == (1, 151, 80)
    assert int(inputs["input_features_mask"].sum()) == 150


def test_batch_with_two_audio_lengths(processor):
    audios = [np.ones(8000, dtype=np.float32) * 0.1, np.ones(16000, dtype=np.float32) * 0.1]
    inputs = processor(text=[f"a {TAG}", f"b {TAG} c"], audio=audios, sampling_rate=16000)
    counts = (inputs["input_ids"] == processor.audio_token_id).sum(dim=1).tolist()
    assert counts == [_frames(8000), _frames(16000)]
    assert inputs["input_features"].shape[0] == 2
    assert inputs["input_features_mask"].sum(dim=1).tolist() == [50, 100]
    # Left padding, for generate(); every prompt keeps all its text tokens.
    assert inputs["attention_mask"][0, -1] == 1
    assert inputs["attention_mask"][0, 0] == 0
    assert inputs["attention_mask"].sum(dim=1).tolist() == [
        len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        for text in [f"a {TAG * counts[0]}", f"b {TAG * counts[1]} c"]
    ]


def test_messages_rendered_with_template(processor):
    audio = np.zeros(16000, dtype=np.float32)
    messages = [{"role": "user", "content": f"Transcribe: {TAG}"}]
    from_messages = processor(messages=messages, audio=audio, sampling_rate=16000)
    prompt = processor.render_prompt(messages)
    from_text = processor(text=prompt, audio=audio, sampling_rate=16000)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert torch.equal(from_messages["input_ids"], from_text["input_ids"])


def test_tag_count_mismatch_rejected(processor):
    audio = np.zeros(16000, dtype=np.float32)
    with pytest.raises(ValueError, match=r"contains 2 audio locator tag\(s\).*but 1 audio"):
        processor(text=f"{TAG} and {TAG}", audio=audio, sampling_rate=16000)
    with pytest.raises(ValueError, match=r"contains 1 audio locator tag\(s\).*but 0 audio"):
        processor(text=f"{TAG}", sampling_rate=16000)


def test_stereo_audio_rejected(processor):
    with pytest.raises(ValueError, match="mono"):
        processor(text=[f"{TAG}"], audio=[np.zeros((2, 16000), dtype=np.float32)], sampling_rate=16000)


def test_text_and_messages_exclusive(processor):
    with pytest.raises(ValueError, match="exactly one of text"):
        processor(text="hi", messages=[{"role": "user", "content": "hi"}])


def test_too_short_audio_rejected(processor):
    with pytest.raises(ValueError, match="audio 0 has 100 samples, too short"):
        processor(text=f"{TAG}", audio=np.zeros(100, dtype=np.float32), sampling_rate=16000)


def test_audio_taken_from_content_parts(processor):
    audio = np.sin(np.arange(16000, dtype=np.float32) / 9.0)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Transcribe:"}, {"type": "audio", "audio": audio}]}
    ]
    from_parts = processor(messages=messages, sampling_rate=16000)
    from_text = processor(text=processor.render_prompt(messages), audio=audio, sampling_rate=16000)
    assert torch.equal(from_parts["input_ids"], from_text["input_ids"])
    assert torch.equal(from_parts["input_features"], from_text["input_features"])
    assert int((from_parts["input_ids"] == processor.audio_token_id).sum()) == _frames(16000)


def test_two_dimensional_audio_rejected(processor):
    with pytest.raises(ValueError, match=r"audio has shape \(2, 16000\); pass one mono 1-D array"):
        processor(text=f"{TAG} {TAG}", audio=np.zeros((2, 16000), dtype=np.float32), sampling_rate=16000)
