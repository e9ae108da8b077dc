"""Training samples rendered from the backbone's own chat template, with exact loss masks.

`ChatFormatter.encode` turns a dialog in the OpenAI chat format into `TrainingSample`s whose
context tokens equal, token for token, what serving feeds the model, and whose loss mask covers
exactly the assistant answer through the template's end-of-turn token. See docs/prompts.md.
"""

from speechlm_bridge.prompts.formats import (
    GENERIC_PROMPT_FORMAT,
    KNOWN_PROMPT_FORMATS,
    PromptFormatSettings,
    resolve_prompt_format,
)
from speechlm_bridge.prompts.formatter import LOSS_ON_CHOICES, ChatFormatter
from speechlm_bridge.prompts.rendering import (
    find_end_of_turn_token,
    serving_prompt_ids,
    serving_prompt_text,
)
from speechlm_bridge.prompts.sample import LossSpan, TrainingSample

__all__ = [
    "GENERIC_PROMPT_FORMAT",
    "KNOWN_PROMPT_FORMATS",
    "LOSS_ON_CHOICES",
    "ChatFormatter",
    "LossSpan",
    "PromptFormatSettings",
    "TrainingSample",
    "find_end_of_turn_token",
    "resolve_prompt_format",
    "serving_prompt_ids",
    "serving_prompt_text",
]
