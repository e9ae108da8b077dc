"""resolve_prompt_format: NeMo prompt_format names mapped to formatter defaults."""

from __future__ import annotations

import pytest

from speechlm_bridge.errors import ConfigError
from speechlm_bridge.prompts import KNOWN_PROMPT_FORMATS, resolve_prompt_format


@pytest.mark.parametrize(
    ("name", "loss_on", "template_kwargs"),
    [
        ("tokenizer_chat_template", "last", {}),
        ("qwen", "all", {}),
        ("qwen3", "last", {}),
        ("qwen3.5", "last", {"enable_thinking": False}),
        ("nemotron-nano-v3", "last", {}),
        ("nemotron-h", "last", {}),
        ("llama3", "all", {}),
        ("gemma", "all", {}),
        ("mistral", "all", {}),
    ],
)
def test_prompt_format_defaults(name, loss_on, template_kwargs):
    settings = resolve_prompt_format(name)
    assert settings.name == name
    assert settings.loss_on == loss_on
    assert dict(settings.template_kwargs) == template_kwargs
    assert settings.note


def test_prompt_format_case_insensitive():
    assert resolve_prompt_format(" Qwen3 ").name == "qwen3"


def test_unknown_prompt_format_lists_known():
    with pytest.raises(ConfigError, match="unknown prompt_format 'chatml'; use one of: ") as caught:
        resolve_prompt_format("chatml")
    for name in KNOWN_PROMPT_FORMATS:
        assert name in str(caught.value)


def test_encoder_decoder_format_rejected():
    with pytest.raises(ConfigError, match="'canary2' is the Canary encoder-decoder ASR prompt"):
        resolve_prompt_format("canary2")
