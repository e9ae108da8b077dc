"""config.json of an export: model type, architecture, audio tag, prompt format and dtype."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from speechlm_bridge.check.files import load_json_file
from speechlm_bridge.check.findings import CheckReport
from speechlm_bridge.errors import ConfigError, SpeechLMBridgeError

if TYPE_CHECKING:
    from speechlm_bridge.modeling.configuration import SpeechLMBridgeConfig
    from speechlm_bridge.prompts import PromptFormatSettings

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
ARCHITECTURE = "SpeechLMBridgeForConditionalGeneration"
FLOATING_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _config_build_errors() -> tuple[type[Exception], ...]:
    # Config classes of arbitrary backbones validate their own fields and raise any of these;
    # huggingface_hub's strict dataclasses (transformers 5.x configs) raise StrictDataclassError.
    from huggingface_hub.errors import StrictDataclassError

    return (SpeechLMBridgeError, ValueError, TypeError, KeyError, AttributeError, IndexError, StrictDataclassError)


@dataclass
class ExportConfig:
    """Values from config.json that the tokenizer, weight and parity checks use.

    A field is None when config.json lacks it or has an invalid value.
    """

    raw: dict[str, Any] | None
    config: SpeechLMBridgeConfig | None
    audio_locator_tag: str
    audio_token_id: int | None
    prompt_format: PromptFormatSettings | None
    """Settings of `prompt_format`; None when it names no chat format."""
    dtype: str | None
    """Expected dtype of the floating-point weights, e.g. `bfloat16`."""


def check_config(report: CheckReport) -> ExportConfig:
    """Check config.json and return what the tokenizer, weight and parity checks need."""
    from speechlm_bridge.modeling.configuration import DEFAULT_AUDIO_LOCATOR_TAG, MODEL_TYPE
    from speechlm_bridge.prompts import GENERIC_PROMPT_FORMAT, resolve_prompt_format

    result = ExportConfig(
        raw=None,
        config=None,
        audio_locator_tag=DEFAULT_AUDIO_LOCATOR_TAG,
        audio_token_id=None,
        prompt_format=resolve_prompt_format(GENERIC_PROMPT_FORMAT),
        dtype=None,
    )
    raw = load_json_file(
        report,
        CONFIG_FILE,
        missing_severity="error",
        missing_fix="re-run `speechlm-bridge export`; config.json describes the model to every loader",
    )
    if raw is None:
        return result
    result.raw = raw

    model_type_ok = _check_model_type(report, raw, MODEL_TYPE)
    _check_architectures(report, raw)
    _check_audio_keys(report, raw, result)
    _check_prompt_format(report, raw, result)
    result.dtype = _check_dtype(report, raw)
    _check_tie_word_embeddings(report, raw)
    if model_type_ok:
        result.config = _build_config(report, raw)
    return result


def _check_model_type(report: CheckReport, raw: dict[str, Any], model_type: str) -> bool:
    value = raw.get("model_type")
    if value is None:
        report.add(
            "error",
            "config-model-type-missing",
            file=CONFIG_FILE,
            key="model_type",
            message="config.json has no model_type, so AutoConfig cannot choose a config class",
            fix=f'set "model_type": "{model_type}"',
        )
        return False
    if value != model_type:
        report.add(
            "error",
            "config-model-type-unknown",
            file=CONFIG_FILE,
            key="model_type",
            message=f"model_type is {value!r}, not {model_type!r}; no speechlm-bridge loader reads it",
            fix=f'set "model_type": "{model_type}", or re-run `speechlm-bridge export`',
        )
        return False
    return True


def _check_architectures(report: CheckReport, raw: dict[str, Any]) -> None:
    value = raw.get("architectures")
    if not isinstance(value, list) or not value:
        report.add(
            "error",
            "config-architectures-missing",
            file=CONFIG_FILE,
            key="architectures",
            message=f"architectures is {value!r}; vLLM chooses the model class from this list",
            fix=f'set "architectures": ["{ARCHITECTURE}"]',
        )
    elif ARCHITECTURE not in value:
        report.add(
            "error",
            "config-architectures-unknown",
            file=CONFIG_FILE,
            key="architectures",
            message=f"architectures is {value!r}, which does not name {ARCHITECTURE}",
            fix=f'set "architectures": ["{ARCHITECTURE}"]',
        )


def _check_audio_keys(report: CheckReport, raw: dict[str, Any], result: ExportConfig) -> None:
    tag = raw.get("audio_locator_tag")
    if isinstance(tag, str) and tag:
        result.audio_locator_tag = tag
    else:
        report.add(
            "warning",
            "config-audio-locator-tag-missing",
            file=CONFIG_FILE,
            key="audio_locator_tag",
            message=(
                f"audio_locator_tag is {tag!r}; the loader falls back to "
                f"{result.audio_locator_tag!r}, which may not be the tag training used"
            ),
            fix="set audio_locator_tag to the model.audio_locator_tag of the training config",
        )

    token_id = raw.get("audio_token_id")
    if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0:
        result.audio_token_id = token_id
    else:
        report.add(
            "error",
            "config-audio-token-id-missing",
            file=CONFIG_FILE,
            key="audio_token_id",
            message=(
                f"audio_token_id is {token_id!r}; the model finds audio positions by this id, "
                "so without it no audio reaches the language model"
            ),
            fix="set audio_token_id to the tokenizer's id of audio_locator_tag",
        )


def _check_prompt_format(report: CheckReport, raw: dict[str, Any], result: ExportConfig) -> None:
    from speechlm_bridge.prompts import GENERIC_PROMPT_FORMAT, resolve_prompt_format
    from speechlm_bridge.prompts.formats import NON_CHAT_PROMPT_FORMATS

    name = raw.get("prompt_format", GENERIC_PROMPT_FORMAT)
    result.prompt_format = None
    try:
        if not isinstance(name, str):
            raise ConfigError(f"prompt_format must be a string, got {name!r}")
        result.prompt_format = resolve_prompt_format(name)
    except ConfigError as err:
        if isinstance(name, str) and name.strip().lower() in NON_CHAT_PROMPT_FORMATS:
            report.add(
                "info",
                "config-prompt-format-not-chat",
                file=CONFIG_FILE,
                key="prompt_format",
                message=f"{err}; the chat template and parity checks are skipped",
            )
            return
        report.add(
            "error",
            "config-prompt-format-unknown",
            file=CONFIG_FILE,
            key="prompt_format",
            message=str(err),
            fix="set prompt_format to the model.prompt_format of the training config",
        )


def _check_dtype(report: CheckReport, raw: dict[str, Any]) -> str | None:
    text_config = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    key, value = next(
        (
            (key, source[name])
            for key, source, name in (
                ("dtype", raw, "dtype"),
                ("torch_dtype", raw, "torch_dtype"),
                ("text_config.dtype", text_config, "dtype"),
                ("text_config.torch_dtype", text_config, "torch_dtype"),
            )
            if source.get(name) is not None
        ),
        ("dtype", None),
    )
    if value is None:
        report.add(
            "warning",
            "config-dtype-missing",
            file=CONFIG_FILE,
            key="dtype",
            message=(
                "config.json names no dtype, so `dtype='auto'` loads the weights as float32 and "
                "the stored tensor dtypes are not checked"
            ),
            fix='set "dtype" to the dtype of the stored weights, e.g. "bfloat16"',
        )
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in FLOATING_DTYPES:
        report.add(
            "error",
            "config-dtype-invalid",
            file=CONFIG_FILE,
            key=key,
            message=f"{key} is {value!r}, not one of {', '.join(FLOATING_DTYPES)}",
            fix=f"set {key} to the dtype of the stored weights, e.g. bfloat16",
        )
        return None
    return name


def _check_tie_word_embeddings(report: CheckReport, raw: dict[str, Any]) -> None:
    text_config = raw.get("text_config")
    if not isinstance(text_config, dict):
        return
    top, text = raw.get("tie_word_embeddings"), text_config.get("tie_word_embeddings")
    if top is not None and text is not None and bool(top) != bool(text):
        report.add(
            "warning",
            "config-tie-word-embeddings-mismatch",
            file=CONFIG_FILE,
            key="tie_word_embeddings",
            message=(
                f"tie_word_embeddings is {top!r} but text_config.tie_word_embeddings is {text!r}; "
                "transformers 5.19 ties by the text config, and other loaders may read the top level"
            ),
            fix="set both to the same value: true when lm_head is not stored, false when it is",
        )


def _build_config(report: CheckReport, raw: dict[str, Any]) -> SpeechLMBridgeConfig | None:
    from speechlm_bridge.modeling.configuration import SpeechLMBridgeConfig

    try:
        # JSON has no Infinity: transformers writes it as {"__float__": "Infinity"} (NemotronH's
        # time_step_limit) and decodes it when loading, so the check must too.
        return SpeechLMBridgeConfig.from_dict(SpeechLMBridgeConfig._decode_special_floats(dict(raw)))
    except _config_build_errors() as err:
        logger.debug("building the config from %s failed", CONFIG_FILE, exc_info=True)
        report.add(
            "error",
            "config-invalid",
            file=CONFIG_FILE,
            message=f"transformers cannot build the config: {type(err).__name__}: {err}",
            fix="re-run `speechlm-bridge export`, or fix the key the message names",
        )
        return None
