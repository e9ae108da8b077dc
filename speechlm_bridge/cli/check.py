"""`speechlm-bridge check`: find what makes transformers or vLLM reject an export, or load it wrongly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from speechlm_bridge.check import CheckReport

_SEVERITY_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="check an export directory before transformers or vLLM loads it",
        description=(
            "Check an exported directory: config.json, the tokenizer and its chat template, the "
            "audio locator tag, generation_config.json, and the safetensors files against the "
            "model the config describes (headers only, no tensor data). Then render canonical "
            "dialogs with the training formatter and the exported template and compare their "
            "token ids. Exits with status 1 when any finding is an error, else 0."
        ),
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="directory written by `speechlm-bridge export`")
    parser.add_argument(
        "--backbone",
        metavar="DIR",
        help="local backbone directory; the exported chat template must be byte-identical to its template",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document with the findings and a summary, for CI",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from speechlm_bridge.check import check_export

    # Loading a broken export makes transformers warn about what the findings already report.
    transformers_logging.set_verbosity_error()
    report = check_export(args.export_dir, backbone=args.backbone)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print_report(report)
    return 0 if report.ok else 1


def print_report(report: CheckReport) -> None:
    """Print one line per finding, errors first, then a summary line."""
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    for severity in ("error", "warning", "info"):
        for finding in (finding for finding in report.findings if finding.severity == severity):
            location = finding.file or str(report.export_dir)
            if finding.key:
                location += f" [{finding.key}]"
            line = Text()
            line.append(f"{severity}: ", style=_SEVERITY_STYLES[severity])
            line.append(f"{finding.code}: {location}: {_sentence(finding.message)}")
            if finding.fix:
                line.append(f" Fix: {_sentence(finding.fix)}", style="dim")
            console.print(line)
    summary = report.summary()
    verdict = "FAILED" if summary["errors"] else "OK"
    console.print(
        Text(
            f"{verdict}: {report.export_dir}: {summary['errors']} error(s), {summary['warnings']} "
            f"warning(s), {summary['infos']} info",
            style="bold red" if summary["errors"] else "bold green",
        )
    )


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else f"{text}."
