r"""Template-exact training samples: the answer is what the template renders after the prompt.

For the assistant message at index `k` of a dialog:

    prompt = render(messages[:k], add_generation_prompt=True)      # what serving sends
    full = render(messages[: k + 1], add_generation_prompt=False)  # the turn as the template has it
    answer = full[len(prompt):], cut right after the end-of-turn token

    context_ids = tokenize(prompt)                                 # equal to serving
    answer_ids = tokenize(prompt + answer)[len(context_ids):]      # or tokenize(answer), see below

    <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n | <think>\n\n</think>\n\nhi<|im_end|> | \n
    context_ids (loss_mask False)                      | answer_ids (loss_mask True)    | dropped

No `{% generation %}` tags are needed: the mask comes from the two renders. `prompt` must be a
prefix of `full`, otherwise no answer can follow what serving sends and PromptError shows both
strings where they differ.

BPE boundary. When the tokenizer merges characters across the end of the prompt (a prompt ending
in "\n" and an answer starting with "\n" give one "\n\n" token), `tokenize(prompt + answer)`
does not start with `context_ids`. The context stays the serving prompt, and `answer_ids` are the
answer text tokenized on its own, the tokens a model emits when it starts right after the prompt.

Loss on all turns. Turns are packed into as few samples as exactness allows: the next turn joins
the current sample when its serving prompt starts with the sample's tokens. Templates that
rewrite history (Qwen3 drops the `<think>` block of earlier turns, Nemotron replaces their
reasoning with `<think></think>`) break that chain, and a new sample starts, so each sample is
exact for every span in it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speechlm_bridge.errors import ConfigError, PromptError
from speechlm_bridge.prompts.formats import GENERIC_PROMPT_FORMAT, resolve_prompt_format
from speechlm_bridge.prompts.messages import Dialog, check_audio_count, normalize_dialog
from speechlm_bridge.prompts.rendering import (
    check_chat_template,
    check_template_kwargs,
    find_end_of_turn_token,
    render_chat,
    tokenize_rendered,
)
from speechlm_bridge.prompts.sample import LossSpan, TrainingSample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

LOSS_ON_CHOICES = ("last", "all")
ON_ERROR_CHOICES = ("raise", "skip")

# Characters of context shown on each side of the first difference in a prefix error.
_DIFF_CONTEXT_CHARS = 40


class ChatFormatter:
    """Encode dialogs in the OpenAI chat format into exact training samples for one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        audio_locator_tag: text of the special token that marks where an audio input goes
            (`<|audio|>`). Defaults to the tokenizer's `audio_token`, if any. It must be a single
            token of the tokenizer.
        template_kwargs: variables passed to the chat template on every render
            (`enable_thinking`, `tools`, `date_string`, ...); `encode` kwargs override them.
        loss_on: default for `encode`: `"last"` assistant turn or `"all"` of them.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        audio_locator_tag: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        loss_on: str = "last",
    ) -> None:
        check_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        check_template_kwargs(self.template_kwargs)
        self.loss_on = _check_loss_on(loss_on)
        self.audio_locator_tag = audio_locator_tag or getattr(tokenizer, "audio_token", None)
        self.audio_locator_id = (
            _single_token_id(tokenizer, self.audio_locator_tag) if self.audio_locator_tag else None
        )
        self._end_of_turn_cache: dict[str, tuple[str, int]] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        prompt_format: str | None = None,
        audio_locator_tag: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        loss_on: str | None = None,
        **tokenizer_kwargs: Any,
    ) -> ChatFormatter:
        """Build a formatter from a tokenizer directory or an exported speech-LLM directory.

        An exported directory's `config.json` may name `prompt_format` and `audio_locator_tag`
        (as NeMo configs do); explicit arguments win over it. `prompt_format` sets the
        defaults for `loss_on` and `template_kwargs` (see `resolve_prompt_format`).
        """
        from transformers import AutoTokenizer

        directory = Path(path)
        if not directory.is_dir():
            raise ConfigError(
                f"tokenizer directory {directory} does not exist or is not a directory; pass the "
                "folder that holds tokenizer.json and tokenizer_config.json"
            )
        config = _read_speech_config(directory)
        settings = resolve_prompt_format(
            prompt_format or config.get("prompt_format") or GENERIC_PROMPT_FORMAT
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), **tokenizer_kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"could not load a tokenizer from {directory}: {err}; the directory needs "
                "tokenizer.json (or the backbone's vocabulary files) and tokenizer_config.json"
            ) from err
        tag = audio_locator_tag or config.get("audio_locator_tag")
        if tag and tag not in tokenizer.get_added_vocab():
            # A backbone tokenizer lacks the tag until training adds it. NeMo appends it as a
            # special token after the vocabulary, so it is registered the same way here.
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(tag, special=True, normalized=False)], special_tokens=True)
            logger.info("registered audio locator tag %r as id %d", tag, tokenizer.convert_tokens_to_ids(tag))
        return cls(
            tokenizer,
            audio_locator_tag=tag,
            template_kwargs={**settings.template_kwargs, **(template_kwargs or {})},
            loss_on=loss_on or settings.loss_on,
        )

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        loss_on: str | None = None,
        audios_count: int | None = None,
        **template_kwargs: Any,
    ) -> list[TrainingSample]:
        """Encode one dialog into one or more exact training samples.

        `loss_on="last"` gives one sample for the last assistant message. `loss_on="all"` puts
        loss on every assistant message and gives one sample, or several when the template
        rewrites history (see the module docstring). `audios_count`, when given, must equal the
        number of audio locators in the dialog. Raises PromptError naming the message index.
        """
        rendered = self._render_dialog(messages, loss_on, audios_count, template_kwargs)
        token_ids = tokenize_rendered(self.tokenizer, rendered.texts())
        return self._assemble(rendered, token_ids, dialog_index=None)

    def encode_batch(
        self,
        dialogs: Iterable[Sequence[Mapping[str, Any]] | Mapping[str, Any]],
        *,
        loss_on: str | None = None,
        audios_counts: Sequence[int | None] | None = None,
        on_error: str = "raise",
        **template_kwargs: Any,
    ) -> list[TrainingSample]:
        """Encode many dialogs with one batched tokenizer call; samples carry their `dialog_index`.

        Each dialog is a list of messages or `{"messages": [...], "kwargs": {...}}`, whose
        kwargs override `template_kwargs` for that dialog. `audios_counts[i]` is checked against
        dialog `i`. With `on_error="raise"` the first invalid dialog raises PromptError naming
        its index; with `"skip"` it is logged at WARNING and left out.
        """
        if on_error not in ON_ERROR_CHOICES:
            raise PromptError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        dialogs = list(dialogs)
        if audios_counts is not None and len(audios_counts) != len(dialogs):
            raise PromptError(
                f"audios_counts has {len(audios_counts)} entries for {len(dialogs)} dialogs; pass "
                "one count (or None) per dialog"
            )

        # 1. Render every dialog. Errors are caught per dialog, so one bad dialog stops no other.
        rendered_dialogs: list[tuple[int, _RenderedDialog]] = []
        for index, item in enumerate(dialogs):
            try:
                messages, dialog_kwargs = split_dialog_item(item)
                audios_count = audios_counts[index] if audios_counts is not None else None
                rendered = self._render_dialog(
                    messages, loss_on, audios_count, {**template_kwargs, **dialog_kwargs}
                )
            except PromptError as err:
                _handle_dialog_error(index, err, on_error)
                continue
            rendered_dialogs.append((index, rendered))

        # 2. Tokenize all texts at once: the Rust tokenizer encodes a batch in parallel.
        texts = [text for _, rendered in rendered_dialogs for text in rendered.texts()]
        all_token_ids = tokenize_rendered(self.tokenizer, texts)

        # 3. Cut the token lists back into dialogs and assemble samples.
        samples: list[TrainingSample] = []
        offset = 0
        for index, rendered in rendered_dialogs:
            count = len(rendered.texts())
            token_ids = all_token_ids[offset : offset + count]
            offset += count
            try:
                samples.extend(self._assemble(rendered, token_ids, dialog_index=index))
            except PromptError as err:
                _handle_dialog_error(index, err, on_error)
        return samples

    def end_of_turn_token(self, **template_kwargs: Any) -> str:
        """Return the token text that ends an assistant turn (see `find_end_of_turn_token`)."""
        return self._end_of_turn({**self.template_kwargs, **template_kwargs})[0]

    # -- rendering (text only) ------------------------------------------------------------------

    def _render_dialog(
        self,
        messages: Any,
        loss_on: str | None,
        audios_count: int | None,
        template_kwargs: Mapping[str, Any],
    ) -> _RenderedDialog:
        loss_on = _check_loss_on(loss_on or self.loss_on)
        kwargs = {**self.template_kwargs, **template_kwargs}
        check_template_kwargs(kwargs)
        dialog = normalize_dialog(messages, audio_locator_tag=self.audio_locator_tag)
        check_audio_count(dialog, audios_count)

        assistant_indices = dialog.assistant_indices
        if not assistant_indices:
            roles = ", ".join(message["role"] for message in dialog.messages)
            raise PromptError(
                f"the dialog has no assistant message (roles: {roles}), so there is no answer to "
                f"put loss on (loss_on={loss_on!r}); end the dialog with the assistant message to "
                "train on, or use serving_prompt_ids for a prompt without an answer"
            )
        trained = assistant_indices[-1:] if loss_on == "last" else assistant_indices

        end_of_turn, end_of_turn_id = self._end_of_turn(kwargs)
        turns = [self._render_turn(dialog, index, end_of_turn, kwargs) for index in trained]
        return _RenderedDialog(dialog, turns, end_of_turn, end_of_turn_id)

    def _render_turn(
        self, dialog: Dialog, index: int, end_of_turn: str, kwargs: Mapping[str, Any]
    ) -> _RenderedTurn:
        if index == 0:
            raise PromptError(
                "assistant turn 0 is the first message of the dialog, so its serving prompt would "
                "be empty; start the dialog with a system or user message"
            )
        messages = dialog.messages
        try:
            prompt = render_chat(
                self.tokenizer, messages[:index], add_generation_prompt=True, template_kwargs=kwargs
            )
            full = render_chat(
                self.tokenizer,
                messages[: index + 1],
                add_generation_prompt=False,
                template_kwargs=kwargs,
            )
        except PromptError as err:
            raise PromptError(f"assistant turn {index}: {err}") from err
        if not full.startswith(prompt):
            raise PromptError(_prefix_mismatch_message(index, prompt, full))

        # The answer runs through the end-of-turn token. Template text after it (the "\n" after
        # <|im_end|>) belongs to no turn and is left out.
        rendered_turn = full[len(prompt) :]
        occurrences = rendered_turn.count(end_of_turn)
        if occurrences == 0:
            raise PromptError(
                f"assistant turn {index}: the template did not end the turn with its end-of-turn "
                f"token {end_of_turn!r} (rendered turn: {rendered_turn!r}), so the answer has no "
                "end to train on; this template cannot be trained on exactly for this turn"
            )
        if occurrences > 1:
            raise PromptError(
                f"assistant turn {index}: the rendered turn contains the end-of-turn token "
                f"{end_of_turn!r} {occurrences} times ({rendered_turn!r}); the served model stops "
                f"at the first one, so remove {end_of_turn!r} from the message's content"
            )
        answer = rendered_turn[: rendered_turn.index(end_of_turn) + len(end_of_turn)]

        reasoning = (messages[index].get("reasoning_content") or "").strip()
        if reasoning and reasoning not in answer:
            raise PromptError(
                f"assistant turn {index} has reasoning_content, but the chat template does not "
                f"render it (rendered turn: {answer!r}); training would silently drop the "
                "reasoning, so remove reasoning_content or use a template that renders it"
            )
        return _RenderedTurn(turn_index=index, prompt=prompt, answer=answer)

    # -- tokens ---------------------------------------------------------------------------------

    def _assemble(
        self,
        rendered: _RenderedDialog,
        token_ids: list[list[int]],
        *,
        dialog_index: int | None,
    ) -> list[TrainingSample]:
        samples: list[TrainingSample] = []
        input_ids: list[int] | None = None
        spans: list[LossSpan] = []
        for position, turn in enumerate(rendered.turns):
            context = token_ids[2 * position]
            joint = token_ids[2 * position + 1]
            answer = self._answer_ids(turn, context, joint, rendered.end_of_turn_id)

            # A turn joins the current sample only when its serving prompt starts with every
            # token of that sample. Otherwise the template rewrote history, and a sample starts.
            if input_ids is not None and context[: len(input_ids)] == input_ids:
                spans.append(LossSpan(turn.turn_index, len(context), len(context) + len(answer)))
            else:
                if input_ids is not None:
                    samples.append(self._finish(rendered.dialog, input_ids, spans, dialog_index))
                    logger.debug(
                        "assistant turn %d starts a new sample: the template renders earlier "
                        "turns differently in its serving prompt",
                        turn.turn_index,
                    )
                spans = [LossSpan(turn.turn_index, len(context), len(context) + len(answer))]
            input_ids = context + answer
        assert input_ids is not None  # _render_dialog always yields at least one turn
        samples.append(self._finish(rendered.dialog, input_ids, spans, dialog_index))
        return samples

    def _answer_ids(
        self, turn: _RenderedTurn, context: list[int], joint: list[int], end_of_turn_id: int
    ) -> list[int]:
        if joint[: len(context)] == context:
            answer = joint[len(context) :]
        else:
            # The tokenizer merged characters across the end of the prompt: keep the serving
            # context and tokenize the answer on its own.
            answer = tokenize_rendered(self.tokenizer, [turn.answer])[0]

        if not answer or answer[-1] != end_of_turn_id:
            raise PromptError(
                f"assistant turn {turn.turn_index}: the answer tokens do not end with the "
                f"end-of-turn token id {end_of_turn_id}; the tokenizer splits special tokens "
                "(split_special_tokens=True?), so load it with split_special_tokens=False"
            )
        decoded = self.tokenizer.decode(
            answer, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if self._normalize(decoded) != self._normalize(turn.answer):
            raise PromptError(
                f"assistant turn {turn.turn_index}: the answer tokens decode to {decoded!r}, not "
                f"to the rendered turn {turn.answer!r}; the tokenizer cannot represent this text "
                "exactly (unknown characters?), so fix the text or drop the dialog"
            )
        return answer

    def _finish(
        self,
        dialog: Dialog,
        input_ids: list[int],
        spans: list[LossSpan],
        dialog_index: int | None,
    ) -> TrainingSample:
        loss_mask = [False] * len(input_ids)
        for span in spans:
            loss_mask[span.start : span.end] = [True] * (span.end - span.start)

        audio_positions: list[int] = []
        if self.audio_locator_id is not None:
            audio_positions = [
                i for i, token in enumerate(input_ids) if token == self.audio_locator_id
            ]
        last_turn = spans[-1].turn_index
        expected = sum(dialog.audio_counts[: last_turn + 1])
        if len(audio_positions) != expected:
            raise PromptError(
                f"assistant turn {last_turn}: the rendered sample has {len(audio_positions)} audio "
                f"locator token(s) but messages 0..{last_turn} contain {expected}; the chat "
                "template dropped or repeated text that holds audio, so audio inputs would not "
                "line up with their positions; keep audio in user turns that the template renders"
            )
        return TrainingSample(
            input_ids=input_ids,
            loss_mask=loss_mask,
            spans=list(spans),
            audio_positions=audio_positions,
            dialog_index=dialog_index,
        )

    def _end_of_turn(self, kwargs: Mapping[str, Any]) -> tuple[str, int]:
        key = _kwargs_key(kwargs)
        cached = self._end_of_turn_cache.get(key)
        if cached is None:
            token = find_end_of_turn_token(self.tokenizer, **kwargs)
            cached = (token, self.tokenizer.convert_tokens_to_ids(token))
            self._end_of_turn_cache[key] = cached
        return cached

    def _normalize(self, text: str) -> str:
        # The tokenizer's normalizer (NFC for Qwen) runs before tokenizing, so decoded text
        # equals the rendered text only up to that normalization.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        normalizer = getattr(backend, "normalizer", None)
        return normalizer.normalize_str(text) if normalizer is not None else text


def split_dialog_item(item: Any) -> tuple[Any, dict[str, Any]]:
    """Return `(messages, template_kwargs)` of a message list or a `{"messages", "kwargs"}` item."""
    if isinstance(item, Mapping):
        if "messages" not in item:
            raise PromptError(
                f"a dialog object needs a 'messages' key, got keys {sorted(item)}; write either a "
                'list of messages or {"messages": [...], "kwargs": {...}}'
            )
        unknown = sorted(set(item) - {"messages", "kwargs"})
        if unknown:
            raise PromptError(
                f"a dialog object has unknown key(s) {unknown}; the keys are 'messages' and 'kwargs' "
                "(template variables for this dialog)"
            )
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise PromptError(
                f"the dialog's 'kwargs' must be an object of template variables, got "
                f"{type(kwargs).__name__}"
            )
        return item["messages"], dict(kwargs)
    return item, {}


@dataclass(frozen=True)
class _RenderedTurn:
    turn_index: int
    prompt: str
    answer: str


@dataclass(frozen=True)
class _RenderedDialog:
    dialog: Dialog
    turns: list[_RenderedTurn]
    end_of_turn: str
    end_of_turn_id: int

    def texts(self) -> list[str]:
        """Return, per trained turn, the serving prompt and the prompt followed by the answer."""
        return [text for turn in self.turns for text in (turn.prompt, turn.prompt + turn.answer)]


def _check_loss_on(loss_on: str) -> str:
    if loss_on not in LOSS_ON_CHOICES:
        raise PromptError(
            f"loss_on must be one of {', '.join(LOSS_ON_CHOICES)}, got {loss_on!r}: 'last' trains "
            "the last assistant turn, 'all' every assistant turn"
        )
    return loss_on


def _single_token_id(tokenizer: PreTrainedTokenizerBase, tag: str) -> int:
    ids = tokenize_rendered(tokenizer, [tag])[0]
    if len(ids) != 1 or ids[0] not in tokenizer.added_tokens_decoder:
        raise PromptError(
            f"audio locator tag {tag!r} is not a single added token of this tokenizer (it "
            f"tokenizes to {ids}); add it with "
            f"tokenizer.add_special_tokens({{'additional_special_tokens': [{tag!r}]}})"
        )
    return ids[0]


def _kwargs_key(kwargs: Mapping[str, Any]) -> str:
    return json.dumps(kwargs, sort_keys=True, default=repr)


def _read_speech_config(directory: Path) -> dict[str, Any]:
    """Return `prompt_format` and `audio_locator_tag` from the directory's config.json, if set."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{config_path} is not valid JSON: {err}; fix or remove the file"
        ) from err
    if not isinstance(config, dict):
        return {}
    return {
        key: config[key]
        for key in ("prompt_format", "audio_locator_tag")
        if isinstance(config.get(key), str) and config[key]
    }


def _prefix_mismatch_message(index: int, prompt: str, full: str) -> str:
    at = len(os.path.commonprefix([prompt, full]))
    start = max(0, at - _DIFF_CONTEXT_CHARS)
    lead = "..." if start else ""
    prompt_part = prompt[start : at + _DIFF_CONTEXT_CHARS]
    full_part = full[start : at + _DIFF_CONTEXT_CHARS]
    return (
        f"assistant turn {index}: the generation prompt is not a prefix of the dialog rendered "
        "through this turn, so no answer can follow the prompt that serving sends. They differ "
        f"at character {at}:\n"
        f"  generation prompt: {lead}{prompt_part!r}\n"
        f"  rendered dialog:   {lead}{full_part!r}\n"
        "When they differ in a reasoning block, the turn's reasoning disagrees with "
        "enable_thinking: with enable_thinking=False give the turn no reasoning, and where the "
        "generation prompt opens a block (<think>) give it reasoning (reasoning_content, or "
        "<think>...</think> in content) or set enable_thinking=False. Otherwise the template "
        "writes a finished assistant turn differently from how it prompts for one, and this "
        "turn cannot be trained on exactly."
    )


def _handle_dialog_error(index: int, err: PromptError, on_error: str) -> None:
    if on_error == "raise":
        raise PromptError(f"dialog {index}: {err}") from err
    logger.warning("skipping dialog %d: %s", index, err)
