"""Parity of training and serving: the same dialog must give the same context ids on both sides.

Training side: `ChatFormatter.from_pretrained(export_dir)`, with the defaults of config.json's
`prompt_format`; the context is the sample's ids before the last assistant turn's loss span.
Serving side: `AutoTokenizer.from_pretrained(export_dir).apply_chat_template(messages,
tokenize=True, add_generation_prompt=True)` on the messages before that turn. Each side loads
its own tokenizer, because the formatter may register the audio tag on the one it holds. Both sides get
the same template kwargs: the prompt format's defaults, then the dialog's own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jinja2

from speechlm_bridge.check.config import ExportConfig
from speechlm_bridge.check.findings import CheckReport
from speechlm_bridge.errors import PromptError, SpeechLMBridgeError
from speechlm_bridge.prompts.messages import normalize_dialog

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from speechlm_bridge.prompts import ChatFormatter

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "tokenizer_config.json"
# Template kwarg the reasoning dialogs set; a template that never reads it renders them like
# the plain dialog, so they are skipped.
THINKING_KWARG = "enable_thinking"
# apply_chat_template raises these for a dialog the template rejects (a `raise_exception` for a
# system role, a missing field).
_TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError)


@dataclass(frozen=True)
class CanonicalDialog:
    """A named dialog that ends with the assistant turn whose context is compared."""

    name: str
    messages: list[dict[str, Any]]
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    required: bool = False
    """True for dialogs every speech-LLM chat template must render (one user turn, audio)."""


@dataclass(frozen=True)
class ContextPair:
    """Context ids of one dialog from the training formatter and from the exported template."""

    training_ids: list[int]
    serving_ids: list[int]

    @property
    def first_difference(self) -> int | None:
        """Return the first position where the two differ (None when they are equal)."""
        if self.training_ids == self.serving_ids:
            return None
        for position, (training, serving) in enumerate(zip(self.training_ids, self.serving_ids)):
            if training != serving:
                return position
        return min(len(self.training_ids), len(self.serving_ids))


def canonical_dialogs(audio_locator_tag: str) -> list[CanonicalDialog]:
    """Return the dialogs the parity section renders: plain, system, multi-turn, reasoning, audio."""
    return [
        CanonicalDialog(
            "plain",
            [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ],
            required=True,
        ),
        CanonicalDialog(
            "system-prompt",
            [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name a prime number."},
                {"role": "assistant", "content": "Seven."},
            ],
        ),
        CanonicalDialog(
            "multi-turn",
            [
                {"role": "user", "content": "Count to two."},
                {"role": "assistant", "content": "One, two."},
                {"role": "user", "content": "And to three?"},
                {"role": "assistant", "content": "One, two, three."},
            ],
        ),
        CanonicalDialog(
            "reasoning-on",
            [
                {"role": "user", "content": "Is 91 prime?"},
                {"role": "assistant", "content": "No.", "reasoning_content": "91 is 7 times 13."},
            ],
            {THINKING_KWARG: True},
        ),
        CanonicalDialog(
            "reasoning-off",
            [
                {"role": "user", "content": "Is 97 prime?"},
                {"role": "assistant", "content": "Yes."},
            ],
            {THINKING_KWARG: False},
        ),
        CanonicalDialog(
            "audio",
            [
                {"role": "user", "content": f"Transcribe the following: {audio_locator_tag}"},
                {"role": "assistant", "content": "hello world"},
            ],
            required=True,
        ),
    ]


def check_parity(
    report: CheckReport, export_config: ExportConfig, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """Render the canonical dialogs on both sides and record each context that differs."""
    if export_config.prompt_format is None:
        _skip(report, "config.json's prompt_format names no chat format")
        return
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        _skip(report, "the exported tokenizer does not load or has no chat template")
        return
    formatter = _build_formatter(report)
    if formatter is None:
        return

    for dialog in canonical_dialogs(export_config.audio_locator_tag):
        if THINKING_KWARG in dialog.template_kwargs and THINKING_KWARG not in str(tokenizer.chat_template):
            _skip_dialog(report, dialog, f"the chat template does not read {THINKING_KWARG}")
            continue
        try:
            pair = compare_context(formatter, tokenizer, dialog.messages, dialog.template_kwargs)
        except PromptError as err:
            if dialog.required:
                report.add(
                    "warning",
                    "parity-dialog-failed",
                    file=TEMPLATE_FILE,
                    key=dialog.name,
                    message=f"dialog {dialog.name!r} cannot be rendered for training and serving: {err}",
                    fix="use the backbone's chat template unchanged, with the audio tag as one special token",
                )
            else:
                _skip_dialog(report, dialog, str(err))
            continue
        position = pair.first_difference
        if position is not None:
            _add_mismatch(report, dialog, pair, position, training=formatter.tokenizer, serving=tokenizer)


def compare_context(
    formatter: ChatFormatter,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    template_kwargs: Mapping[str, Any],
) -> ContextPair:
    """Return the context ids of the last assistant turn in `messages` from both sides.

    Raises PromptError when either side cannot render the dialog.
    """
    samples = formatter.encode(messages, loss_on="last", **template_kwargs)
    sample = samples[-1]
    training_ids = list(sample.input_ids[: sample.spans[-1].start])

    # Content parts become text the way serving_prompt_ids joins them, so both sides render
    # the same strings.
    dialog = normalize_dialog(messages, audio_locator_tag=formatter.audio_locator_tag)
    prompt_messages = dialog.messages[: sample.spans[-1].turn_index]
    kwargs = {**formatter.template_kwargs, **template_kwargs}
    try:
        serving = tokenizer.apply_chat_template(
            prompt_messages, tokenize=True, add_generation_prompt=True, return_dict=False, **kwargs
        )
    except _TEMPLATE_ERRORS as err:
        raise PromptError(f"apply_chat_template failed: {type(err).__name__}: {err}") from err
    if isinstance(serving, Mapping):
        serving = serving["input_ids"]
    return ContextPair(training_ids=training_ids, serving_ids=[int(token_id) for token_id in serving])


def _build_formatter(report: CheckReport) -> ChatFormatter | None:
    from speechlm_bridge.prompts import ChatFormatter

    try:
        return ChatFormatter.from_pretrained(report.export_dir)
    except SpeechLMBridgeError as err:
        report.add(
            "warning",
            "parity-formatter-failed",
            file=TEMPLATE_FILE,
            message=f"the training formatter cannot be built from the export: {err}",
            fix="fix the findings above that concern the tokenizer and chat template",
        )
        return None


def _add_mismatch(
    report: CheckReport,
    dialog: CanonicalDialog,
    pair: ContextPair,
    position: int,
    *,
    training: PreTrainedTokenizerBase,
    serving: PreTrainedTokenizerBase,
) -> None:
    # Each side's token text comes from its own tokenizer: the training formatter may have
    # registered the audio tag, which the exported tokenizer lacks.
    def describe(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> str:
        if position >= len(ids):
            return f"the end ({len(ids)} tokens)"
        return f"{ids[position]} {tokenizer.convert_ids_to_tokens(ids[position])!r}"

    report.add(
        "error",
        "parity-context-mismatch",
        file=TEMPLATE_FILE,
        key=dialog.name,
        message=(
            f"dialog {dialog.name!r}: training and serving context ids differ at position "
            f"{position}: training has {describe(pair.training_ids, training)}, serving has "
            f"{describe(pair.serving_ids, serving)}"
        ),
        fix=(
            "training renders with ChatFormatter and serving with apply_chat_template; check the "
            "audio tag and special tokens of the tokenizer, then re-run the export"
        ),
    )


def _skip(report: CheckReport, reason: str) -> None:
    report.add("info", "parity-skipped", file=TEMPLATE_FILE, message=f"parity not checked: {reason}")


def _skip_dialog(report: CheckReport, dialog: CanonicalDialog, reason: str) -> None:
    logger.debug("parity dialog %s skipped: %s", dialog.name, reason)
    report.add(
        "info",
        "parity-dialog-skipped",
        file=TEMPLATE_FILE,
        key=dialog.name,
        message=f"dialog {dialog.name!r} skipped: the chat template cannot express it ({reason})",
    )
