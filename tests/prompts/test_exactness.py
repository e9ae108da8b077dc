"""The exactness invariants over a table of dialogs, on every fixture and hand-written template.

Every (template, dialog, enable_thinking, loss_on) combination either satisfies all invariants
(checked by `assert_exact` against transformers' own rendering) or raises the documented
PromptError listed in `expected_error`.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from speechlm_bridge.errors import PromptError
from speechlm_bridge.prompts import ChatFormatter
from tests.prompts.conftest import ALL_BACKBONES, AUDIO_TAG, assert_exact

AUDIO_PART = {"type": "audio", "audio": "clip.wav"}

DIALOGS: dict[str, list[dict[str, Any]]] = {
    "single": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    "system": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Now backwards."},
        {"role": "assistant", "content": "Three, two, one."},
    ],
    "reasoning_field": [
        {"role": "user", "content": "Is 91 prime?"},
        {
            "role": "assistant",
            "content": "No, 91 = 7 x 13.",
            "reasoning_content": "Try 7: 7*13=91.",
        },
    ],
    "reasoning_in_content": [
        {"role": "user", "content": "Is 97 prime?"},
        {
            "role": "assistant",
            "content": "<think>\nCheck 2, 3, 5, 7.\n</think>\n\nYes, 97 is prime.",
        },
    ],
    "empty_think": [
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nYes."},
    ],
    "reasoning_history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
        {"role": "user", "content": "Times 3?"},
        {"role": "assistant", "content": "12", "reasoning_content": "Four times three is twelve."},
    ],
    "audio_parts": [
        {"role": "system", "content": "You transcribe speech."},
        {"role": "user", "content": [{"type": "text", "text": "Transcribe:"}, AUDIO_PART]},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": [AUDIO_PART, {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": "the quick brown fox"},
    ],
    "audio_tag_in_text": [
        {"role": "user", "content": f"Transcribe the following: {AUDIO_TAG}"},
        {"role": "assistant", "content": "zażółć gęślą jaźń"},
    ],
    "unicode": [
        {"role": "user", "content": "Übersetze: 日本語のテキスト 🎙️ naïve"},
        # "e" + COMBINING ACUTE is not NFC, so the tokenizer's NFC normalizer composes it.
        {"role": "assistant", "content": "Japanese text — café\u0301 ﬁ ✓ 🎧"},
    ],
    "whitespace": [
        {"role": "user", "content": "  padded question\t\n"},
        {"role": "assistant", "content": "\n\n  leading and trailing whitespace  \n\n"},
    ],
}

AUDIO_COUNTS = {"audio_parts": 2, "audio_tag_in_text": 1}

THINKING = {"unset": {}, "on": {"enable_thinking": True}, "off": {"enable_thinking": False}}

PREFIX_ERROR = "generation prompt is not a prefix"
DROPPED_REASONING = "does not render it"
HAS_REASONING = {"reasoning_field", "reasoning_in_content", "reasoning_history"}


def expected_error(backbone: str, dialog: str, thinking: str) -> str | None:
    """Return the documented error for a combination that cannot be encoded exactly, else None."""
    has_reasoning = dialog in HAS_REASONING
    if backbone == "qwen3" and thinking == "off" and has_reasoning:
        # The generation prompt closes an empty <think> block, so reasoning cannot follow it.
        return PREFIX_ERROR
    if backbone == "nemotron-3-nano":
        if thinking == "off" and (has_reasoning or dialog == "empty_think"):
            # The prompt ends "<think></think>", so a turn with its own think block cannot follow.
            return PREFIX_ERROR
        if thinking != "off" and not has_reasoning and dialog != "empty_think":
            # The prompt opens "<think>\n", but a turn without reasoning renders "<think></think>".
            return PREFIX_ERROR
    if backbone in {"qwen2.5", "llama3-like", "gemma-like", "dated-system"}:
        if dialog in {"reasoning_field", "reasoning_history"}:
            return DROPPED_REASONING
    return None


CASES = [
    pytest.param(
        backbone, dialog, thinking, loss_on, id=f"{backbone}-{dialog}-{thinking}-{loss_on}"
    )
    for backbone in ALL_BACKBONES
    for dialog in DIALOGS
    for thinking in THINKING
    for loss_on in ("last", "all")
]


@pytest.mark.parametrize(("backbone", "dialog", "thinking", "loss_on"), CASES)
def test_dialog_table_exact(backbones, backbone, dialog, thinking, loss_on):
    entry = backbones[backbone]
    formatter = ChatFormatter(entry.tokenizer, audio_locator_tag=AUDIO_TAG)
    messages = DIALOGS[dialog]
    kwargs = THINKING[thinking]
    error = expected_error(backbone, dialog, thinking)

    if error is not None:
        with pytest.raises(PromptError, match=re.escape(error)):
            formatter.encode(
                messages, loss_on=loss_on, audios_count=AUDIO_COUNTS.get(dialog), **kwargs
            )
        return
    samples = formatter.encode(
        messages, loss_on=loss_on, audios_count=AUDIO_COUNTS.get(dialog), **kwargs
    )
    assert_exact(entry, messages, samples, loss_on=loss_on, template_kwargs=kwargs)
