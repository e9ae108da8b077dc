"""Tokenizer files of an export: loader portability, the chat template and the audio locator tag."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speechlm_bridge.check.config import CONFIG_FILE, ExportConfig
from speechlm_bridge.check.files import load_json_file, read_json_object
from speechlm_bridge.check.findings import CheckReport
from speechlm_bridge.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_CONFIG_FILE = "processor_config.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
# Names transformers 5.x writes for "whichever backend was loaded"; transformers 4.x, and the
# loaders built on it, cannot import them.
WRAPPER_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PythonBackend", "SentencePieceBackend"})
_REEXPORT_FIX = "re-run `speechlm-bridge export`, which writes a portable tokenizer_config.json"


def check_tokenizer(
    report: CheckReport, export_config: ExportConfig, *, backbone: Path | None = None
) -> PreTrainedTokenizerBase | None:
    """Check the tokenizer files and return the tokenizer AutoTokenizer loads, or None if it fails.

    With `backbone`, the chat template must be byte-identical to that directory's.
    """
    tokenizer_config = load_json_file(
        report, TOKENIZER_CONFIG_FILE, missing_severity="error", missing_fix=_REEXPORT_FIX
    )
    if tokenizer_config is not None:
        _check_tokenizer_class(report, tokenizer_config)
        _check_extra_special_tokens(report, tokenizer_config, export_config.audio_locator_tag)
    if backbone is not None and not backbone.is_dir():
        report.add(
            "error",
            "backbone-not-found",
            file=None,
            message=f"--backbone {backbone} does not exist or is not a directory",
            fix="pass the local backbone directory the model was trained from",
        )
        backbone = None
    if export_config.prompt_format is not None:
        _check_chat_template(report, tokenizer_config or {}, backbone)
    _check_processor_files(report, export_config.audio_locator_tag)

    if not (report.export_dir / TOKENIZER_FILE).is_file():
        # transformers then builds a tokenizer from tokenizer_config.json alone, with a handful of
        # tokens, and every check on it would point at the wrong fix.
        report.add(
            "error",
            "file-missing",
            file=TOKENIZER_FILE,
            message=f"{TOKENIZER_FILE} is missing, so loaders cannot build the backbone's tokenizer",
            fix=_REEXPORT_FIX.replace("a portable tokenizer_config.json", "the tokenizer files"),
        )
        return None
    tokenizer = load_export_tokenizer(report)
    if tokenizer is not None:
        _check_audio_tag(report, tokenizer, export_config)
    return tokenizer


def load_export_tokenizer(report: CheckReport) -> PreTrainedTokenizerBase | None:
    """Load the tokenizer as serving does (`AutoTokenizer.from_pretrained`), offline."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(report.export_dir), local_files_only=True)
    # Malformed tokenizer files surface as any exception type (the Rust `tokenizers` library
    # raises a bare Exception); any failure to load is the finding itself.
    except Exception as err:  # noqa: BLE001
        logger.debug("loading the tokenizer from %s failed", report.export_dir, exc_info=True)
        report.add(
            "error",
            "tokenizer-load-failed",
            file=TOKENIZER_CONFIG_FILE,
            message=f"AutoTokenizer cannot load the tokenizer: {type(err).__name__}: {err}",
            fix=_REEXPORT_FIX,
        )
        return None


def read_chat_template(directory: Path) -> tuple[str | None, Any]:
    """Return `(file name, template)` of the chat template transformers 5.x loads from `directory`.

    `chat_template.jinja` wins over the inline `chat_template` of tokenizer_config.json. The
    template is returned exactly as stored (a string, or a list of named templates).
    Raises ConfigError when a file cannot be read.
    """
    template_path = directory / CHAT_TEMPLATE_FILE
    if template_path.is_file():
        try:
            return CHAT_TEMPLATE_FILE, template_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{template_path} cannot be read as UTF-8 text: {err}") from err
    config_path = directory / TOKENIZER_CONFIG_FILE
    if config_path.is_file():
        inline = read_json_object(config_path).get("chat_template")
        if inline is not None:
            return TOKENIZER_CONFIG_FILE, inline
    return None, None


def _check_tokenizer_class(report: CheckReport, tokenizer_config: dict[str, Any]) -> None:
    name = tokenizer_config.get("tokenizer_class")
    if name is None:
        report.add(
            "warning",
            "tokenizer-class-missing",
            file=TOKENIZER_CONFIG_FILE,
            key="tokenizer_class",
            message=(
                "tokenizer_config.json names no tokenizer_class, so loaders guess the class from "
                "config.json's model_type, which no tokenizer mapping knows"
            ),
            fix='set "tokenizer_class" to the backbone\'s class, e.g. "Qwen2Tokenizer" or "PreTrainedTokenizerFast"',
        )
        return
    if not isinstance(name, str) or _tokenizer_class(name) is None:
        report.add(
            "error",
            "tokenizer-class-unknown",
            file=TOKENIZER_CONFIG_FILE,
            key="tokenizer_class",
            message=(
                f"tokenizer_class {name!r} cannot be imported from the installed transformers; "
                "transformers 5.x silently falls back to a generic tokenizer and other loaders fail"
            ),
            fix='set "tokenizer_class" to the backbone\'s class, e.g. "Qwen2Tokenizer" or "PreTrainedTokenizerFast"',
        )
    elif name in WRAPPER_TOKENIZER_CLASSES:
        report.add(
            "warning",
            "tokenizer-class-not-portable",
            file=TOKENIZER_CONFIG_FILE,
            key="tokenizer_class",
            message=(
                f"tokenizer_class {name!r} exists only in transformers 5.x; loaders on "
                "transformers 4.x (older vLLM releases among them) cannot import it"
            ),
            fix='set "tokenizer_class" to the backbone\'s own class, or "PreTrainedTokenizerFast"',
        )


def _tokenizer_class(name: str) -> type | None:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        found = tokenizer_class_from_name(name)
        if found is None and not name.endswith("Fast"):
            found = tokenizer_class_from_name(name + "Fast")
    except (ImportError, AttributeError, ValueError) as err:
        logger.debug("importing tokenizer class %r failed: %s", name, err)
        return None
    return found


def _check_extra_special_tokens(report: CheckReport, tokenizer_config: dict[str, Any], tag: str) -> None:
    extra = tokenizer_config.get("extra_special_tokens")
    if extra is None:
        return
    if not isinstance(extra, dict):
        report.add(
            "error",
            "tokenizer-extra-special-tokens-not-dict",
            file=TOKENIZER_CONFIG_FILE,
            key="extra_special_tokens",
            message=(
                f"extra_special_tokens is a {type(extra).__name__}; transformers 4.x (and vLLM's "
                "tokenizer loading on it) requires a dict of named tokens and fails to load the tokenizer"
            ),
            fix=(
                f'write it as a dict, e.g. {{"audio_token": "{tag}"}}, and move unnamed special '
                "tokens to additional_special_tokens"
            ),
        )
        return
    named_tag = extra.get("audio_token")
    if named_tag is not None and named_tag != tag:
        report.add(
            "error",
            "audio-tag-mismatch",
            file=TOKENIZER_CONFIG_FILE,
            key="extra_special_tokens.audio_token",
            message=(
                f"the tokenizer's audio_token is {named_tag!r} but config.json's audio_locator_tag "
                f"is {tag!r}; the training formatter would mark audio with another token than the model"
            ),
            fix=f'set extra_special_tokens.audio_token to "{tag}"',
        )


def _check_chat_template(report: CheckReport, tokenizer_config: dict[str, Any], backbone: Path | None) -> None:
    inline = tokenizer_config.get("chat_template")
    separate = None
    template_path = report.export_dir / CHAT_TEMPLATE_FILE
    if template_path.is_file():
        try:
            separate = template_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            report.add(
                "error",
                "file-unreadable",
                file=CHAT_TEMPLATE_FILE,
                message=f"{CHAT_TEMPLATE_FILE} cannot be read as UTF-8 text: {err}",
                fix=f"copy {CHAT_TEMPLATE_FILE} from the backbone again",
            )
            return

    if inline is None and separate is None:
        report.add(
            "error",
            "chat-template-missing",
            file=TOKENIZER_CONFIG_FILE,
            key="chat_template",
            message=(
                "the export has no chat template (neither chat_template in tokenizer_config.json "
                f"nor {CHAT_TEMPLATE_FILE}), so serving cannot render chat messages"
            ),
            fix="re-run `speechlm-bridge export` with a backbone whose tokenizer has its chat template",
        )
        return
    for name, key, value in (
        (TOKENIZER_CONFIG_FILE, "chat_template", inline),
        (CHAT_TEMPLATE_FILE, None, separate),
    ):
        if value is not None and not _template_text(value).strip():
            report.add(
                "error",
                "chat-template-empty",
                file=name,
                key=key,
                message=f"the chat template in {name} is empty, so every dialog renders as nothing",
                fix="copy the backbone's chat template unchanged",
            )
    if inline is not None and separate is not None and inline != separate:
        at = _first_difference(_template_text(inline), separate)
        report.add(
            "error",
            "chat-template-files-disagree",
            file=CHAT_TEMPLATE_FILE,
            key="chat_template",
            message=(
                f"{CHAT_TEMPLATE_FILE} and the inline chat_template of tokenizer_config.json differ "
                f"from character {at}; transformers 5.x uses the .jinja file, transformers 4.x "
                "before 4.43 the inline one, so two loaders render different prompts"
            ),
            fix="keep one copy: the backbone's template, byte-identical",
        )
    if backbone is not None:
        _compare_with_backbone(report, separate if separate is not None else inline, backbone)


def _compare_with_backbone(report: CheckReport, exported: Any, backbone: Path) -> None:
    try:
        source, expected = read_chat_template(backbone)
    except ConfigError as err:
        source, expected = None, None
        logger.debug("reading the backbone chat template failed: %s", err)
    if expected is None:
        report.add(
            "warning",
            "backbone-chat-template-missing",
            file=None,
            message=f"--backbone {backbone} has no readable chat template to compare the export's with",
            fix=f"pass the backbone's instruct tokenizer directory (tokenizer_config.json or {CHAT_TEMPLATE_FILE})",
        )
        return
    if exported != expected:
        at = _first_difference(_template_text(exported), _template_text(expected))
        report.add(
            "error",
            "chat-template-differs-from-backbone",
            file=TOKENIZER_CONFIG_FILE,
            key="chat_template",
            message=(
                f"the exported chat template differs from {backbone / source} from character {at}; "
                "serving would render other prompts than the backbone's template that training used"
            ),
            fix="re-run `speechlm-bridge export`, which copies the backbone's template byte for byte",
        )


def _check_processor_files(report: CheckReport, tag: str) -> None:
    load_json_file(
        report,
        PREPROCESSOR_CONFIG_FILE,
        missing_severity="error",
        missing_fix="re-run `speechlm-bridge export`; AutoFeatureExtractor reads this file",
    )
    processor_config = load_json_file(
        report,
        PROCESSOR_CONFIG_FILE,
        missing_severity="error",
        missing_fix="re-run `speechlm-bridge export`; AutoProcessor reads this file",
    )
    if processor_config is not None and processor_config.get("audio_token") != tag:
        report.add(
            "error",
            "audio-tag-mismatch",
            file=PROCESSOR_CONFIG_FILE,
            key="audio_token",
            message=(
                f"processor_config.json's audio_token is {processor_config.get('audio_token')!r} but "
                f"config.json's audio_locator_tag is {tag!r}; the processor would not expand the "
                "tag that prompts contain"
            ),
            fix=f'set "audio_token": "{tag}"',
        )


def _check_audio_tag(report: CheckReport, tokenizer: PreTrainedTokenizerBase, export_config: ExportConfig) -> None:
    tag = export_config.audio_locator_tag
    if tag not in tokenizer.get_added_vocab():
        report.add(
            "error",
            "audio-tag-not-in-tokenizer",
            file="tokenizer.json",
            key=tag,
            message=(
                f"the audio locator tag {tag!r} is not an added token of the tokenizer, so it "
                "tokenizes into pieces and no audio position is found"
            ),
            fix=f"re-run `speechlm-bridge export`, which adds {tag!r} as one special token",
        )
        return

    tag_id = tokenizer.convert_tokens_to_ids(tag)
    alone = tokenizer(tag, add_special_tokens=False)["input_ids"]
    in_text = tokenizer(f"a{tag}b", add_special_tokens=False)["input_ids"]
    if alone != [tag_id] or in_text.count(tag_id) != 1:
        report.add(
            "error",
            "audio-tag-not-single-token",
            file=TOKENIZER_CONFIG_FILE,
            key=tag,
            message=(
                f"the audio locator tag {tag!r} tokenizes to {alone} alone and to {in_text} inside "
                f"'a{tag}b', not to its one id {tag_id}; check split_special_tokens and the added "
                "token's normalized flag"
            ),
            fix='set "split_special_tokens": false and register the tag with normalized=false',
        )

    if export_config.audio_token_id is not None and export_config.audio_token_id != tag_id:
        report.add(
            "error",
            "audio-token-id-mismatch",
            file=CONFIG_FILE,
            key="audio_token_id",
            message=(
                f"audio_token_id is {export_config.audio_token_id} but the tokenizer gives {tag!r} "
                f"the id {tag_id}; the model would look for audio at the wrong token"
            ),
            fix=f"set audio_token_id to {tag_id}",
        )


def _template_text(template: Any) -> str:
    """Return the default template of a stored chat template (a string or a list of named ones)."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default":
                return str(entry.get("template") or "")
    return ""


def _first_difference(left: str, right: str) -> int:
    return len(os.path.commonprefix([left, right]))
