"""Training samples: token ids, the loss mask and the assistant spans it covers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LossSpan:
    """Token range `[start, end)` of `input_ids` that contains one assistant turn's answer.

    `turn_index` is the index of that assistant message in the dialog. The range runs through
    the token that ends the turn in the chat template (`<|im_end|>`, `<|eot_id|>`, ...).
    """

    turn_index: int
    start: int
    end: int

    def to_dict(self) -> dict[str, int]:
        return {"turn_index": self.turn_index, "start": self.start, "end": self.end}


@dataclass
class TrainingSample:
    """One training sequence rendered from the backbone's chat template.

    `loss_mask[i]` is True when token `i` of `input_ids` contributes to the loss, i.e. it lies
    inside one of `spans`, and False for context tokens (system, user, tool turns, template
    headers, earlier text the model only reads).

    The sample ends with the last span, so `input_ids == context_ids + answer_ids`, where
    `answer_ids` are the tokens of the last span and `context_ids` is, token for token, the prompt
    that serving sends for that turn. A sample with several spans (loss on all assistant turns)
    has the same property at every span: `input_ids[:span.start]` is the serving prompt of
    `span.turn_index`.

    `audio_positions` are the indices in `input_ids` of the audio locator token, in dialog
    order. A sample that covers the first `n` audio inputs of a dialog has `n` positions.
    `dialog_index` is the position of the source dialog in a batch (`None` from `encode`).
    """

    input_ids: list[int]
    loss_mask: list[bool]
    spans: list[LossSpan]
    audio_positions: list[int] = field(default_factory=list)
    dialog_index: int | None = None

    @property
    def context_ids(self) -> list[int]:
        """Tokens before the last loss span: the serving prompt of the last trained turn."""
        return self.input_ids[: self.spans[-1].start]

    @property
    def answer_ids(self) -> list[int]:
        """Tokens of the last loss span, through the end-of-turn token."""
        return self.input_ids[self.spans[-1].start :]

    @property
    def turn_indices(self) -> list[int]:
        """Indices of the assistant messages that carry loss in this sample."""
        return [span.turn_index for span in self.spans]

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Return `input_ids` with `ignore_index` at every position outside the loss spans.

        The labels are not shifted: a causal LM's loss function shifts them by one position.
        """
        return [
            token if in_loss else ignore_index
            for token, in_loss in zip(self.input_ids, self.loss_mask, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Return the sample as plain JSON-serializable values (the `render --json` line)."""
        return {
            "dialog_index": self.dialog_index,
            "input_ids": list(self.input_ids),
            "loss_mask": list(self.loss_mask),
            "context_ids": self.context_ids,
            "answer_ids": self.answer_ids,
            "spans": [span.to_dict() for span in self.spans],
            "audio_positions": list(self.audio_positions),
        }
