"""Findings of `check`: one problem in an export directory, and the report that collects them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

# Stable finding codes and what each one means. Tests and CI scripts match on the code, so a
# code is never renamed; a new check gets a new code.
FINDING_CODES: dict[str, str] = {
    # The directory and its files.
    "export-dir-missing": "the export directory does not exist or is not a directory",
    "file-missing": "a file the loaders read is missing",
    "file-invalid-json": "a JSON file does not parse, or is not a JSON object",
    "file-unreadable": "a text file cannot be read as UTF-8",
    "pickle-file": "a pickle-based file (.bin, .pt, .pth, .pkl, .ckpt) is in the export",
    # config.json.
    "config-model-type-missing": "config.json has no model_type",
    "config-model-type-unknown": "config.json's model_type is not speechlm_bridge",
    "config-architectures-missing": "config.json has no architectures list",
    "config-architectures-unknown": "config.json's architectures do not name the speechlm-bridge model class",
    "config-invalid": "transformers cannot build the config from config.json",
    "config-prompt-format-unknown": "config.json's prompt_format is not a known NeMo prompt format",
    "config-prompt-format-not-chat": "config.json's prompt_format has no chat template (parity is skipped)",
    "config-audio-locator-tag-missing": "config.json has no audio_locator_tag",
    "config-audio-token-id-missing": "config.json has no integer audio_token_id",
    "config-dtype-missing": "config.json names no dtype, so tensor dtypes are not checked",
    "config-dtype-invalid": "config.json's dtype is not a torch floating-point dtype",
    "config-tie-word-embeddings-mismatch": "tie_word_embeddings differs between config.json and its text_config",
    "model-build-failed": "the model that config.json describes cannot be built",
    # Tokenizer and chat template.
    "tokenizer-class-missing": "tokenizer_config.json names no tokenizer_class",
    "tokenizer-class-unknown": "the installed transformers cannot import tokenizer_class",
    "tokenizer-class-not-portable": "tokenizer_class is a transformers 5.x wrapper name that 4.x loaders cannot import",
    "tokenizer-extra-special-tokens-not-dict": "extra_special_tokens is not a dict, which transformers 4.x rejects",
    "tokenizer-load-failed": "AutoTokenizer cannot load the export's tokenizer",
    "chat-template-missing": "the export has no chat template",
    "chat-template-empty": "the chat template is empty",
    "chat-template-files-disagree": "the inline chat_template and chat_template.jinja differ",
    "chat-template-differs-from-backbone": "the chat template is not byte-identical to the backbone's",
    "backbone-not-found": "the --backbone directory does not exist",
    "backbone-chat-template-missing": "the --backbone directory has no chat template to compare with",
    "audio-tag-not-in-tokenizer": "the audio locator tag is not an added token of the tokenizer",
    "audio-tag-not-single-token": "the audio locator tag does not tokenize as exactly one token",
    "audio-tag-mismatch": "the tokenizer or processor names another audio tag than config.json",
    "audio-token-id-mismatch": "config.json's audio_token_id is not the tokenizer's id of the tag",
    # Generation config.
    "end-of-turn-unknown": "the chat template ends an assistant turn with no special token",
    "generation-eos-missing": "generation_config.json has no eos_token_id",
    "generation-eos-missing-end-of-turn": "the generation eos ids miss the template's end-of-turn token",
    # Weights.
    "weights-missing": "the export has no model.safetensors and no model.safetensors.index.json",
    "weights-index-missing": "sharded model-*-of-*.safetensors files exist without an index",
    "weights-index-invalid": "model.safetensors.index.json has no valid weight_map",
    "weights-layout-ambiguous": "both model.safetensors and model.safetensors.index.json exist",
    "weights-path-escapes": "the index names a file outside the export directory",
    "weights-shard-missing": "the index names a safetensors file that does not exist",
    "weights-file-corrupt": "a safetensors file is truncated or its header is invalid",
    "weights-file-unreferenced": "a safetensors file is in the directory but not in the index",
    "weights-index-tensor-not-in-shard": "the index maps a tensor to a file that does not contain it",
    "weights-shard-tensor-not-in-index": "a safetensors file contains a tensor the index does not list",
    "weights-tensor-missing": "a tensor the model expects is not stored",
    "weights-tensor-unexpected": "a stored tensor is not a parameter or buffer of the model",
    "weights-shape-mismatch": "a stored tensor's shape differs from the model config's",
    "weights-dtype-mismatch": "stored floating-point tensors differ from config.json's dtype",
    "weights-tied-tensor-stored": "embeddings are tied but the tied copy (lm_head) is stored too",
    "weights-lm-head-missing": "embeddings are untied but lm_head is not stored",
    "embedding-rows-too-few": "the embedding table has fewer rows than the tokenizer has tokens",
    # Parity of the training formatter and the exported template.
    "parity-skipped": "the parity section did not run",
    "parity-formatter-failed": "the training formatter cannot be built from the export",
    "parity-dialog-skipped": "the chat template cannot express one canonical dialog",
    "parity-dialog-failed": "the plain or the audio dialog cannot be rendered on both sides",
    "parity-context-mismatch": "training and serving give different context ids for a dialog",
}


@dataclass(frozen=True)
class Finding:
    """One problem (or note) in an export directory.

    `file` is relative to the export directory, or None for the directory itself. `key` is the
    config key (dotted for nested keys), the tensor name or the dialog name concerned.
    """

    severity: Severity
    code: str
    file: str | None
    key: str | None
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckReport:
    """All findings of one `check_export` run; `ok` when none is an error."""

    export_dir: Path
    findings: list[Finding] = field(default_factory=list)

    def add(
        self,
        severity: Severity,
        code: str,
        *,
        file: str | None,
        key: str | None = None,
        message: str,
        fix: str = "",
    ) -> Finding:
        """Record a finding; `code` must be one of FINDING_CODES."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        if code not in FINDING_CODES:
            raise ValueError(f"finding code {code!r} is not registered in FINDING_CODES")
        finding = Finding(severity, code, file, key, message, fix)
        self.findings.append(finding)
        return finding

    @property
    def errors(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == "warning"]

    @property
    def infos(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.severity == "info"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def with_code(self, code: str) -> list[Finding]:
        """Return the findings with `code`, in the order they were found."""
        return [finding for finding in self.findings if finding.code == code]

    def summary(self) -> dict[str, int]:
        """Return the number of findings per severity."""
        return {
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "infos": len(self.infos),
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the report as one JSON-ready document (the CLI's `--json` output)."""
        return {
            "export_dir": str(self.export_dir),
            "ok": self.ok,
            "summary": self.summary(),
            "findings": [finding.to_dict() for finding in self.findings],
        }
