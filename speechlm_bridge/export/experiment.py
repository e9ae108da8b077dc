"""The training side of an export: NeMo's `model:` config and the local paths it names.

NeMo's experiment YAML names the backbone and the ASR model by hub id or cluster path. Export
never downloads: each location resolves to a local directory, from a command-line override first,
then the path as written (absolute, relative to the working directory, then relative to the
config file).
"""

from __future__ import annotations

import copy
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from speechlm_bridge.errors import ConfigError

logger = logging.getLogger(__name__)

REQUIRED_MODEL_KEYS = ("pretrained_llm", "audio_locator_tag", "prompt_format", "perception")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelConfig:
    """NeMo's `model:` section and where it came from."""

    values: dict[str, Any]
    source: str
    base_dir: Path | None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.values or self.values[key] in (None, ""):
            close = difflib.get_close_matches(key, [str(name) for name in self.values], n=1)
            hint = f" It has `model.{close[0]}`; is that a misspelling?" if close and close[0] != key else ""
            raise ConfigError(
                f"{self.source} has no `model.{key}`.{hint} NeMo's SALM configs always set it; pass the "
                "experiment YAML that training saved (exp_config.yaml in the log directory) with --config."
            )
        value = self.values[key]
        if isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"`model.{key}` in {self.source} is an unresolved interpolation ({value!r}). Pass the "
                "resolved exp_config.yaml that training saved, or resolve it with OmegaConf.resolve."
            )
        return value


def read_experiment_config(path: str | Path) -> ModelConfig:
    """Read the `model:` section of a NeMo experiment YAML (or a bare model config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"experiment config {path} not found. Pass the YAML that training saved (e.g. "
            "<log_dir>/exp_config.yaml) with --config."
        )
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"experiment config {path} is not valid YAML: {err}") from err
    if not isinstance(document, dict):
        raise ConfigError(f"experiment config {path} must be a mapping with a `model:` section")
    model = document.get("model", document if "pretrained_llm" in document else None)
    if not isinstance(model, dict):
        raise ConfigError(
            f"experiment config {path} has no `model:` section. Pass the experiment YAML that "
            "NeMo's training script saved, whose `model:` section names pretrained_llm, "
            "audio_locator_tag, prompt_format and perception."
        )
    return ModelConfig(values=copy.deepcopy(model), source=str(path), base_dir=path.parent)


def resolve_local_dir(
    value: str | None,
    *,
    key: str,
    override: str | Path | None,
    option: str,
    base_dirs: list[Path],
    must_contain: tuple[str, ...] = (),
    source: str | None = None,
) -> Path:
    """Resolve a location from a config key to an existing local path, or raise ConfigError.

    `source` names the config file in the error raised when the key is not set.
    """
    if override is not None:
        candidate = Path(override)
        if not candidate.exists():
            raise ConfigError(f"{option} {candidate} does not exist")
        _check_contains(candidate, must_contain, f"{option} {candidate}")
        return candidate

    if not value:
        raise ConfigError(
            f"`{key}` is not set{f' in {source}' if source else ''}. Add it to the config or pass "
            f"{option} with a local path."
        )
    if value:
        candidates = [Path(value)] + [base / value for base in base_dirs if not Path(value).is_absolute()]
        for candidate in candidates:
            if candidate.exists():
                _check_contains(candidate, must_contain, f"`{key}` ({candidate})")
                logger.info("using %s = %s", key, candidate)
                return candidate
    raise ConfigError(
        f"`{key}` is {value!r}, which is not a local path (searched: the working directory"
        + "".join(f", {base}" for base in base_dirs)
        + f"). Export never downloads from the Hub: pass {option} with a local copy."
    )


def _check_contains(path: Path, names: tuple[str, ...], label: str) -> None:
    if not names:
        return
    if not path.is_dir():
        raise ConfigError(f"{label} is not a directory; it must contain {' or '.join(names)}")
    if not any((path / name).exists() for name in names):
        raise ConfigError(f"{label} has no {' or '.join(names)}; pass a directory that contains it")
