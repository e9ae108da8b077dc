"""NeMo `prompt_format` names mapped to settings of the template-exact formatter.

A NeMo SALM config names a hand-written NeMo `PromptFormatter` (`prompt_format: qwen3`). Here
every chat format name renders with the backbone's own chat template instead, and the name only
chooses the defaults that NeMo's formatter of that name had: which assistant turns carry loss,
and template kwargs such as `enable_thinking`. The generic name is `tokenizer_chat_template`.
The notes say where NeMo's own formatter renders differently from the backbone's template.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from speechlm_bridge.errors import ConfigError

GENERIC_PROMPT_FORMAT = "tokenizer_chat_template"


@dataclass(frozen=True)
class PromptFormatSettings:
    """Formatter defaults for one `prompt_format` name."""

    name: str
    loss_on: str
    """`"last"` or `"all"`: the assistant turns that carry loss by default."""
    template_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    note: str = ""
    """Difference between NeMo's own formatter of this name and the backbone's chat template."""


_ALL_TURNS_NOTE = (
    "NeMo's {name} formatter fills a hand-written template and puts loss on every assistant "
    "turn; here the backbone's chat template renders, with the same loss default."
)

_FORMATS: dict[str, PromptFormatSettings] = {
    settings.name: settings
    for settings in (
        PromptFormatSettings(
            GENERIC_PROMPT_FORMAT, "last", note="The backbone's chat template as is."
        ),
        PromptFormatSettings(
            "qwen",
            "all",
            note=(
                "NeMo's qwen formatter has no system role, never renders the "
                "<think>\\n\\n</think>\\n\\n block that the Qwen3 template puts before the final "
                "answer, and keeps reasoning in history turns; the backbone's template does all "
                "three as serving does. Loss is on every assistant turn, as in NeMo."
            ),
        ),
        PromptFormatSettings(
            "qwen3",
            "last",
            note=(
                "NeMo's qwen3 formatter adds /no_think or /think to a random system or user turn "
                "during training, which the Qwen3 template never does at serving time; that text "
                "is not added here. Loss is on the last assistant turn, as in NeMo."
            ),
        ),
        PromptFormatSettings(
            "qwen3.5",
            "last",
            MappingProxyType({"enable_thinking": False}),
            note="NeMo's qwen3.5 formatter turns thinking off unless asked; so does this default.",
        ),
        PromptFormatSettings(
            "nemotron-nano-v3",
            "last",
            note=(
                "NeMo's nemotron-nano-v3 formatter strips assistant text before adding "
                "<think></think>, while the template trims after adding it, so NeMo's history "
                "turns differ from serving. Loss is on the last assistant turn, as in NeMo."
            ),
        ),
        PromptFormatSettings(
            "nemotron-h",
            "last",
            note="Loss on the last assistant turn, as in NeMo's nemotron-h formatter.",
        ),
        *(
            PromptFormatSettings(name, "all", note=_ALL_TURNS_NOTE.format(name=name))
            for name in ("llama2", "llama3", "gemma", "mistral", "phi2_chat")
        ),
    )
}

# NeMo formatter names that are not chat formats of a causal LM backbone.
_NOT_CHAT_FORMATS = {
    "canary": "the Canary encoder-decoder ASR prompt",
    "canary2": "the Canary encoder-decoder ASR prompt",
    "canary_riva": "the Canary encoder-decoder ASR prompt",
    "t5nmt": "a T5 translation prompt",
    "plain": "plain text without roles",
    "phi2_qa": "a one-shot question/answer prompt without roles",
    "phi2_code": "a code-completion prompt without roles",
}

KNOWN_PROMPT_FORMATS: tuple[str, ...] = tuple(_FORMATS)
NON_CHAT_PROMPT_FORMATS: frozenset[str] = frozenset(_NOT_CHAT_FORMATS)


def resolve_prompt_format(name: str) -> PromptFormatSettings:
    """Return the formatter settings for a NeMo `prompt_format` name (case-insensitive).

    Raises ConfigError for a name that is not a chat format, listing the known names.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key in _FORMATS:
        return _FORMATS[key]
    known = ", ".join(KNOWN_PROMPT_FORMATS)
    if key in _NOT_CHAT_FORMATS:
        raise ConfigError(
            f"prompt_format {name!r} is {_NOT_CHAT_FORMATS[key]}, not a chat format of an LLM "
            f"backbone, so it has no chat template to render; use one of: {known}"
        )
    raise ConfigError(f"unknown prompt_format {name!r}; use one of: {known}")
