"""The streaming safetensors writer against safetensors' and huggingface_hub's own savers."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from speechlm_bridge.checkpoints.lazy import CastTensor, InMemoryTensor, TensorRef
from speechlm_bridge.checkpoints.safetensors_files import SAFETENSORS_DTYPES
from speechlm_bridge.errors import CheckpointError
from speechlm_bridge.export import safetensors_writer
from speechlm_bridge.export.safetensors_writer import plan_shards, write_index, write_shard
from speechlm_bridge.export.weights import write_safetensors_shards


def every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for number, dtype in enumerate(SAFETENSORS_DTYPES.values()):
        values = torch.randn(3, 5, generator=gen) * 50
        tensors[f"t{len(SAFETENSORS_DTYPES) - number:02d}.{dtype}"] = values.to(dtype)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    tensors["zażółć.名前"] = torch.ones(2, dtype=torch.float16)
    return tensors


def mixed_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    state = {}
    for layer in range(6):
        state[f"model.layers.{layer}.mlp.weight"] = torch.randn(300, 400, generator=gen).to(torch.bfloat16)
        state[f"model.layers.{layer}.norm.weight"] = torch.randn(400, generator=gen)
    state["model.embed_tokens.weight"] = torch.randn(2000, 400, generator=gen).to(torch.bfloat16)
    state["model.layers.0.step"] = torch.tensor(7)
    return state


def test_shard_bytes_equal_save_file(tmp_path):
    tensors = every_dtype()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})

    shards = plan_shards(tensors, max_shard_size=10**9)
    write_shard(shards[0], tmp_path)

    assert shards[0].filename == "model.safetensors"
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


@pytest.mark.parametrize("max_shard_size", [1_000_000, 2_000_000, 10**9])
def test_sharded_output_equals_hub(tmp_path, max_shard_size):
    state = mixed_state_dict()
    reference = tmp_path / "hub"
    ours = tmp_path / "ours"
    reference.mkdir()
    ours.mkdir()
    save_torch_state_dict(
        state, reference, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
        metadata={"format": "pt"},
    )

    count = write_safetensors_shards(state, ours, max_shard_size=max_shard_size)

    names = sorted(path.name for path in reference.iterdir())
    assert sorted(path.name for path in ours.iterdir()) == names
    assert count == len([name for name in names if name.endswith(".safetensors")])
    for name in names:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name


def test_written_values_read_back(tmp_path):
    state = mixed_state_dict()
    write_safetensors_shards(state, tmp_path, max_shard_size=1_000_000)

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(state)
    for name, filename in index["weight_map"].items():
        with safe_open(tmp_path / filename, "pt") as handle:
            assert torch.equal(handle.get_tensor(name), state[name]), name
            assert handle.metadata() == {"format": "pt"}


def test_lazy_cast_written_as_target_dtype(tmp_path):
    source = torch.randn(4, 3)
    shards = plan_shards({"w": CastTensor(InMemoryTensor(source), torch.bfloat16)}, max_shard_size=10**6)
    write_shard(shards[0], tmp_path)
    write_index(shards, tmp_path)

    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert torch.equal(handle.get_tensor("w"), source.to(torch.bfloat16))
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_small_batches_write_same_bytes(tmp_path, monkeypatch):
    state = mixed_state_dict()
    (tmp_path / "large").mkdir()
    (tmp_path / "small").mkdir()
    write_safetensors_shards(state, tmp_path / "large", max_shard_size=10**9)
    monkeypatch.setattr(safetensors_writer, "BATCH_BYTES", 1000)

    write_safetensors_shards(state, tmp_path / "small", max_shard_size=10**9)

    large = (tmp_path / "large" / "model.safetensors").read_bytes()
    assert (tmp_path / "small" / "model.safetensors").read_bytes() == large


class WrongShape(TensorRef):
    """A reference whose metadata promises a shape that loading does not deliver."""

    shape = (2, 2)
    dtype = torch.float32

    def load(self, cache=None):
        return torch.zeros(3)


def test_metadata_mismatch_rejected(tmp_path):
    shards = plan_shards({"broken.weight": WrongShape()}, max_shard_size=10**6)

    with pytest.raises(CheckpointError, match=r"broken\.weight loaded as \(3,\) torch\.float32, but the checkpoint's metadata gives \(2, 2\)"):
        write_shard(shards[0], tmp_path)


def test_progress_bar_per_shard(tmp_path, capsys):
    shards = plan_shards(mixed_state_dict(), max_shard_size=2_000_000)

    write_shard(shards[0], tmp_path, progress=True)
    shown = capsys.readouterr().err
    write_shard(shards[1], tmp_path, progress=False)

    assert shards[0].filename in shown
    assert "B/s" in shown
    assert capsys.readouterr().err == ""
