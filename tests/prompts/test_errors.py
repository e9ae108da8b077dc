"""Every documented PromptError: the message names the turn and the fix."""

from __future__ import annotations

import copy

import pytest

from speechlm_bridge.errors import PromptError
from speechlm_bridge.prompts import ChatFormatter
from tests.prompts.conftest import AUDIO_TAG

HI = {"role": "user", "content": "Hi"}
HELLO = {"role": "assistant", "content": "Hello."}


@pytest.fixture(scope="module")
def qwen3(backbones):
    return ChatFormatter(backbones["qwen3"].tokenizer, audio_locator_tag=AUDIO_TAG)


def test_no_chat_template(backbones):
    tokenizer = copy.deepcopy(backbones["qwen2.5"].tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(PromptError, match="has no chat template.*set tokenizer.chat_template"):
        ChatFormatter(tokenizer)


def test_unknown_role(qwen3):
    with pytest.raises(PromptError, match="message 1 has unknown role 'narrator'; use one of"):
        qwen3.encode([HI, {"role": "narrator", "content": "..."}, HELLO])


def test_empty_dialog(qwen3):
    with pytest.raises(PromptError, match="empty dialog"):
        qwen3.encode([])


def test_dialog_not_a_list(qwen3):
    with pytest.raises(PromptError, match="must be a list of messages, got dict"):
        qwen3.encode({"role": "user", "content": "Hi"})


def test_no_assistant_turn(qwen3):
    with pytest.raises(PromptError, match=r"no assistant message \(roles: system, user\)"):
        qwen3.encode([{"role": "system", "content": "Be brief."}, HI])


def test_assistant_first(qwen3):
    with pytest.raises(PromptError, match="assistant turn 0 is the first message"):
        qwen3.encode([HELLO, HI, HELLO], loss_on="all")


def test_audio_count_mismatch(qwen3):
    dialog = [
        {
            "role": "user",
            "content": [{"type": "audio"}, {"type": "text", "text": "and"}, {"type": "audio"}],
        },
        HELLO,
    ]
    with pytest.raises(
        PromptError, match=r"2 audio locator\(s\) \(message 0: 2\) but 3 audio input\(s\)"
    ):
        qwen3.encode(dialog, audios_count=3)


def test_audio_part_without_tag(backbones):
    formatter = ChatFormatter(backbones["qwen2.5"].tokenizer)
    dialog = [{"role": "user", "content": [{"type": "audio"}]}, HELLO]
    with pytest.raises(
        PromptError, match="message 0, content part 0 is an audio part but no audio"
    ):
        formatter.encode(dialog)


def test_audio_tag_not_a_token(backbones):
    with pytest.raises(PromptError, match="'<|speech|>' is not a single added token"):
        ChatFormatter(backbones["qwen2.5"].tokenizer, audio_locator_tag="<|speech|>")


def test_unsupported_part_type(qwen3):
    dialog = [{"role": "user", "content": [{"type": "image_url", "image_url": "x.png"}]}, HELLO]
    with pytest.raises(PromptError, match="message 0, content part 0 has type 'image_url'"):
        qwen3.encode(dialog)


def test_content_missing(qwen3):
    with pytest.raises(PromptError, match=r"message 0 \(user\) has no content"):
        qwen3.encode([{"role": "user"}, HELLO])


def test_prefix_mismatch_shows_both(qwen3):
    dialog = [HI, {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."}]
    with pytest.raises(PromptError) as caught:
        qwen3.encode(dialog, enable_thinking=False)
    message = str(caught.value)
    assert message.startswith("assistant turn 1: the generation prompt is not a prefix")
    assert "differ at character 60" in message
    assert "generation prompt: ...'" in message
    assert r"<think>\n\n</think>\n\n'" in message
    assert r"rendered dialog:   ...'" in message
    assert r"<think>\nGreet.\n</think>\n\nHello.<|im_end|>\n'" in message
    assert "enable_thinking=False give the turn no reasoning" in message


def test_end_of_turn_in_content(qwen3):
    dialog = [HI, {"role": "assistant", "content": "Hello.<|im_end|>more"}]
    with pytest.raises(
        PromptError, match="assistant turn 1: the rendered turn contains the end-of-turn"
    ):
        qwen3.encode(dialog)


def test_template_raises(backbones):
    formatter = ChatFormatter(backbones["gemma-like"].tokenizer)
    dialog = [HI, {"role": "user", "content": "Again"}, HELLO]
    with pytest.raises(
        PromptError,
        match="assistant turn 2: the chat template failed to render.*roles must alternate",
    ):
        formatter.encode(dialog)


def test_dropped_reasoning(backbones):
    formatter = ChatFormatter(backbones["qwen2.5"].tokenizer)
    dialog = [HI, {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."}]
    with pytest.raises(PromptError, match="assistant turn 1 has reasoning_content, but the chat"):
        formatter.encode(dialog)


def test_template_drops_audio(backbones):
    tokenizer = copy.deepcopy(backbones["qwen2.5"].tokenizer)
    # Renders only user and assistant messages: audio in a system message disappears.
    tokenizer.chat_template = (
        "{%- for m in messages if m.role != 'system' -%}"
        "{{- '<|im_start|>' ~ m.role ~ '\\n' ~ m.content ~ '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )
    formatter = ChatFormatter(tokenizer, audio_locator_tag=AUDIO_TAG)
    dialog = [{"role": "system", "content": f"Context: {AUDIO_TAG}"}, HI, HELLO]
    with pytest.raises(
        PromptError, match=r"assistant turn 2: the rendered sample has 0 audio locator token\(s\)"
    ):
        formatter.encode(dialog, audios_count=1)


def test_invalid_loss_on(qwen3):
    with pytest.raises(PromptError, match="loss_on must be one of last, all, got 'first'"):
        qwen3.encode([HI, HELLO], loss_on="first")


def test_reserved_template_kwarg(qwen3):
    with pytest.raises(PromptError, match="add_generation_prompt are set by the formatter itself"):
        qwen3.encode([HI, HELLO], add_generation_prompt=True)


def test_reasoning_on_user(qwen3):
    with pytest.raises(PromptError, match=r"message 0 \(user\) has reasoning_content"):
        qwen3.encode([{**HI, "reasoning_content": "x"}, HELLO])
