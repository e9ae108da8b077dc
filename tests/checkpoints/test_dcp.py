"""DCP reading: real FSDP2 checkpoints from 2 and 3 gloo ranks, the NeMo fixture, broken copies."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from speechlm_bridge.checkpoints import read_checkpoint, split_salm_state_dict
from speechlm_bridge.errors import CheckpointError

WRITER = Path(__file__).with_name("fsdp2_writer.py")

# Row chunks of the 7-row `perception.proj.weight` per rank, as torch.chunk splits them.
EXPECTED_CHUNK_ROWS = {2: [4, 3], 3: [3, 3, 1]}


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def fsdp2_run(request, tmp_path_factory) -> tuple[Path, int]:
    """A checkpoint written by `fully_shard` + `dcp.save` on `world_size` CPU ranks."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"fsdp2_{world_size}ranks")
    result = subprocess.run(
        [sys.executable, str(WRITER), str(out_dir), str(world_size)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir, world_size


def corrupt_entries(directory: Path, prefix: str) -> int:
    """Overwrite the stored bytes of every DCP entry whose key starts with `prefix`.

    Returns the number of distinct entries hit (a sharded entry has one stored chunk per rank).
    """
    metadata = FileSystemReader(directory).read_metadata()
    hit = set()
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith(prefix):
            with open(directory / info.relative_path, "r+b") as handle:
                handle.seek(info.offset)
                handle.write(b"\xff" * info.length)
            hit.add(index.fqn)
    return len(hit)


def load_entry(directory: Path, key: str, target: object) -> object:
    state = {key: target}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=FileSystemReader(directory), no_dist=True)
    return state[key]


def test_fsdp2_shards_are_uneven(fsdp2_run):
    out_dir, world_size = fsdp2_run
    metadata = FileSystemReader(out_dir / "checkpoint").read_metadata()

    chunks = metadata.state_dict_metadata["state_dict.perception.proj.weight"].chunks
    assert [c.sizes[0] for c in sorted(chunks, key=lambda c: c.offsets[0])] == EXPECTED_CHUNK_ROWS[world_size]
    assert len(list((out_dir / "checkpoint").glob("__*_0.distcp"))) == world_size


def test_fsdp2_reads_full_tensors(fsdp2_run):
    out_dir, _ = fsdp2_run
    expected = load_file(out_dir / "expected.safetensors")

    loaded = read_checkpoint(out_dir / "checkpoint")

    assert loaded.format == "dcp"
    assert loaded.config is None
    assert sorted(loaded.state_dict) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded.state_dict[name].dtype == tensor.dtype, name
        assert torch.equal(loaded.state_dict[name], tensor), name
    assert loaded.state_dict["embed_tokens.weight"].dtype == torch.bfloat16
    assert loaded.state_dict["perception.proj.weight"].dtype == torch.float32


def test_fsdp2_optimizer_bytes_not_read(fsdp2_run, tmp_path):
    out_dir, _ = fsdp2_run
    broken = tmp_path / "checkpoint"
    shutil.copytree(out_dir / "checkpoint", broken)
    corrupted = corrupt_entries(broken, "optimizer_0.")
    optimizer_keys = [
        key
        for key in FileSystemReader(broken).read_metadata().state_dict_metadata
        if key.startswith("optimizer_0.")
    ]
    expected = load_file(out_dir / "expected.safetensors")

    loaded = read_checkpoint(broken)

    # 4 parameters x (exp_avg, exp_avg_sq, step) plus the param_groups fields
    assert corrupted == len(optimizer_keys) > 12
    for name, tensor in expected.items():
        assert torch.equal(loaded.state_dict[name], tensor), name
    # Control: reading any corrupted optimizer entry fails, so the reader above never touched one.
    with pytest.raises(CheckpointException):
        load_entry(broken, "optimizer_0.state.perception.proj.weight.exp_avg", torch.empty(7, 8))
    with pytest.raises(CheckpointException):
        load_entry(broken, "optimizer_0.param_groups.0.lr", 0.0)


def test_fsdp2_untied_embeddings_kept(fsdp2_run):
    out_dir, _ = fsdp2_run
    state_dict = read_checkpoint(out_dir / "checkpoint").state_dict
    del (
        state_dict["perception.window"],
        state_dict["perception.proj.weight"],
        state_dict["perception.proj.bias"],
    )

    weights = split_salm_state_dict(state_dict, lora_config=None)

    assert weights.tie_word_embeddings is False
    assert torch.equal(weights.llm["lm_head.weight"], state_dict["llm.lm_head.weight"])
    assert torch.equal(weights.llm["model.embed_tokens.weight"], state_dict["embed_tokens.weight"])


def test_fixture_dcp_optimizer_bytes_not_read(nemo_salm_dir, tmp_path, manifest, digest):
    broken = tmp_path / "step=2"
    shutil.copytree(nemo_salm_dir / "dcp" / "step=2", broken)
    for path in broken.iterdir():
        path.chmod(0o644)
    corrupted = corrupt_entries(broken, "optimizer_0.")

    loaded = read_checkpoint(broken)

    assert corrupted == 352
    expected = manifest["dcp/step=2:state_dict"]
    assert {name: digest(t) for name, t in loaded.state_dict.items()} == {
        name: entry["sha256"] for name, entry in expected.items()
    }
    with pytest.raises(CheckpointException):
        load_entry(
            broken,
            "optimizer_0.state.embed_tokens.weight.exp_avg",
            torch.empty(151936, 8, dtype=torch.bfloat16),
        )


def test_dcp_missing_distcp_file(fsdp2_run, tmp_path):
    out_dir, world_size = fsdp2_run
    broken = tmp_path / "checkpoint"
    shutil.copytree(out_dir / "checkpoint", broken)
    (broken / "__1_0.distcp").unlink()

    with pytest.raises(CheckpointError, match=r"incomplete: __1_0\.distcp is missing"):
        read_checkpoint(broken)


def test_dcp_truncated_distcp_file(fsdp2_run, tmp_path):
    out_dir, world_size = fsdp2_run
    broken = tmp_path / "checkpoint"
    shutil.copytree(out_dir / "checkpoint", broken)
    last = broken / f"__{world_size - 1}_0.distcp"
    last.write_bytes(last.read_bytes()[:100])

    with pytest.raises(CheckpointError, match=rf"truncated: __{world_size - 1}_0\.distcp \(100 bytes"):
        read_checkpoint(broken)


def test_dcp_corrupt_model_bytes(fsdp2_run, tmp_path):
    out_dir, _ = fsdp2_run
    broken = tmp_path / "checkpoint"
    shutil.copytree(out_dir / "checkpoint", broken)
    corrupt_entries(broken, "state_dict.perception.proj.bias")

    with pytest.raises(CheckpointError, match=r"Cannot load model tensors from the DCP checkpoint"):
        read_checkpoint(broken)


def test_dcp_corrupt_metadata(fsdp2_run, tmp_path):
    out_dir, _ = fsdp2_run
    broken = tmp_path / "checkpoint"
    shutil.copytree(out_dir / "checkpoint", broken)
    metadata = broken / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:50])

    with pytest.raises(CheckpointError, match=r"Cannot read the DCP metadata .*\.metadata"):
        read_checkpoint(broken)


def save_single_process(state: dict, directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)


def test_dcp_lightning_fsdp1_model_container(tmp_path):
    weights = {
        "llm.model.norm.weight": torch.arange(4.0),
        "perception.proj.bias": torch.ones(3, dtype=torch.bfloat16),
    }
    save_single_process(
        {"model": weights, "optimizer_0": {"state": {"0": {"exp_avg": torch.zeros(4)}}}}, tmp_path
    )

    loaded = read_checkpoint(tmp_path)

    assert sorted(loaded.state_dict) == sorted(weights)
    for name, tensor in weights.items():
        assert torch.equal(loaded.state_dict[name], tensor), name


def test_dcp_byte_entries_never_unpickled(tmp_path, caplog):
    weights = {"llm.model.norm.weight": torch.arange(4.0)}
    state = {"state_dict": {**weights, "llm.model.layers.0._extra_state": b"te-state", "step_count": 7}}
    save_single_process(state, tmp_path)
    # DCP would torch.load(weights_only=False) these entries; corrupt them to show they stay unread.
    assert corrupt_entries(tmp_path, "state_dict.llm.model.layers.0._extra_state") == 1
    assert corrupt_entries(tmp_path, "state_dict.step_count") == 1

    with caplog.at_level(logging.DEBUG, logger="speechlm_bridge.checkpoints.dcp"):
        loaded = read_checkpoint(tmp_path)

    assert sorted(loaded.state_dict) == ["llm.model.norm.weight"]
    assert "Skipped 1 `_extra_state` byte entries" in caplog.text
    assert "Skipped 1 non-tensor model entries" in caplog.text
    assert "state_dict.step_count" in caplog.text


def test_dcp_without_model_entries(tmp_path):
    save_single_process({"optimizer_0": {"state": {"0": {"exp_avg": torch.zeros(4)}}}}, tmp_path)

    with pytest.raises(
        CheckpointError,
        match=r"has no model entries: expected keys under `state_dict\.` .* found top-level keys \['optimizer_0'\]",
    ):
        read_checkpoint(tmp_path)


def test_dcp_unreadable_meta_pt_ignored(nemo_salm_dir, tmp_path, caplog):
    copy = tmp_path / "step=2"
    shutil.copytree(nemo_salm_dir / "dcp" / "step=2", copy)
    (copy / "meta.pt").chmod(0o644)
    (copy / "meta.pt").write_bytes(b"PK\x03\x04 cut short")

    with caplog.at_level(logging.WARNING, logger="speechlm_bridge.checkpoints.reader"):
        loaded = read_checkpoint(copy)

    assert loaded.config is None
    assert len(loaded.state_dict) == 121
    assert "Ignoring" in caplog.text
    assert "meta.pt" in caplog.text
