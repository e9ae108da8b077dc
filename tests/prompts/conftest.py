"""Backbones for the prompt tests: real tokenizers paired with real and hand-written templates.

Each backbone adds the audio locator tag `<|audio|>` as a special token, as NeMo's SALM does.
Pairings, for templates that ship without a tokenizer:
- nemotron-3-nano: the Nemotron 3 Nano template on the Qwen3 tokenizer. The template emits
  <|im_start|>, <|im_end|>, <think>, </think>, <tool_call> and <tool_response>, all of which the
  Qwen3 tokenizer has as added tokens (NVIDIA's own tokenizer is not available offline).
- llama3-like and gemma-like: the templates in templates/ on the Qwen2.5 tokenizer, with their
  BOS, EOS and turn tokens added as special tokens.
- dated-system and rewrite-history: templates/ on the Qwen2.5 and Qwen3 tokenizers, which
  already have the ChatML and <think> tokens they emit.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fixture_path

TEMPLATES_DIR = Path(__file__).parent / "templates"
AUDIO_TAG = "<|audio|>"


@dataclass(frozen=True)
class Backbone:
    """A tokenizer with its chat template and the end-of-turn token that template emits."""

    name: str
    tokenizer: Any
    end_of_turn: str


ALL_BACKBONES = (
    "qwen3",
    "qwen2.5",
    "nemotron-3-nano",
    "llama3-like",
    "gemma-like",
    "dated-system",
    "rewrite-history",
)


def load_backbone(name: str) -> Backbone:
    """Load a fresh tokenizer for `name`, with its template and the audio tag added."""
    from transformers import AutoTokenizer

    base = {"qwen3": "qwen3", "nemotron-3-nano": "qwen3", "rewrite-history": "qwen3"}.get(
        name, "qwen2.5"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(fixture_path("backbones", base)))
    special: dict[str, Any] = {"additional_special_tokens": [AUDIO_TAG]}
    end_of_turn = "<|im_end|>"

    if name == "nemotron-3-nano":
        template = fixture_path(
            "backbones", "_templates_only", "nemotron-3-nano", "chat_template.jinja"
        )
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    elif name == "llama3-like":
        tokenizer.chat_template = _template("llama3_like")
        special = {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "additional_special_tokens": [
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                AUDIO_TAG,
            ],
        }
        end_of_turn = "<|eot_id|>"
    elif name == "gemma-like":
        tokenizer.chat_template = _template("gemma_like")
        special = {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", AUDIO_TAG],
        }
        end_of_turn = "<end_of_turn>"
    elif name == "dated-system":
        tokenizer.chat_template = _template("dated_system")
    elif name == "rewrite-history":
        tokenizer.chat_template = _template("rewrite_history")
    elif name not in {"qwen3", "qwen2.5"}:
        raise ValueError(f"unknown test backbone {name!r}")

    tokenizer.add_special_tokens(special)
    return Backbone(name=name, tokenizer=tokenizer, end_of_turn=end_of_turn)


@pytest.fixture(scope="session")
def backbones() -> dict[str, Backbone]:
    """All test backbones, loaded once per session (about 0.5 s each)."""
    return {name: load_backbone(name) for name in ALL_BACKBONES}


def _template(stem: str) -> str:
    return (TEMPLATES_DIR / f"{stem}.jinja").read_text(encoding="utf-8")


# -- independent check of the invariants -----------------------------------------------------------


def to_template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join content parts with one space, an audio part as AUDIO_TAG (the documented rule).

    When the text parts already hold one tag per audio part, the audio parts add nothing.
    """
    converted = []
    for message in messages:
        message = dict(message)
        parts = message.get("content")
        if isinstance(parts, list):
            texts = [part["text"] for part in parts if part["type"] == "text"]
            audio_parts = sum(part["type"] != "text" for part in parts)
            if audio_parts and sum(text.count(AUDIO_TAG) for text in texts) == audio_parts:
                message["content"] = " ".join(texts)
            else:
                message["content"] = " ".join(
                    part["text"] if part["type"] == "text" else AUDIO_TAG for part in parts
                )
        converted.append(message)
    return converted


def assert_exact(
    backbone: Backbone,
    messages: list[dict[str, Any]],
    samples: list[Any],
    *,
    loss_on: str,
    template_kwargs: dict[str, Any] | None = None,
) -> None:
    """Check every invariant of the samples of one dialog against transformers' own rendering."""
    kwargs = template_kwargs or {}
    tokenizer = backbone.tokenizer
    template_messages = to_template_messages(messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    expected_turns = assistant[-1:] if loss_on == "last" else assistant
    end_of_turn_id = tokenizer.convert_tokens_to_ids(backbone.end_of_turn)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TAG)

    trained_turns = [span.turn_index for sample in samples for span in sample.spans]
    assert trained_turns == expected_turns

    for sample in samples:
        ids = sample.input_ids
        assert ids == sample.context_ids + sample.answer_ids
        assert sample.spans[-1].end == len(ids)
        assert sample.answer_ids == ids[sample.spans[-1].start :]
        starts_and_ends = [bound for span in sample.spans for bound in (span.start, span.end)]
        assert starts_and_ends == sorted(starts_and_ends)
        in_span = [
            any(span.start <= i < span.end for span in sample.spans) for i in range(len(ids))
        ]
        assert sample.loss_mask == in_span

        for span in sample.spans:
            turn = span.turn_index
            serving = tokenizer.apply_chat_template(
                template_messages[:turn],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                **kwargs,
            )
            assert ids[: span.start] == serving, f"context of turn {turn} differs from serving"

            prompt_text = tokenizer.apply_chat_template(
                template_messages[:turn], add_generation_prompt=True, tokenize=False, **kwargs
            )
            full_text = tokenizer.apply_chat_template(
                template_messages[: turn + 1], tokenize=False, **kwargs
            )
            assert full_text.startswith(prompt_text)
            rendered_turn = full_text[len(prompt_text) :]
            end = rendered_turn.index(backbone.end_of_turn) + len(backbone.end_of_turn)
            decoded = tokenizer.decode(ids[span.start : span.end], skip_special_tokens=False)
            assert nfc(decoded) == nfc(rendered_turn[:end])
            assert ids[span.end - 1] == end_of_turn_id
            assert end_of_turn_id not in ids[span.start : span.end - 1]

        last_turn = sample.spans[-1].turn_index
        audio_in_messages = sum(
            (m.get("content") or "").count(AUDIO_TAG) for m in template_messages[: last_turn + 1]
        )
        assert sample.audio_positions == [i for i, token in enumerate(ids) if token == audio_id]
        assert len(sample.audio_positions) == audio_in_messages


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)
