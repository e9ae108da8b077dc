"""`speechlm-bridge export` as a user runs it: exit codes, messages, and no half-written output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from speechlm_bridge.cli import main


@pytest.fixture
def workspace(tmp_path, nemo_salm_dir, monkeypatch):
    """A writable copy of the small NeMo fixture files, as the working directory."""
    for name in ("exp_config.yaml", "exp_config_fsdp2.yaml"):
        shutil.copy(nemo_salm_dir / name, tmp_path / name)
    shutil.copytree(nemo_salm_dir / "backbone", tmp_path / "backbone")
    shutil.copytree(nemo_salm_dir / "asr", tmp_path / "asr")
    (tmp_path / "lightning").mkdir()
    (tmp_path / "lightning" / "step=2.ckpt").symlink_to(nemo_salm_dir / "lightning" / "step=2.ckpt")
    for path in tmp_path.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith(".out"))


def _run_failing(capsys, args: list[str], workspace: Path, match: str) -> str:
    status = main(args)
    err = capsys.readouterr().err
    assert status == 1
    assert match in err, err
    assert "Traceback" not in err
    assert not (workspace / "out").exists()
    assert _leftovers(workspace) == []
    return err


def test_export_cli_writes_directory(workspace, capsys):
    status = main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out"])
    out = capsys.readouterr().out
    assert status == 0
    assert "exported lightning checkpoint to out" in out
    assert (workspace / "out" / "model.safetensors").is_file()
    assert _leftovers(workspace) == []


def test_export_cli_sharded_float32(workspace):
    status = main([
        "export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out",
        "--dtype", "float32", "--max-shard-size", "2MB",
    ])
    assert status == 0
    index = json.loads((workspace / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    config = json.loads((workspace / "out" / "config.json").read_text())
    assert config["dtype"] == "float32"


def test_existing_output_needs_overwrite(workspace, capsys):
    assert main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out"]) == 0
    (workspace / "out" / "stale.txt").write_text("from an earlier export")
    status = main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out"])
    assert status == 1
    assert "--overwrite" in capsys.readouterr().err

    status = main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out", "--overwrite"])
    assert status == 0
    assert not (workspace / "out" / "stale.txt").exists()
    assert (workspace / "out" / "config.json").is_file()
    assert _leftovers(workspace) == []


def test_overwrite_keeps_foreign_directory(workspace, capsys):
    (workspace / "out").mkdir()
    (workspace / "out" / "notes.txt").write_text("mine")
    status = main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out", "--overwrite"])
    assert status == 1
    assert "is not one" in capsys.readouterr().err
    assert (workspace / "out" / "notes.txt").read_text() == "mine"


def test_overwrite_never_deletes_inputs(workspace, capsys):
    status = main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "lightning", "--overwrite"])
    assert status == 1
    assert "contains the input lightning/step=2.ckpt" in capsys.readouterr().err
    assert (workspace / "lightning" / "step=2.ckpt").exists()

    status = main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", ".", "--overwrite"])
    assert status == 1
    assert "working directory" in capsys.readouterr().err
    assert (workspace / "exp_config.yaml").exists()
    assert sorted(path.name for path in workspace.iterdir() if path.name.startswith(".")) == []


def test_output_is_a_file(workspace, capsys):
    (workspace / "afile").write_text("x")
    status = main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "afile"])
    assert status == 1
    assert "exists and is a file" in capsys.readouterr().err


def test_invalid_shard_size_rejected_early(workspace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "lightning/step=2.ckpt", "--output", "out", "--max-shard-size", "lots"])
    assert exit_info.value.code == 2
    assert "invalid size 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "lightning/step=2.ckpt", "--output", "out", "--max-shard-size", "5"])
    assert "the smallest is 1MB" in capsys.readouterr().err


def test_wrong_backbone_names_sizes(workspace, capsys, backbones_dir):
    err = _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out",
         "--backbone", str(backbones_dir / "qwen3")],
        workspace,
        "hidden_size 8 in the checkpoint vs 1024 in the config",
    )
    assert "num_hidden_layers 2 in the checkpoint vs 28 in the config" in err


def test_backbone_without_config_json(workspace, capsys):
    (workspace / "empty-backbone").mkdir()
    _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out",
         "--backbone", "empty-backbone"],
        workspace,
        "--backbone empty-backbone has no config.json",
    )


def test_missing_pretrained_llm_key(workspace, capsys):
    config = yaml.safe_load((workspace / "exp_config.yaml").read_text())
    config["model"]["pretrained_lm"] = config["model"].pop("pretrained_llm")
    (workspace / "typo.yaml").write_text(yaml.safe_dump(config))
    _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "typo.yaml", "--output", "out"],
        workspace,
        "typo.yaml has no `model.pretrained_llm`. It has `model.pretrained_lm`; is that a misspelling?",
    )


def _start_export_and_wait_for_shard(workspace):
    """Start an export in a subprocess and return it once a weight file is being staged."""
    import os
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "speechlm_bridge.cli", "export", "lightning/step=2.ckpt", "--config",
         "exp_config.yaml", "--output", "out", "--max-shard-size", "1MB"],
        cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    # The staged weights are followed by `check`, which takes seconds, so the signal lands before
    # the rename.
    deadline = time.monotonic() + 120
    while not list(workspace.glob(".out.partial-*/*.safetensors")) and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the export staged no weight file within 120 s")
        time.sleep(0.01)
    assert process.poll() is None, "the export finished before a weight file was seen"
    return process


def test_sigterm_cleans_staging(workspace):
    import signal

    process = _start_export_and_wait_for_shard(workspace)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)

    assert process.returncode == 143, err[-2000:]
    assert "export stopped: out is unchanged and no partial export was left; run the command again" in err
    assert "terminated" in err
    assert not (workspace / "out").exists()
    assert _leftovers(workspace) == []


def test_sigkill_leaves_output_untouched(workspace):
    import signal

    process = _start_export_and_wait_for_shard(workspace)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=120)

    assert process.returncode == -signal.SIGKILL
    assert not (workspace / "out").exists()
    # A killed process cannot clean up: only its hidden staging directory remains.
    assert [name.split("-")[0] for name in _leftovers(workspace)] == [".out.partial"]


def test_missing_checkpoint(workspace, capsys):
    _run_failing(capsys, ["export", "nope.ckpt", "--config", "exp_config.yaml", "--output", "out"], workspace, "nope.ckpt")


def test_unreadable_checkpoint(workspace, capsys):
    (workspace / "broken.ckpt").write_bytes(b"this is not a checkpoint")
    _run_failing(
        capsys, ["export", "broken.ckpt", "--config", "exp_config.yaml", "--output", "out"], workspace, "broken.ckpt"
    )


def test_missing_config_file(workspace, capsys):
    _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "missing.yaml", "--output", "out"],
        workspace,
        "--config missing.yaml does not exist",
    )


def test_config_without_required_key(workspace, capsys):
    config = yaml.safe_load((workspace / "exp_config.yaml").read_text())
    del config["model"]["audio_locator_tag"]
    (workspace / "bad.yaml").write_text(yaml.safe_dump(config))
    _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "bad.yaml", "--output", "out"],
        workspace,
        "bad.yaml has no `model.audio_locator_tag`",
    )


def test_config_without_model_section(workspace, capsys):
    (workspace / "bad.yaml").write_text("trainer:\n  devices: 1\n")
    _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "bad.yaml", "--output", "out"],
        workspace,
        "has no `model:` section",
    )


def test_backbone_without_architectures(workspace, capsys):
    config_path = workspace / "backbone" / "tiny-qwen3" / "config.json"
    config = json.loads(config_path.read_text())
    del config["architectures"]
    config_path.write_text(json.dumps(config))
    err = _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out"],
        workspace,
        "has no `architectures` list",
    )
    assert "tiny-qwen3/config.json" in err


def test_hub_id_backbone_needs_override(workspace, capsys):
    config = yaml.safe_load((workspace / "exp_config.yaml").read_text())
    config["model"]["pretrained_llm"] = "Qwen/Qwen3-1.7B"
    (workspace / "hub.yaml").write_text(yaml.safe_dump(config))
    _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "hub.yaml", "--output", "out"],
        workspace,
        "pass --backbone",
    )
    status = main([
        "export", "lightning/step=2.ckpt", "--config", "hub.yaml", "--output", "out",
        "--backbone", "backbone/tiny-qwen3",
    ])
    assert status == 0


def test_missing_asr_needs_override(workspace, capsys):
    shutil.move(workspace / "asr", workspace / "elsewhere")
    _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out"],
        workspace,
        "--asr",
    )
    status = main([
        "export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out",
        "--asr", "elsewhere/tiny-fastconformer-ctc.nemo",
    ])
    assert status == 0


def test_unsupported_modality_adapter(workspace, capsys):
    config = yaml.safe_load((workspace / "exp_config.yaml").read_text())
    config["model"]["perception"]["modality_adapter"] = {
        "_target_": "nemo.collections.speechlm2.modules.perception.QformerConnector",
        "prompt_size": 4,
    }
    (workspace / "qformer.yaml").write_text(yaml.safe_dump(config))
    _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "qformer.yaml", "--output", "out"],
        workspace,
        "QformerConnector",
    )


def test_dcp_without_meta_asks_for_config(workspace, capsys, nemo_salm_dir):
    # Without Lightning's meta.pt, a torch.distributed checkpoint stores no model config.
    dcp_dir = workspace / "dcp"
    dcp_dir.mkdir()
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (dcp_dir / name).symlink_to(nemo_salm_dir / "dcp" / "step=2" / name)
    _run_failing(capsys, ["export", "dcp", "--output", "out"], workspace, "--config")
    status = main(["export", "dcp", "--config", "exp_config_fsdp2.yaml", "--output", "out"])
    assert status == 0


def test_help_names_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "speechlm_bridge.cli", "export", "--help"],
        capture_output=True, text=True, check=True,
    )
    for option in ("--config", "--output", "--backbone", "--asr", "--dtype", "--max-shard-size", "--overwrite"):
        assert option in result.stdout


def test_unknown_prompt_format(workspace, capsys):
    config = yaml.safe_load((workspace / "exp_config.yaml").read_text())
    config["model"]["prompt_format"] = "qwen4"
    (workspace / "typo.yaml").write_text(yaml.safe_dump(config))
    err = _run_failing(
        capsys,
        ["export", "lightning/step=2.ckpt", "--config", "typo.yaml", "--output", "out"],
        workspace,
        "`model.prompt_format` in typo.yaml: unknown prompt_format 'qwen4'",
    )
    assert "qwen3" in err


def test_overwrite_never_deletes_config_named_asr(workspace, capsys):
    # The ASR model named by model.pretrained_asr is an input too, not only --asr.
    assert main(["export", "lightning/step=2.ckpt", "--config", "exp_config.yaml", "--output", "out"]) == 0
    shutil.copy(workspace / "asr" / "tiny-fastconformer-ctc.nemo", workspace / "out" / "asr.nemo")
    config = yaml.safe_load((workspace / "exp_config.yaml").read_text())
    config["model"]["pretrained_asr"] = "out/asr.nemo"
    (workspace / "asr-inside.yaml").write_text(yaml.safe_dump(config))
    status = main(["export", "lightning/step=2.ckpt", "--config", "asr-inside.yaml", "--output", "out", "--overwrite"])
    assert status == 1
    assert "contains the input out/asr.nemo" in capsys.readouterr().err
    assert (workspace / "out" / "asr.nemo").is_file()


def test_bad_paths_fail_before_reading(workspace, capsys, monkeypatch):
    import speechlm_bridge.checkpoints as checkpoints

    def fail_read(path):
        raise AssertionError("the checkpoint was read before the paths were checked")

    monkeypatch.setattr(checkpoints, "read_checkpoint", fail_read)
    for option in ("--config", "--backbone", "--asr"):
        status = main(["export", "lightning/step=2.ckpt", "--output", "out", option, "missing-path"])
        assert status == 1
        assert f"{option} missing-path does not exist" in capsys.readouterr().err


def test_lora_config_without_adapters_noted(workspace, capsys, nemo_salm_dir):
    shutil.copy(nemo_salm_dir / "exp_config_lora.yaml", workspace / "lora.yaml")
    status = main(["export", "lightning/step=2.ckpt", "--config", "lora.yaml", "--output", "out"])
    assert status == 0
    assert "the config has `model.lora` but the checkpoint has no LoRA adapters" in capsys.readouterr().out
