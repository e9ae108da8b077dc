"""`speechlm-bridge demo`, run as the README's first set-up command runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from speechlm_bridge.demo.run import read_demo_audio


def test_demo_command_end_to_end(tmp_path):
    script = Path(sys.executable).with_name("speechlm-bridge")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(script), "demo", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for step in range(1, 6):
        assert f"[{step}/5]" in result.stdout
    assert "transcript (12 greedy tokens from random weights)" in result.stdout

    checkpoint = tmp_path / "demo" / "checkpoints" / "step=1"
    assert sorted(path.name for path in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    export = tmp_path / "demo" / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "speechlm_bridge"
    assert config["text_config"]["model_type"] == "qwen3"
    assert (export / "model.safetensors").is_file()
    assert not list((tmp_path / "demo").glob(".export.partial-*"))


def test_demo_audio_is_16khz_speech():
    audio, sampling_rate = read_demo_audio()
    assert sampling_rate == 16000
    assert audio.dtype.name == "float32"
    assert 2.0 < len(audio) / sampling_rate < 3.0
    assert 0.05 < abs(audio).max() <= 1.0


def test_demo_leaves_foreign_workdir_alone(tmp_path, monkeypatch, capsys):
    from speechlm_bridge.cli import main

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--workdir", "mine"]) == 1
    assert "was not made by the demo" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

    assert main(["demo", "--workdir", "."]) == 1
    assert "working directory" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").exists()
