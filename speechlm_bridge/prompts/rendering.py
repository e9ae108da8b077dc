"""Rendering a dialog with the tokenizer's chat template, and tokenizing it the way serving does.

The serving rule, in one place: the prompt is
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)`,
tokenized with `add_special_tokens=False`. vLLM's chat endpoint tokenizes the rendered prompt
without adding special tokens (its `add_special_tokens` request field defaults to False), and
`apply_chat_template(tokenize=True)` does the same, because a template that wants a BOS token
renders its text (`{{ bos_token }}`). Adding special tokens on top would double the BOS.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2

from speechlm_bridge.errors import PromptError
from speechlm_bridge.prompts.messages import normalize_dialog

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# apply_chat_template arguments that the formatter sets itself. A template kwarg with one of
# these names would silently change what is rendered.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "padding",
        "truncation",
        "max_length",
        "chat_template",
    }
)

# Content of the assistant turn in the probe dialog of find_end_of_turn_token: plain lowercase
# letters, which no template rewrites and no tokenizer merges with the template text around it.
_PROBE_ANSWER = "speechlmbridgeprobeanswer"
_PROBE_QUESTION = "speechlmbridgeprobequestion"


def serving_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    audio_locator_tag: str | None = None,
    **template_kwargs: Any,
) -> list[int]:
    """Return the token ids that serving feeds the model for `messages`.

    The dialog is rendered with the generation prompt and tokenized without adding special
    tokens (see the module docstring). Audio content parts become `audio_locator_tag`, which
    defaults to the tokenizer's `audio_token` when it has one.
    """
    text = serving_prompt_text(
        tokenizer, messages, audio_locator_tag=audio_locator_tag, **template_kwargs
    )
    return tokenize_rendered(tokenizer, [text])[0]


def serving_prompt_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    audio_locator_tag: str | None = None,
    **template_kwargs: Any,
) -> str:
    """Render `messages` with the generation prompt, as serving does, before tokenization.

    Content parts are joined as in training (see `speechlm_bridge.prompts.messages`).
    """
    check_chat_template(tokenizer)
    check_template_kwargs(template_kwargs)
    tag = audio_locator_tag or getattr(tokenizer, "audio_token", None)
    dialog = normalize_dialog(messages, audio_locator_tag=tag)
    return render_chat(
        tokenizer, dialog.messages, add_generation_prompt=True, template_kwargs=template_kwargs
    )


def find_end_of_turn_token(tokenizer: PreTrainedTokenizerBase, **template_kwargs: Any) -> str:
    """Return the text of the special token that ends an assistant turn in this chat template.

    A one-turn probe dialog is rendered, and the first special token after the assistant's
    content is returned: `<|im_end|>` for ChatML templates, `<|eot_id|>` for Llama 3,
    `<end_of_turn>` for Gemma. It is not always `eos_token`. Raises PromptError when the
    template emits no special token after the assistant content.
    """
    check_chat_template(tokenizer)
    probe = [
        {"role": "user", "content": _PROBE_QUESTION},
        {"role": "assistant", "content": _PROBE_ANSWER},
    ]
    text = render_chat(
        tokenizer, probe, add_generation_prompt=False, template_kwargs=template_kwargs
    )
    position = text.rfind(_PROBE_ANSWER)
    if position < 0:
        raise PromptError(
            "the chat template dropped the assistant content of a one-turn probe dialog "
            f"(rendered: {text!r}), so the end of an assistant turn cannot be located; check "
            "that the template renders assistant messages"
        )
    suffix = text[position + len(_PROBE_ANSWER) :]

    special_ids = special_token_ids(tokenizer)
    for token_id in tokenize_rendered(tokenizer, [suffix])[0]:
        if token_id in special_ids:
            return tokenizer.convert_ids_to_tokens(token_id)
    raise PromptError(
        "the chat template ends an assistant turn with no special token (text after the "
        f"assistant content: {suffix!r}), so a trained model has no token to stop on; add the "
        "end-of-turn text to the tokenizer as a special token, or use a template that ends "
        "assistant turns with one (such as <|im_end|> or <|eot_id|>)"
    )


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise PromptError when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return
    source = getattr(tokenizer, "name_or_path", "") or "this tokenizer"
    raise PromptError(
        f"{source} has no chat template, so there is nothing to render dialogs with; load the "
        "backbone's instruct tokenizer (its tokenizer_config.json or chat_template.jinja holds "
        "the template) or set tokenizer.chat_template to the template serving uses"
    )


def check_template_kwargs(template_kwargs: Mapping[str, Any]) -> None:
    """Raise PromptError for template kwargs that collide with the formatter's own arguments."""
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs))
    if reserved:
        raise PromptError(
            f"template kwargs {', '.join(reserved)} are set by the formatter itself; remove them "
            "(pass only variables the chat template reads, such as enable_thinking or tools)"
        )


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    template_kwargs: Mapping[str, Any],
) -> str:
    """Render messages with the tokenizer's chat template, as serving does, without tokenizing.

    Template errors (a `raise_exception` in the template, an undefined variable, a type error
    on a message field) become PromptError. A template kwarg the template never reads is logged
    as a warning once, because it has no effect and is most often a misspelling.
    """
    _warn_unused_template_kwargs(tokenizer.chat_template, template_kwargs)
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
        IndexError,
    ) as err:
        prompt_mode = "with" if add_generation_prompt else "without"
        raise PromptError(
            f"the chat template failed to render messages 0..{len(messages) - 1} {prompt_mode} the "
            f"generation prompt: {type(err).__name__}: {err}; check that the dialog has the roles, "
            "order and fields this template expects"
        ) from err


def tokenize_rendered(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Tokenize rendered template text without adding special tokens (the serving rule)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Return the ids of all special tokens, including added tokens marked special.

    `all_special_ids` misses added tokens that `add_special_tokens` dropped from the named
    lists, while `added_tokens_decoder` keeps their `special` flag.
    """
    ids = set(tokenizer.all_special_ids)
    ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(ids)


_warned_unused: set[tuple[str, str]] = set()


def _warn_unused_template_kwargs(chat_template: Any, template_kwargs: Mapping[str, Any]) -> None:
    if not template_kwargs or not isinstance(chat_template, str):
        return
    variables = _template_variables(chat_template)
    if variables is None:
        return
    for name in template_kwargs:
        key = (chat_template, name)
        if name not in variables and key not in _warned_unused:
            _warned_unused.add(key)
            read = sorted(v for v in variables if v not in ("messages", "add_generation_prompt"))
            logger.warning(
                "template kwarg %r is not read by this chat template, so it has no effect; check the "
                "spelling (the template reads: %s)",
                name,
                ", ".join(read) or "nothing",
            )


@functools.lru_cache(maxsize=32)
def _template_variables(chat_template: str) -> frozenset[str] | None:
    # Parsed once per template, because render_chat runs twice per trained turn. transformers'
    # helper parses with the extensions its chat templates use. It is private in transformers
    # 5.19, so a missing helper only skips the warning.
    try:
        from transformers.utils.chat_template_utils import _get_template_variables

        return _get_template_variables(chat_template)
    except Exception:  # noqa: BLE001 - the warning is advisory, rendering must not fail on it
        return None
