"""`speechlm-bridge serve`: the vLLM command it builds, and refusals before vLLM starts."""

from __future__ import annotations

import json
import sys

import pytest

from speechlm_bridge.cli import main
from speechlm_bridge.cli.serve import SERVER_MODULE


@pytest.fixture
def export_dir(tmp_path):
    directory = tmp_path / "export"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "speechlm_bridge"}))
    return directory


def test_print_command_adds_content_format_and_passes_args(export_dir, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert main(["serve", str(export_dir), "--port", "8001", "--print-command"]) == 0
    command = capsys.readouterr().out.split()
    assert command[:2] == ["HF_HUB_OFFLINE=1", "VLLM_CPU_KVCACHE_SPACE=1"]
    assert command[2:7] == [sys.executable, "-m", SERVER_MODULE, "--model", str(export_dir)]
    assert command[7:] == ["--chat-template-content-format", "string", "--port", "8001"]


def test_user_settings_win(export_dir, capsys, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    assert main(["serve", "--print-command", str(export_dir), "--chat-template-content-format=openai"]) == 0
    command = capsys.readouterr().out.split()
    assert command[1] == "VLLM_CPU_KVCACHE_SPACE=8"
    assert command[7:] == ["--chat-template-content-format=openai"]


def test_directory_without_config_is_refused(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 1
    assert "has no config.json; pass a directory written by `speechlm-bridge export`" in capsys.readouterr().err


def test_other_model_type_is_refused(export_dir, capsys):
    (export_dir / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert main(["serve", str(export_dir)]) == 1
    assert "has model_type 'qwen3', not 'speechlm_bridge'" in capsys.readouterr().err


def test_model_option_is_refused(export_dir, capsys):
    assert main(["serve", str(export_dir), "--model", "other"]) == 1
    assert "do not pass --model" in capsys.readouterr().err


def test_missing_vllm_names_the_extra(export_dir, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert main(["serve", str(export_dir)]) == 1
    assert "pip install 'speechlm-bridge[vllm]'" in capsys.readouterr().err


def _pretend_vllm_installed(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))


def test_broken_export_is_refused_before_vllm_starts(export_dir, capsys, monkeypatch):
    _pretend_vllm_installed(monkeypatch)
    monkeypatch.setattr("os.execve", lambda *a: pytest.fail("vLLM must not start for a broken export"))
    assert main(["serve", str(export_dir)]) == 1
    err = capsys.readouterr().err
    assert "error(s) by `speechlm-bridge check`" in err
    assert "pass --skip-check to start anyway" in err
    assert SERVER_MODULE not in err


def test_skip_check_starts_server_offline(export_dir, monkeypatch):
    _pretend_vllm_installed(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = {}
    monkeypatch.setattr("os.execve", lambda path, command, env: started.update(command=command, env=env))
    assert main(["serve", str(export_dir), "--skip-check", "--port", "9"]) == 0
    assert started["command"][-2:] == ["--port", "9"]
    assert "--skip-check" not in started["command"]
    assert started["env"]["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" in started["env"]
