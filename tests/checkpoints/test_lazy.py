"""read_checkpoint(lazy=True): references from metadata that load the same values as an eager read."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from speechlm_bridge.checkpoints import read_checkpoint, split_salm_state_dict
from speechlm_bridge.checkpoints.dcp import DcpTensor
from speechlm_bridge.checkpoints.lazy import TensorRef, read_ranges, tensor_digest
from speechlm_bridge.errors import CheckpointError


def assert_lazy_equals_eager(path: Path) -> dict:
    eager = read_checkpoint(path)
    lazy = read_checkpoint(path, lazy=True)
    assert lazy.format == eager.format
    assert lazy.config == eager.config
    assert list(lazy.state_dict) == list(eager.state_dict)
    for name, tensor in eager.state_dict.items():
        ref = lazy.state_dict[name]
        assert isinstance(ref, TensorRef), name
        assert (tuple(ref.shape), ref.dtype) == (tuple(tensor.shape), tensor.dtype), name
        assert torch.equal(ref.load(), tensor), name
    return lazy.state_dict


def save_single_process(state: dict, directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)


@pytest.mark.parametrize(
    "relative", ["lightning/step=2.ckpt", "dcp/step=2", "save_pretrained", "to_hf/from_dcp/model.safetensors"]
)
def test_lazy_equals_eager(nemo_salm_dir, relative):
    assert_lazy_equals_eager(nemo_salm_dir / relative)


def test_lazy_sharded_safetensors(tmp_path):
    save_file({"a": torch.arange(6.0)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(2, 3, dtype=torch.bfloat16)}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    assert_lazy_equals_eager(tmp_path)


def test_dcp_byte_ranges_are_raw_bytes(nemo_salm_dir):
    refs = read_checkpoint(nemo_salm_dir / "dcp" / "step=2", lazy=True).state_dict
    embed = refs["embed_tokens.weight"]
    ranges = embed.byte_ranges()

    assert ranges is not None
    assert len({path for path, _, _ in ranges}) == 2  # one row chunk per FSDP2 rank
    raw = b"".join(bytes(piece) for piece in read_ranges(ranges, buffer_bytes=4096))
    assert raw == embed.load().contiguous().view(torch.uint8).numpy().tobytes()
    assert tensor_digest(embed) == tensor_digest(embed.load())


def test_safetensors_byte_ranges_are_raw_bytes(tmp_path):
    tensors = {"b": torch.arange(12, dtype=torch.int16).reshape(3, 4), "a": torch.randn(5, 2).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")

    refs = read_checkpoint(tmp_path / "model.safetensors", lazy=True).state_dict

    for name, tensor in tensors.items():
        ranges = refs[name].byte_ranges()
        assert len(ranges) == 1, name
        raw = b"".join(bytes(piece) for piece in read_ranges(ranges))
        assert raw == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name


def test_dcp_non_contiguous_chunk_is_loaded(tmp_path):
    transposed = torch.arange(24.0).reshape(4, 6).T
    save_single_process({"state_dict": {"llm.weight": transposed}}, tmp_path)

    ref = read_checkpoint(tmp_path, lazy=True).state_dict["llm.weight"]

    assert ref.byte_ranges() is None
    assert torch.equal(ref.load(), transposed)


def test_torch_file_ref_pickles_location(nemo_salm_dir):
    refs = read_checkpoint(nemo_salm_dir / "lightning" / "step=2.ckpt", lazy=True).state_dict
    ref = refs["perception.proj.weight"]

    restored = pickle.loads(pickle.dumps(ref))

    assert restored.tensor is None
    assert len(pickle.dumps(ref)) < 1000
    assert torch.equal(restored.load(), ref.load())


def test_lazy_tie_decision(nemo_salm_dir, caplog):
    untied = read_checkpoint(nemo_salm_dir / "dcp" / "step=2", lazy=True).state_dict
    tied = read_checkpoint(nemo_salm_dir / "lightning" / "step=2.ckpt", lazy=True).state_dict

    with caplog.at_level(logging.WARNING, logger="speechlm_bridge.checkpoints.nemo_salm"):
        assert split_salm_state_dict(untied, lora_config=None).tie_word_embeddings is False
    assert split_salm_state_dict(tied, lora_config=None).tie_word_embeddings is True
    assert "max |embed_tokens - lm_head| = 0.02954" in caplog.text


def test_lazy_lora_merge_equals_eager(nemo_salm_dir):
    path = nemo_salm_dir / "lightning-lora" / "step=2.ckpt"
    lora = {"r": 4, "lora_alpha": 8}
    eager = split_salm_state_dict(read_checkpoint(path).state_dict, lora_config=lora)
    lazy = split_salm_state_dict(read_checkpoint(path, lazy=True).state_dict, lora_config=lora)

    assert lazy.lora_merged_modules == eager.lora_merged_modules
    for name, tensor in eager.llm.items():
        assert torch.equal(lazy.llm[name].load(), tensor), name


# --- bad input -------------------------------------------------------------------------------------


def copy_fixture_dcp(nemo_salm_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "step=2"
    shutil.copytree(nemo_salm_dir / "dcp" / "step=2", copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


def test_lazy_dcp_missing_shard(nemo_salm_dir, tmp_path):
    copy = copy_fixture_dcp(nemo_salm_dir, tmp_path)
    (copy / "__1_0.distcp").unlink()

    with pytest.raises(CheckpointError, match=r"step=2 is incomplete: __1_0\.distcp is missing"):
        read_checkpoint(copy, lazy=True)


def test_lazy_dcp_truncated_shard(nemo_salm_dir, tmp_path):
    copy = copy_fixture_dcp(nemo_salm_dir, tmp_path)
    shard = copy / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:4096])

    with pytest.raises(CheckpointError, match=r"step=2 is truncated: __0_0\.distcp \(4096 bytes"):
        read_checkpoint(copy, lazy=True)


def test_lazy_dcp_corrupt_record(nemo_salm_dir, tmp_path):
    copy = copy_fixture_dcp(nemo_salm_dir, tmp_path)
    ref = read_checkpoint(copy, lazy=True).state_dict["perception.proj.weight"]
    assert isinstance(ref, DcpTensor)
    metadata = dcp.FileSystemReader(copy).read_metadata()
    for index, info in metadata.storage_data.items():
        if index.fqn == "state_dict.perception.proj.weight":
            with open(copy / info.relative_path, "r+b") as handle:
                handle.seek(info.offset)
                handle.write(b"\xff" * info.length)

    assert ref.byte_ranges() is None
    with pytest.raises(CheckpointError, match=r"Cannot load model tensors from the DCP checkpoint .*step=2"):
        ref.load()


def test_lazy_truncated_safetensors(nemo_salm_dir, tmp_path):
    data = (nemo_salm_dir / "save_pretrained" / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match=r"Cannot read .*model\.safetensors as safetensors .*truncated or corrupt"):
        read_checkpoint(path, lazy=True)


def test_lazy_corrupt_safetensors_header(tmp_path):
    save_file({"a": torch.zeros(4)}, tmp_path / "model.safetensors")
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[8:12] = b"\xff\xfe{["
    (tmp_path / "model.safetensors").write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=r"Cannot read .*model\.safetensors as safetensors"):
        read_checkpoint(tmp_path, lazy=True)


def test_lazy_sharded_safetensors_missing_shard(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    with pytest.raises(CheckpointError, match=r"names shard files that are not in .*: model-00002-of-00002\.safetensors"):
        read_checkpoint(tmp_path, lazy=True)
