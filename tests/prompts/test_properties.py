"""Property test: on random dialogs, encode is exact or raises one of the documented errors.

The dialogs mix unicode (combining marks, emoji, CJK), whitespace runs, and snippets that
templates and tokenizers treat specially (<think>, </think>, <|im_start|>, <|im_end|>, the
audio tag). The number of examples is bounded so the file runs in seconds; raise it with
SPEECHLM_BRIDGE_HYPOTHESIS_EXAMPLES to search longer.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechlm_bridge.errors import PromptError
from speechlm_bridge.prompts import ChatFormatter
from tests.prompts.conftest import AUDIO_TAG, assert_exact

MAX_EXAMPLES = int(os.environ.get("SPEECHLM_BRIDGE_HYPOTHESIS_EXAMPLES", "60"))

DOCUMENTED_ERRORS = re.compile(
    "|".join(
        re.escape(fragment)
        for fragment in (
            "the generation prompt is not a prefix",
            "has reasoning_content, but the chat template does not render it",
            "the rendered turn contains the end-of-turn token",
            "audio locator token(s) but messages",
            "audio locator tag(s) '<|audio|>' in its text",
            "the template did not end the turn with its end-of-turn token",
        )
    )
)

SNIPPETS = ["<think>", "</think>", "<|im_start|>", "<|im_end|>", AUDIO_TAG, "\n\n", " ", "\t"]
ALPHABET = st.sampled_from(
    list("abcXYZ019 .,:;!?'\"-\n\t")
    + ["é", "ß", "ü", "日", "本", "🎙", "\u0301", "\u200d", "ﬁ", "Ω"]
)
TEXT = st.lists(
    st.one_of(st.sampled_from(SNIPPETS), st.text(ALPHABET, max_size=6)), max_size=5
).map("".join)


@st.composite
def user_messages(draw) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"role": "user", "content": draw(TEXT)}
    parts = draw(
        st.lists(
            st.one_of(
                TEXT.map(lambda text: {"type": "text", "text": text}),
                st.just({"type": "audio", "audio": "clip.wav"}),
            ),
            min_size=1,
            max_size=3,
        )
    )
    return {"role": "user", "content": parts}


@st.composite
def assistant_messages(draw) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": draw(TEXT)}
    style = draw(st.sampled_from(["plain", "field", "inline"]))
    if style == "field":
        message["reasoning_content"] = draw(TEXT)
    elif style == "inline":
        message["content"] = f"<think>\n{draw(TEXT)}\n</think>\n\n{message['content']}"
    return message


@st.composite
def dialogs(draw) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        messages.append(draw(user_messages()))
        messages.append(draw(assistant_messages()))
    return messages


THINKING = st.sampled_from([{}, {"enable_thinking": True}, {"enable_thinking": False}])
LOSS_ON = st.sampled_from(["last", "all"])


@pytest.mark.parametrize("name", ["qwen3", "qwen2.5", "nemotron-3-nano", "rewrite-history"])
def test_random_dialogs_exact_or_documented(backbones, name):
    entry = backbones[name]
    formatter = ChatFormatter(entry.tokenizer, audio_locator_tag=AUDIO_TAG)

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(messages=dialogs(), kwargs=THINKING, loss_on=LOSS_ON)
    def check(messages, kwargs, loss_on):
        try:
            samples = formatter.encode(messages, loss_on=loss_on, **kwargs)
        except PromptError as err:
            assert DOCUMENTED_ERRORS.search(str(err)), f"undocumented error: {err}"
            return
        assert_exact(entry, messages, samples, loss_on=loss_on, template_kwargs=kwargs)

    check()
