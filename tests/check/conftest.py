"""Real exports to break: the demo's tiny backbone and random NeMo-named weights, exported for real."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from speechlm_bridge.cli import main


@dataclass(frozen=True)
class DemoExport:
    """A clean export and the backbone directory it was exported from."""

    export_dir: Path
    backbone_dir: Path


def build_demo_export(root: Path, *, max_shard_size: str = "5GB") -> DemoExport:
    """Export the demo's random SALM weights (a NeMo-named .safetensors file) into `root/export`.

    With max_shard_size="1MB" the weights are split into two shards and an index.
    """
    from safetensors.torch import save_file

    from speechlm_bridge.demo.backbone import write_demo_backbone
    from speechlm_bridge.demo.training_run import random_salm_state_dict, write_experiment_config
    from speechlm_bridge.export.pipeline import export_checkpoint

    backbone_dir = root / "backbone"
    backbone_config = write_demo_backbone(backbone_dir)
    config_path = root / "exp_config.yaml"
    model_config = write_experiment_config(
        config_path, backbone_dir=str(backbone_dir), hidden_size=backbone_config["hidden_size"]
    )
    weights = root / "weights.safetensors"
    save_file(random_salm_state_dict(backbone_config, model_config), str(weights))
    export_dir = root / "export"
    export_checkpoint(weights, config=config_path, output=export_dir, max_shard_size=max_shard_size)
    return DemoExport(export_dir=export_dir, backbone_dir=backbone_dir)


def broken_copy(source: Path, tmp_path: Path) -> Path:
    """Copy an export to `tmp_path/export`, to be broken in one way by the test."""
    target = tmp_path / "export"
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    """Apply `edit` to the JSON object in `path` in place and write it back."""
    document = json.loads(path.read_text(encoding="utf-8"))
    edit(document)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def run_check(capsys) -> Callable[..., tuple[int, dict]]:
    """Run `speechlm-bridge check DIR --json` in-process; return the exit status and the report."""

    def run(export_dir: Path, *options: str) -> tuple[int, dict]:
        capsys.readouterr()
        status = main(["check", str(export_dir), "--json", *options])
        return status, json.loads(capsys.readouterr().out)

    return run


def findings(report: dict, code: str) -> list[tuple[str | None, str | None]]:
    """Return `(file, key)` of each finding with `code` in a JSON report."""
    return [(finding["file"], finding["key"]) for finding in report["findings"] if finding["code"] == code]


def problem_codes(report: dict) -> set[str]:
    """Return the codes of the errors and warnings in a JSON report."""
    return {finding["code"] for finding in report["findings"] if finding["severity"] != "info"}
