"""CheckReport: registered codes only, severity counts, the JSON document."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechlm_bridge.check import FINDING_CODES, CheckReport


def test_findings_report_summary():
    report = CheckReport(export_dir=Path("out"))
    report.add("error", "pickle-file", file="a.bin", message="m", fix="f")
    report.add("warning", "weights-file-unreferenced", file="b.safetensors", message="m")
    report.add("info", "parity-skipped", file="tokenizer_config.json", message="m")

    assert report.summary() == {"errors": 1, "warnings": 1, "infos": 1}
    assert not report.ok
    assert [finding.code for finding in report.with_code("pickle-file")] == ["pickle-file"]


def test_findings_report_to_dict():
    report = CheckReport(export_dir=Path("out"))
    report.add("warning", "config-dtype-missing", file="config.json", key="dtype", message="no dtype", fix="set it")

    assert report.to_dict() == {
        "export_dir": "out",
        "ok": True,
        "summary": {"errors": 0, "warnings": 1, "infos": 0},
        "findings": [
            {
                "severity": "warning",
                "code": "config-dtype-missing",
                "file": "config.json",
                "key": "dtype",
                "message": "no dtype",
                "fix": "set it",
            }
        ],
    }


def test_findings_unknown_code_rejected():
    report = CheckReport(export_dir=Path("out"))

    with pytest.raises(ValueError, match="'no-such-code' is not registered"):
        report.add("error", "no-such-code", file=None, message="m")


def test_findings_unknown_severity_rejected():
    report = CheckReport(export_dir=Path("out"))

    with pytest.raises(ValueError, match="severity must be one of"):
        report.add("fatal", "pickle-file", file=None, message="m")


def test_findings_codes_are_kebab_case():
    for code, description in FINDING_CODES.items():
        assert code == code.lower(), code
        assert " " not in code, code
        assert "_" not in code, code
        assert description, code
