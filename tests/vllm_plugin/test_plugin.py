"""The plugin's registration and batching, without starting an engine."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from tests.vllm_plugin.conftest import require_vllm


@pytest.fixture(scope="module", autouse=True)
def _vllm():
    require_vllm()


def test_entry_point_names_register():
    from speechlm_bridge.vllm_plugin import register

    plugins = {entry.name: entry for entry in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins["speechlm_bridge"].load() is register


def test_vllm_loads_plugin_and_registers_architecture_once():
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from speechlm_bridge.vllm_plugin import ARCHITECTURE, register

    load_general_plugins()
    register()  # a second call changes nothing
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert AutoConfig.for_model("speechlm_bridge").model_type == "speechlm_bridge"
    model_class = ModelRegistry._try_load_model_cls(ARCHITECTURE)
    assert model_class.__module__ == "speechlm_bridge.vllm_plugin.model"
    assert model_class.get_placeholder_str("audio", 1) is None
    with pytest.raises(ValueError, match="accepts audio only, not image"):
        model_class.get_placeholder_str("image", 1)


def test_pad_batch_pads_audios_of_different_lengths():
    from speechlm_bridge.vllm_plugin.model import _pad_batch

    features = [torch.ones(3, 2), torch.full((5, 2), 2.0)]
    masks = [torch.ones(3, dtype=torch.long), torch.ones(5, dtype=torch.long)]
    batch, mask = _pad_batch(features, masks)
    assert batch.shape == (2, 5, 2)
    assert batch[0, 3:].abs().sum() == 0
    assert batch[1].eq(2.0).all()
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_pad_batch_keeps_a_stacked_batch():
    from speechlm_bridge.vllm_plugin.model import _pad_batch

    features = torch.arange(12.0).reshape(2, 3, 2)
    masks = torch.tensor([[1, 1, 0], [1, 1, 1]])
    batch, mask = _pad_batch(features, masks)
    assert torch.equal(batch, features)
    assert torch.equal(mask, masks)
