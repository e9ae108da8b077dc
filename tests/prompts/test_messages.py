"""normalize_dialog: content parts joined with one space, audio parts as the locator tag."""

from __future__ import annotations

import copy

import pytest

from speechlm_bridge.errors import PromptError

from speechlm_bridge.prompts.messages import normalize_dialog

TAG = "<|audio|>"


def test_parts_joined_with_space():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Transcribe:"}, {"type": "audio"}]},
        {"role": "assistant", "content": "ok"},
    ]
    dialog = normalize_dialog(messages, audio_locator_tag=TAG)
    assert dialog.messages[0]["content"] == "Transcribe: <|audio|>"
    assert dialog.audio_counts == [1, 0]
    assert dialog.assistant_indices == [1]


def test_all_audio_part_types():
    parts = [{"type": "audio"}, {"type": "input_audio"}, {"type": "audio_url"}]
    dialog = normalize_dialog([{"role": "user", "content": parts}], audio_locator_tag=TAG)
    assert dialog.messages[0]["content"] == "<|audio|> <|audio|> <|audio|>"
    assert dialog.audio_counts == [3]


def test_tag_in_text_counted():
    messages = [{"role": "user", "content": f"A: {TAG} B: {TAG}"}]
    assert normalize_dialog(messages, audio_locator_tag=TAG).audio_counts == [2]


def test_other_fields_kept_and_input_unchanged():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
    ]
    before = copy.deepcopy(messages)
    dialog = normalize_dialog(messages, audio_locator_tag=None)
    assert messages == before
    assert dialog.messages[1]["tool_calls"] == [{"function": {"name": "f"}}]
    assert dialog.messages[1]["content"] is None


def test_tag_in_text_skips_part_tag():
    # The form of a vLLM request: the tag in the text, the audio part carries the data.
    dialog = normalize_dialog(
        [{"role": "user", "content": [{"type": "text", "text": "Transcribe: <|audio|>"}, {"type": "input_audio"}]}],
        audio_locator_tag="<|audio|>",
    )
    assert dialog.messages[0]["content"] == "Transcribe: <|audio|>"
    assert dialog.audio_counts == [1]


def test_tags_in_text_not_matching_audio_parts_raise():
    parts = [
        {"type": "text", "text": "first <|audio|>"},
        {"type": "audio"},
        {"type": "audio"},
    ]
    with pytest.raises(PromptError, match=r"message 0 has 2 audio part\(s\) and 1 audio locator tag"):
        normalize_dialog([{"role": "user", "content": parts}], audio_locator_tag="<|audio|>")
