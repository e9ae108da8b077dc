"""Dialog validation and the conversion of OpenAI-style content parts to template text.

Chat templates differ in what they accept as `content`: the Qwen3 template, for one, renders
only string content and drops a list of parts. So before rendering, every list of content
parts becomes one string, the parts joined with a single space, an audio part contributing
the audio locator tag. This is how NeMo merges consecutive text and audio turns of one role:
`[{"type": "text", "text": "Transcribe:"}, {"type": "audio", ...}]` becomes
`"Transcribe: <|audio|>"`. When the text parts of a message already hold one tag per audio
part, as in a request written for vLLM, the audio parts only carry data and the text parts are
joined alone. The same conversion runs for serving (`serving_prompt_ids`), so training and
serving see the same text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from speechlm_bridge.errors import PromptError

ROLES = ("system", "user", "assistant", "tool")
AUDIO_PART_TYPES = ("audio", "input_audio", "audio_url")
TEXT_PART_TYPE = "text"
PART_SEPARATOR = " "


@dataclass(frozen=True)
class Dialog:
    """A validated dialog whose messages have string content, ready for the chat template."""

    messages: list[dict[str, Any]]
    audio_counts: list[int]
    """Number of audio locators in each message."""

    @property
    def assistant_indices(self) -> list[int]:
        return [i for i, message in enumerate(self.messages) if message["role"] == "assistant"]


def normalize_dialog(messages: Any, *, audio_locator_tag: str | None) -> Dialog:
    """Validate a dialog and return copies of its messages with content parts joined to text.

    Raises PromptError, naming the message index, for an empty dialog, a message that is not a
    mapping, an unknown role, content of the wrong type, an unsupported content part, or an
    audio part when no audio locator tag is configured. The input is not modified.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise PromptError(
            f"a dialog must be a list of messages, got {type(messages).__name__}; pass "
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
        )
    if len(messages) == 0:
        raise PromptError(
            "empty dialog: it has no messages; a training dialog needs at least one user turn "
            "followed by the assistant turn to train on"
        )

    normalized = []
    audio_counts = []
    for index, message in enumerate(messages):
        converted = _normalize_message(index, message, audio_locator_tag)
        normalized.append(converted)
        content = converted.get("content")
        count = content.count(audio_locator_tag) if audio_locator_tag and content else 0
        audio_counts.append(count)
    return Dialog(messages=normalized, audio_counts=audio_counts)


def check_audio_count(dialog: Dialog, audios_count: int | None) -> None:
    """Raise PromptError when the dialog's audio locators do not match the audio inputs."""
    if audios_count is None:
        return
    found = sum(dialog.audio_counts)
    if found == audios_count:
        return
    per_turn = ", ".join(
        f"message {index}: {count}" for index, count in enumerate(dialog.audio_counts) if count
    )
    raise PromptError(
        f"the dialog has {found} audio locator(s) ({per_turn or 'none in any message'}) but "
        f"{audios_count} audio input(s) were given; each audio input needs exactly one audio "
        "content part (or locator tag in the text) at the place it is heard, so add or remove "
        "parts until the counts match"
    )


def _normalize_message(index: int, message: Any, audio_locator_tag: str | None) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise PromptError(
            f"message {index} is a {type(message).__name__}, not a mapping; each message must be "
            'an object such as {"role": "user", "content": "..."}'
        )
    role = message.get("role")
    if role not in ROLES:
        raise PromptError(
            f"message {index} has unknown role {role!r}; use one of {', '.join(ROLES)} "
            "(the OpenAI chat roles that chat templates render)"
        )

    converted = dict(message)
    content = message.get("content")
    if isinstance(content, str):
        pass
    elif isinstance(content, Sequence) and not isinstance(content, (bytes, Mapping)):
        converted["content"] = _join_parts(index, content, audio_locator_tag)
    elif content is None:
        if not (role == "assistant" and message.get("tool_calls")):
            raise PromptError(
                f"message {index} ({role}) has no content; give it a string or a list of content "
                "parts (only an assistant message with tool_calls may omit content)"
            )
    else:
        raise PromptError(
            f"message {index} ({role}) has content of type {type(content).__name__}; use a string "
            "or a list of content parts"
        )

    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise PromptError(
            f"message {index} has reasoning_content of type {type(reasoning).__name__}; "
            "reasoning_content must be a string"
        )
    if reasoning is not None and role != "assistant":
        raise PromptError(
            f"message {index} ({role}) has reasoning_content; only assistant messages carry "
            "reasoning, so move it into an assistant turn or drop it"
        )
    return converted


def _join_parts(index: int, parts: Sequence[Any], audio_locator_tag: str | None) -> str:
    pieces = []
    audio_parts = 0
    for part_index, part in enumerate(parts):
        part_type = part.get("type") if isinstance(part, Mapping) else None
        if part_type == TEXT_PART_TYPE:
            text = part.get("text")
            if not isinstance(text, str):
                raise PromptError(
                    f"message {index}, content part {part_index}: a text part needs a string "
                    f"'text' field, got {type(text).__name__}"
                )
            pieces.append(text)
        elif part_type in AUDIO_PART_TYPES:
            if audio_locator_tag is None:
                raise PromptError(
                    f"message {index}, content part {part_index} is an audio part but no audio "
                    "locator tag is configured; pass audio_locator_tag='<|audio|>' (a special "
                    "token of the tokenizer) to the formatter"
                )
            pieces.append(audio_locator_tag)
            audio_parts += 1
        else:
            raise PromptError(
                f"message {index}, content part {part_index} has type {part_type!r}; supported "
                f"part types are {TEXT_PART_TYPE!r} and {', '.join(map(repr, AUDIO_PART_TYPES))}"
            )
    if audio_parts:
        # A request written for vLLM has the tag in its text and an audio part with only the data.
        # The text then marks where each audio goes.
        text_pieces = [piece for piece, part in zip(pieces, parts) if part.get("type") == TEXT_PART_TYPE]
        tags_in_text = sum(piece.count(audio_locator_tag) for piece in text_pieces)
        if tags_in_text == audio_parts:
            return PART_SEPARATOR.join(text_pieces)
        if tags_in_text:
            raise PromptError(
                f"message {index} has {audio_parts} audio part(s) and {tags_in_text} audio locator "
                f"tag(s) {audio_locator_tag!r} in its text; either write one tag in the text for "
                "each audio part (where the audio is heard), or none, and each audio part stands "
                "for a tag at its own place"
            )
    return PART_SEPARATOR.join(pieces)
