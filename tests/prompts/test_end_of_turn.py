"""find_end_of_turn_token: the token that ends an assistant turn, which is not always eos."""

from __future__ import annotations

import copy

import pytest

from speechlm_bridge.errors import PromptError
from speechlm_bridge.prompts import ChatFormatter, find_end_of_turn_token
from tests.prompts.conftest import ALL_BACKBONES


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_end_of_turn_per_template(backbones, name):
    entry = backbones[name]
    assert find_end_of_turn_token(entry.tokenizer) == entry.end_of_turn


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_end_of_turn_with_kwargs(backbones, enable_thinking):
    tokenizer = backbones["nemotron-3-nano"].tokenizer
    assert find_end_of_turn_token(tokenizer, enable_thinking=enable_thinking) == "<|im_end|>"


def test_end_of_turn_not_eos(backbones):
    tokenizer = backbones["llama3-like"].tokenizer
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert find_end_of_turn_token(tokenizer) == "<|eot_id|>"


def test_formatter_caches_end_of_turn(backbones):
    formatter = ChatFormatter(backbones["gemma-like"].tokenizer)
    assert formatter.end_of_turn_token() == "<end_of_turn>"
    assert formatter.end_of_turn_token() == "<end_of_turn>"


def test_plain_text_end_rejected(backbones):
    tokenizer = copy.deepcopy(backbones["qwen2.5"].tokenizer)
    tokenizer.chat_template = (
        "{%- for m in messages -%}{{- m.role ~ ': ' ~ m.content ~ '\\n\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"
    )
    with pytest.raises(
        PromptError, match=r"no special token \(text after the assistant content: '\\n\\n'\)"
    ):
        find_end_of_turn_token(tokenizer)


def test_no_template_rejected(backbones):
    tokenizer = copy.deepcopy(backbones["qwen2.5"].tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(PromptError, match="has no chat template"):
        find_end_of_turn_token(tokenizer)
