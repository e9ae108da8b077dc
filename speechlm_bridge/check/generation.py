"""generation_config.json of an export: generation must stop at the template's end-of-turn token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from speechlm_bridge.check.config import ExportConfig
from speechlm_bridge.check.files import load_json_file
from speechlm_bridge.check.findings import CheckReport
from speechlm_bridge.errors import PromptError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GENERATION_CONFIG_FILE = "generation_config.json"


def check_generation(
    report: CheckReport, export_config: ExportConfig, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """Check that the eos ids of generation_config.json include the token that ends an assistant turn."""
    from speechlm_bridge.prompts import find_end_of_turn_token

    generation = load_json_file(
        report,
        GENERATION_CONFIG_FILE,
        missing_severity="warning",
        missing_fix=(
            "re-run `speechlm-bridge export`; without the file, generation stops only at the "
            "eos ids of config.json or the tokenizer"
        ),
    )
    if generation is None:
        return
    eos = generation.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    eos_ids = [token_id for token_id in eos_ids if isinstance(token_id, int) and not isinstance(token_id, bool)]
    if not eos_ids:
        report.add(
            "error",
            "generation-eos-missing",
            file=GENERATION_CONFIG_FILE,
            key="eos_token_id",
            message=f"eos_token_id is {eos!r}, so generation runs until max_new_tokens",
            fix="set eos_token_id to a list that holds the id of the token that ends an assistant turn",
        )
        return
    if tokenizer is None or export_config.prompt_format is None or not getattr(tokenizer, "chat_template", None):
        return

    template_kwargs = dict(export_config.prompt_format.template_kwargs)
    try:
        end_of_turn = find_end_of_turn_token(tokenizer, **template_kwargs)
    except PromptError as err:
        report.add(
            "error",
            "end-of-turn-unknown",
            file="tokenizer_config.json",
            key="chat_template",
            message=str(err),
            fix="use the backbone's chat template unchanged; it ends each assistant turn with a special token",
        )
        return
    end_of_turn_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if end_of_turn_id not in eos_ids:
        report.add(
            "error",
            "generation-eos-missing-end-of-turn",
            file=GENERATION_CONFIG_FILE,
            key="eos_token_id",
            message=(
                f"eos_token_id {eos!r} does not include {end_of_turn_id} ({end_of_turn!r}), the token "
                "that ends an assistant turn in the chat template, so generation runs past the answer"
            ),
            fix=f"add {end_of_turn_id} to eos_token_id",
        )
