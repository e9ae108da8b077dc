"""`speechlm-bridge check` as CI and users run it: output lines, JSON document, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from speechlm_bridge.cli import main
from tests.check.conftest import DemoExport, broken_copy, build_demo_export, edit_json


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoExport:
    return build_demo_export(tmp_path_factory.mktemp("cli"))


def test_cli_clean_export_exits_zero(demo, capsys):
    status = main(["check", str(demo.export_dir), "--backbone", str(demo.backbone_dir)])
    out = capsys.readouterr().out

    assert status == 0
    lines = out.splitlines()
    # The demo template never reads enable_thinking: two info lines, then the summary.
    assert [line.split(":")[0] for line in lines] == ["info", "info", "OK"]
    assert lines[-1] == f"OK: {demo.export_dir}: 0 error(s), 0 warning(s), 2 info"


def test_cli_groups_errors_first(demo, tmp_path, capsys):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / "tokenizer_config.json", lambda config: config.update(tokenizer_class="TokenizersBackend"))
    edit_json(export_dir / "config.json", lambda config: config.update(architectures=["Qwen3ForCausalLM"]))

    status = main(["check", str(export_dir)])
    lines = capsys.readouterr().out.splitlines()

    assert status == 1
    assert lines[0].startswith("error: config-architectures-unknown: config.json [architectures]: ")
    assert "Fix: set \"architectures\": [\"SpeechLMBridgeForConditionalGeneration\"]." in lines[0]
    assert lines[1].startswith("warning: tokenizer-class-not-portable: tokenizer_config.json [tokenizer_class]: ")
    assert lines[-1] == f"FAILED: {export_dir}: 1 error(s), 1 warning(s), 2 info"


def test_cli_missing_export_dir(tmp_path, capsys):
    status = main(["check", str(tmp_path / "nothing-here")])
    out = capsys.readouterr().out

    assert status == 1
    assert out.splitlines()[0] == (
        f"error: export-dir-missing: {tmp_path / 'nothing-here'}: export directory "
        f"{tmp_path / 'nothing-here'} does not exist. Fix: pass the directory that "
        "`speechlm-bridge export --output` wrote."
    )


def test_cli_help_lists_check(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])

    assert "check" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_json_subprocess(demo, tmp_path):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / "generation_config.json", lambda config: config.update(eos_token_id=[0]))

    result = subprocess.run(
        [sys.executable, "-m", "speechlm_bridge.cli", "check", str(export_dir), "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )

    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert document["export_dir"] == str(export_dir)
    assert document["summary"] == {"errors": 1, "warnings": 0, "infos": 2}
    error = next(finding for finding in document["findings"] if finding["severity"] == "error")
    assert error["code"] == "generation-eos-missing-end-of-turn"
    assert error["file"] == "generation_config.json"
    assert error["key"] == "eos_token_id"
    assert set(error) == {"severity", "code", "file", "key", "message", "fix"}
