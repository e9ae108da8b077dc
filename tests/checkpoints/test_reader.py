"""read_checkpoint on state-dict files, sharded safetensors, and broken or unknown inputs."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from speechlm_bridge.checkpoints import read_checkpoint
from speechlm_bridge.errors import CheckpointError


class TrainerState:
    """A custom class, as a checkpoint written with weights_only=False may pickle."""

    def __init__(self) -> None:
        self.best = 1.0


def small_state_dict() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "llm.model.norm.weight": torch.randn(4, generator=gen),
        "embed_tokens.weight": torch.randn(6, 4, generator=gen).to(torch.bfloat16),
        "perception.proj.weight": torch.randn(4, 3, generator=gen),
    }


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_state_dict_file(tmp_path, wrapper, suffix):
    weights = small_state_dict()
    path = tmp_path / f"weights{suffix}"
    torch.save(weights if wrapper is None else {wrapper: weights, "epoch": 3}, path)

    loaded = read_checkpoint(path)

    assert loaded.format == "torch"
    assert loaded.config is None
    assert_same(loaded.state_dict, weights)


def test_lightning_file_without_cfg(tmp_path):
    weights = small_state_dict()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": weights, "pytorch-lightning_version": "2.4.0", "optimizer_states": []}, path)

    loaded = read_checkpoint(path)

    assert loaded.format == "lightning"
    assert loaded.config is None
    assert_same(loaded.state_dict, weights)


def test_lightning_extra_state_dropped(tmp_path):
    weights = small_state_dict()
    path = tmp_path / "last.ckpt"
    state = {**weights, "llm.model.layers.0._extra_state": None}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.4.0"}, path)

    loaded = read_checkpoint(path)

    assert_same(loaded.state_dict, weights)


def test_lightning_omegaconf_hyper_parameters(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    weights = small_state_dict()
    path = tmp_path / "hydra.ckpt"
    cfg = omegaconf.OmegaConf.create({"prompt_format": "qwen3", "lora": {"r": 4, "lora_alpha": 8}})
    torch.save(
        {"state_dict": weights, "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"cfg": cfg}}, path
    )

    loaded = read_checkpoint(path)

    assert loaded.config == {"prompt_format": "qwen3", "lora": {"r": 4, "lora_alpha": 8}}
    assert type(loaded.config) is dict


def test_omegaconf_checkpoint_without_omegaconf(tmp_path, monkeypatch):
    # Stand-in so that torch.save can pickle a reference to omegaconf's DictConfig here.
    module = types.ModuleType("omegaconf.dictconfig")

    class DictConfig(dict):
        pass

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    module.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", module)
    path = tmp_path / "hydra.ckpt"
    cfg = DictConfig(prompt_format="qwen3")
    torch.save(
        {
            "state_dict": small_state_dict(),
            "pytorch-lightning_version": "2.4.0",
            "hyper_parameters": {"cfg": cfg},
        },
        path,
    )
    # A None entry in sys.modules makes `import omegaconf` raise ImportError, as if it were not
    # installed, whether or not the real package is.
    for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.base", "omegaconf.nodes"):
        monkeypatch.setitem(sys.modules, name, None)

    with pytest.raises(
        CheckpointError,
        match=r"omegaconf\.dictconfig\.DictConfig.*OmegaConf DictConfig: `pip install omegaconf`",
    ):
        read_checkpoint(path)


def test_sharded_safetensors_dir(tmp_path):
    weights = small_state_dict()
    save_file(
        {"llm.model.norm.weight": weights["llm.model.norm.weight"]},
        tmp_path / "model-00001-of-00002.safetensors",
    )
    save_file(
        {key: weights[key] for key in ("embed_tokens.weight", "perception.proj.weight")},
        tmp_path / "model-00002-of-00002.safetensors",
    )
    weight_map = {
        "llm.model.norm.weight": "model-00001-of-00002.safetensors",
        "embed_tokens.weight": "model-00002-of-00002.safetensors",
        "perception.proj.weight": "model-00002-of-00002.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    # A stray file that the index does not name is never opened.
    (tmp_path / "model-00003-of-00002.safetensors").write_bytes(b"not safetensors")

    loaded = read_checkpoint(tmp_path)

    assert loaded.format == "safetensors"
    assert_same(loaded.state_dict, weights)


def test_sharded_safetensors_missing_shard(tmp_path):
    save_file(small_state_dict(), tmp_path / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    with pytest.raises(
        CheckpointError, match=r"names shard files that are not in .*: model-00002-of-00002\.safetensors"
    ):
        read_checkpoint(tmp_path)


def test_sharded_safetensors_index_escapes_dir(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../secret.safetensors"}})
    )

    with pytest.raises(CheckpointError, match=r"maps a to a path outside its directory"):
        read_checkpoint(tmp_path)


def test_sharded_safetensors_shard_lacks_key(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    with pytest.raises(
        CheckpointError,
        match=r"lacks 1 tensors that model\.safetensors\.index\.json assigns to it, e\.g\. b\.",
    ):
        read_checkpoint(tmp_path)


# --- bad input -----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"Checkpoint .*nowhere\.ckpt not found\. Expected a Lightning"):
        read_checkpoint(tmp_path / "nowhere.ckpt")


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"Checkpoint directory .* is empty\. Expected"):
        read_checkpoint(tmp_path)


def test_directory_names_checkpoints_inside(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save(small_state_dict(), tmp_path / "checkpoints" / "step=2.ckpt")
    (tmp_path / "hparams.yaml").write_text("a: 1\n")

    with pytest.raises(
        CheckpointError,
        match=r"not a checkpoint in a known format .* Checkpoints found inside: checkpoints/step=2\.ckpt\.",
    ):
        read_checkpoint(tmp_path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x89HDF")

    with pytest.raises(CheckpointError, match=r"unknown checkpoint suffix '\.h5'"):
        read_checkpoint(path)


def test_nemo_archive_redirected(nemo_salm_dir):
    with pytest.raises(CheckpointError, match=r"is a NeMo `\.nemo` archive.*`read_nemo_archive`"):
        read_checkpoint(nemo_salm_dir / "asr" / "tiny-fastconformer-ctc.nemo")


def test_truncated_safetensors(nemo_salm_dir, tmp_path):
    source = (nemo_salm_dir / "save_pretrained" / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(source[: len(source) // 2])

    with pytest.raises(
        CheckpointError, match=r"Cannot read .*model\.safetensors as safetensors .*truncated or corrupt"
    ):
        read_checkpoint(path)


def test_truncated_safetensors_in_nemo_dir(nemo_salm_dir, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(nemo_salm_dir / "save_pretrained", export)
    (export / "model.safetensors").chmod(0o644)
    data = (export / "model.safetensors").read_bytes()
    (export / "model.safetensors").write_bytes(data[:-1000])

    with pytest.raises(CheckpointError, match=r"as safetensors"):
        read_checkpoint(export)


def test_truncated_lightning_ckpt(nemo_salm_dir, tmp_path):
    source = (nemo_salm_dir / "lightning" / "step=2.ckpt").read_bytes()
    path = tmp_path / "step=2.ckpt"
    path.write_bytes(source[: len(source) - 4096])

    with pytest.raises(
        CheckpointError, match=r"Cannot read .*step=2\.ckpt as a PyTorch checkpoint.* truncated"
    ):
        read_checkpoint(path)


def test_damaged_lightning_ckpt(nemo_salm_dir, tmp_path):
    # Intact zip directory, but the pickle inside is cut short.
    source = nemo_salm_dir / "lightning" / "step=2.ckpt"
    path = tmp_path / "step=2.ckpt"
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as damaged:
        for info in original.infolist():
            data = original.read(info)
            damaged.writestr(info, data[: len(data) // 2] if info.filename.endswith("data.pkl") else data)

    with pytest.raises(CheckpointError, match=r"Cannot read .*step=2\.ckpt as a PyTorch checkpoint \("):
        read_checkpoint(path)


def test_garbage_ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"this is not a checkpoint" * 10)

    with pytest.raises(
        CheckpointError, match=r"model\.ckpt is not a PyTorch checkpoint: it is neither a zip"
    ):
        read_checkpoint(path)


def test_disallowed_pickle_global(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": small_state_dict(),
            "pytorch-lightning_version": "2.4.0",
            "callbacks": {"x": TrainerState()},
        },
        path,
    )

    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)

    message = str(caught.value)
    assert re.search(
        r"pickles objects of types that are not allowed for safe loading: [\w.]*\.TrainerState\.", message
    )
    assert "weights_only=True" in message
    assert "torch.save({'state_dict': ckpt['state_dict']}" in message


def test_non_tensor_state_dict_entry(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"a.weight": torch.zeros(2), "a.step": 5}}, path)

    with pytest.raises(CheckpointError, match=r"has non-tensor entries a\.step \(int\)"):
        read_checkpoint(path)


def test_non_dict_pickle(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save([torch.zeros(2)], path)

    with pytest.raises(CheckpointError, match=r"contains a list, expected a dict of tensors"):
        read_checkpoint(path)


def test_dir_with_unrelated_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))

    with pytest.raises(
        CheckpointError, match=r"not a checkpoint in a known format \(entries: config\.json\)"
    ):
        read_checkpoint(tmp_path)
