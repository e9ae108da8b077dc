"""Export the backbone's tokenizer with the audio locator tag and the exact chat template.

The exported `tokenizer_config.json` is written so that transformers 4.x-era loaders (vLLM's
tokenizer loading included) and transformers 5.x read the same tokenizer:

- `tokenizer_class` is a class both generations know (the backbone's own, e.g. `Qwen2Tokenizer`, or
  `PreTrainedTokenizerFast`), never the 5.x wrapper name `TokenizersBackend`;
- `extra_special_tokens` is a dict (`{"audio_token": "<|audio|>"}`); 4.x rejects the list form
  that 5.x writes, so the backbone's list moves to `additional_special_tokens`;
- the chat template is stored once, inline, byte-identical to the backbone's. A separate
  `chat_template.jinja` is not written, because 5.x lets that file override the inline copy and
  4.x before 4.43 ignores it: one copy cannot disagree with itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechlm_bridge.errors import ConfigError

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    CHAT_TEMPLATE_FILE,
)
# Names transformers 5.x writes for "whatever backend was loaded"; 4.x cannot import them.
_WRAPPER_TOKENIZER_CLASSES = {"TokenizersBackend", "PythonBackend", "SentencePieceBackend"}
_FALLBACK_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Keys transformers writes that describe how a file was loaded, not the tokenizer.
_RUNTIME_KEYS = ("local_files_only", "is_local", "backend", "name_or_path")


@dataclass
class ExportedTokenizer:
    """Decisions of the tokenizer export, for config.json and generation_config.json."""

    tokenizer: Any
    audio_token_id: int
    chat_template: str | list | dict | None
    added_audio_token: bool


def read_chat_template(tokenizer_dir: Path) -> str | list | None:
    """Read the chat template exactly as stored, with transformers 5.x precedence.

    A separate `chat_template.jinja` wins over the inline `chat_template` key, as in `AutoTokenizer`.
    When both exist and differ, a warning names both files and the inline one is dropped.
    """
    config_path = tokenizer_dir / "tokenizer_config.json"
    inline = None
    if config_path.is_file():
        inline = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    template_path = tokenizer_dir / CHAT_TEMPLATE_FILE
    if template_path.is_file():
        separate = template_path.read_text(encoding="utf-8")
        if inline is not None and inline != separate:
            logger.warning(
                "%s and the chat_template in %s differ; using %s, as transformers 5.x does",
                template_path, config_path, template_path.name,
            )
        return separate
    return inline


def load_backbone_tokenizer(tokenizer_dir: Path):
    """Load a tokenizer from a local directory, with errors that name the file and the fix.

    Only the tokenizer files are read: a NeMo export's config.json (`model_type: nemo_speechlm`)
    beside them would otherwise make transformers guess at the tokenizer's model type.
    """
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="speechlm-bridge-tokenizer-") as isolated:
        for name in TOKENIZER_FILE_NAMES:
            source = tokenizer_dir / name
            if source.is_file():
                check_json_file(source)
                shutil.copyfile(source, Path(isolated) / name)
        try:
            return AutoTokenizer.from_pretrained(isolated, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"cannot load the backbone tokenizer from {tokenizer_dir}: {err}. Pass --backbone with "
                "a directory that holds tokenizer.json and tokenizer_config.json."
            ) from err


def check_json_file(path: Path) -> None:
    """Raise ConfigError when a `.json` tokenizer file does not parse, with a hint for flattened symlinks."""
    if path.suffix != ".json":
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if len(text) < 256 and "/" in text and "\n" not in text.strip():
            hint = (
                f" It contains only {text.strip()!r}, which looks like a symbolic link that a copy "
                "turned into a text file; copy the directory with links resolved (cp -rL)."
            )
        raise ConfigError(
            f"tokenizer file {path} is not valid JSON ({err}).{hint} Or pass --backbone with an "
            "intact copy of the backbone's tokenizer."
        ) from err


def export_tokenizer(tokenizer_dir: Path, output_dir: Path, *, audio_locator_tag: str) -> ExportedTokenizer:
    """Save the backbone tokenizer into `output_dir` with `audio_locator_tag` as one special token."""
    from tokenizers import AddedToken

    chat_template = read_chat_template(tokenizer_dir)
    if chat_template is None:
        logger.warning(
            "%s has no chat template; the export can run raw prompts but not chat rendering",
            tokenizer_dir,
        )
    source_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = load_backbone_tokenizer(tokenizer_dir)

    # 1. Register the tag. NeMo adds it after the base vocabulary (id = len(tokenizer)), so a
    #    tokenizer that already has it (NeMo's own exports) keeps its id.
    existing_id = tokenizer.convert_tokens_to_ids(audio_locator_tag)
    added = existing_id is None or existing_id == tokenizer.unk_token_id
    if added:
        tokenizer.add_tokens([AddedToken(audio_locator_tag, special=True, normalized=False)], special_tokens=True)
    audio_token_id = tokenizer.convert_tokens_to_ids(audio_locator_tag)
    _check_single_token(tokenizer, audio_locator_tag, audio_token_id, tokenizer_dir)

    # 2. Save, then rewrite tokenizer_config.json for both loader generations.
    tokenizer.save_pretrained(str(output_dir))
    (output_dir / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    config_path = output_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = _portable_tokenizer_config(config, source_config, audio_locator_tag, chat_template)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    logger.info(
        "tokenizer: %s audio locator tag %r as id %d", "added" if added else "kept", audio_locator_tag, audio_token_id
    )
    return ExportedTokenizer(
        tokenizer=tokenizer, audio_token_id=audio_token_id, chat_template=chat_template, added_audio_token=added
    )


def _portable_tokenizer_config(
    config: dict, source_config: dict, audio_locator_tag: str, chat_template: str | list | None
) -> dict:
    config = {key: value for key, value in config.items() if key not in _RUNTIME_KEYS}

    tokenizer_class = source_config.get("tokenizer_class") or config.get("tokenizer_class")
    if not tokenizer_class or tokenizer_class in _WRAPPER_TOKENIZER_CLASSES:
        tokenizer_class = _FALLBACK_TOKENIZER_CLASS
    config["tokenizer_class"] = tokenizer_class

    named = {}
    for source in (source_config.get("extra_special_tokens"), config.get("extra_special_tokens")):
        if isinstance(source, dict):
            named.update(source)
    extra_list = [
        token
        for source in (source_config.get("additional_special_tokens"), config.get("extra_special_tokens"))
        if isinstance(source, list)
        for token in source
    ]
    extra_list = list(dict.fromkeys(token for token in extra_list if token != audio_locator_tag))
    named["audio_token"] = audio_locator_tag
    config["extra_special_tokens"] = named
    if extra_list:
        config["additional_special_tokens"] = extra_list
    else:
        config.pop("additional_special_tokens", None)

    if chat_template is None:
        config.pop("chat_template", None)
    else:
        config["chat_template"] = chat_template
    return config


def _check_single_token(tokenizer, tag: str, token_id: int, source: Path) -> None:
    ids = tokenizer.encode(f"a{tag}b", add_special_tokens=False)
    if ids.count(token_id) != 1:
        raise ConfigError(
            f"the audio locator tag {tag!r} does not encode as one token with the tokenizer from "
            f"{source} (got ids {ids}). Use a tag that does not collide with existing text, "
            "such as <|audio|>, in model.audio_locator_tag."
        )
