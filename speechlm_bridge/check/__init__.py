"""Check an export directory for what makes transformers or vLLM reject it, or load it wrongly.

`check_export(export_dir)` reads only configs, tokenizer files and safetensors headers, never
tensor data, so it takes seconds on exports of any size. Every problem becomes a `Finding` with
a stable `code`; the codes and their meaning are in `FINDING_CODES`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from speechlm_bridge.check.config import check_config
from speechlm_bridge.check.files import check_pickle_files
from speechlm_bridge.check.findings import FINDING_CODES, SEVERITIES, CheckReport, Finding, Severity
from speechlm_bridge.check.generation import check_generation
from speechlm_bridge.check.parity import check_parity
from speechlm_bridge.check.tokenizer import check_tokenizer
from speechlm_bridge.check.weights import check_weights

logger = logging.getLogger(__name__)

__all__ = ["FINDING_CODES", "SEVERITIES", "CheckReport", "Finding", "Severity", "check_export"]


def check_export(export_dir: str | os.PathLike[str], *, backbone: str | os.PathLike[str] | None = None) -> CheckReport:
    """Check an export directory and return all findings; raises nothing for a broken export.

    With `backbone` (the local backbone directory), the chat template must be byte-identical to
    the backbone's. A missing `export_dir` is an `export-dir-missing` error finding.
    """
    report = CheckReport(export_dir=Path(export_dir))
    if not report.export_dir.is_dir():
        state = "is not a directory" if report.export_dir.exists() else "does not exist"
        report.add(
            "error",
            "export-dir-missing",
            file=None,
            message=f"export directory {report.export_dir} {state}",
            fix="pass the directory that `speechlm-bridge export --output` wrote",
        )
        return report

    logger.info("checking %s", report.export_dir)
    check_pickle_files(report)
    export_config = check_config(report)
    tokenizer = check_tokenizer(report, export_config, backbone=Path(backbone) if backbone is not None else None)
    check_weights(report, export_config, tokenizer_length=len(tokenizer) if tokenizer is not None else None)
    check_generation(report, export_config, tokenizer)
    check_parity(report, export_config, tokenizer)
    summary = report.summary()
    logger.info(
        "checked %s: %d error(s), %d warning(s), %d info", report.export_dir,
        summary["errors"], summary["warnings"], summary["infos"],
    )
    return report
