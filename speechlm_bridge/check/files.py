"""The export directory as files: JSON documents and forbidden pickle files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speechlm_bridge.check.findings import CheckReport, Severity
from speechlm_bridge.errors import ConfigError

# Suffixes of files that torch.load or pickle read, which can run code on load. An export
# carries safetensors only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def read_json_object(path: Path) -> dict[str, Any]:
    """Read a JSON file whose top level is an object; raise ConfigError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read as UTF-8 text: {err}") from err
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(document, dict):
        raise ConfigError(f"{path} must contain a JSON object, found {type(document).__name__}")
    return document


def load_json_file(
    report: CheckReport,
    name: str,
    *,
    missing_severity: Severity | None,
    missing_fix: str,
) -> dict[str, Any] | None:
    """Read `name` from the export directory, recording a finding when it is missing or invalid.

    `missing_severity` None means the file is optional and its absence is no finding.
    """
    path = report.export_dir / name
    if not path.is_file():
        if missing_severity is not None:
            report.add(
                missing_severity,
                "file-missing",
                file=name,
                message=f"{name} is missing from {report.export_dir}",
                fix=missing_fix,
            )
        return None
    try:
        return read_json_object(path)
    except ConfigError as err:
        report.add(
            "error",
            "file-invalid-json",
            file=name,
            message=str(err),
            fix=f"re-run `speechlm-bridge export`, or repair {name} by hand",
        )
        return None


def check_pickle_files(report: CheckReport) -> None:
    """Record every pickle-based file under the export directory as an error."""
    for path in sorted(report.export_dir.rglob("*")):
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
            relative = path.relative_to(report.export_dir).as_posix()
            report.add(
                "error",
                "pickle-file",
                file=relative,
                message=(
                    f"{relative} is a pickle-based file; loading it can run arbitrary code, and "
                    "the loaders of an export read safetensors only"
                ),
                fix=f"delete {relative}; the weights belong in model*.safetensors",
            )
