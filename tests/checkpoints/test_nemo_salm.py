"""split_salm_state_dict on NeMo's own checkpoints and on small hand-built layouts."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from speechlm_bridge.checkpoints import read_checkpoint, split_salm_state_dict
from speechlm_bridge.errors import CheckpointError

LORA_PREFIX = "llm.base_model.model."


# --- NeMo fixtures -------------------------------------------------------------------------------


def test_lightning_tied_keeps_one(nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / "lightning" / "step=2.ckpt").state_dict
    backbone_names = load_file(nemo_salm_dir / "backbone" / "tiny-qwen3" / "model.safetensors").keys()

    weights = split_salm_state_dict(source, lora_config=None)

    assert weights.tie_word_embeddings is True
    assert sorted(weights.llm) == sorted(backbone_names)
    assert "lm_head.weight" not in weights.llm
    assert weights.llm["model.embed_tokens.weight"] is source["embed_tokens.weight"]
    assert (
        weights.llm["model.layers.1.mlp.down_proj.weight"]
        is source["llm.model.layers.1.mlp.down_proj.weight"]
    )
    assert weights.source_dtype == torch.bfloat16
    assert weights.lora_merged_modules == []


def test_lightning_perception_prefix_stripped(nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / "lightning" / "step=2.ckpt").state_dict

    weights = split_salm_state_dict(source, lora_config=None)

    expected = {
        key.removeprefix("perception."): t for key, t in source.items() if key.startswith("perception.")
    }
    assert sorted(weights.perception) == sorted(expected)
    assert len(weights.perception) == 96
    assert weights.perception["proj.weight"] is source["perception.proj.weight"]


def test_dcp_untied_keeps_both(nemo_salm_dir, caplog):
    source = read_checkpoint(nemo_salm_dir / "dcp" / "step=2").state_dict

    with caplog.at_level(logging.WARNING, logger="speechlm_bridge.checkpoints.nemo_salm"):
        weights = split_salm_state_dict(source, lora_config=None)

    assert weights.tie_word_embeddings is False
    assert weights.llm["lm_head.weight"] is source["llm.lm_head.weight"]
    assert weights.llm["model.embed_tokens.weight"] is source["embed_tokens.weight"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "max |embed_tokens - lm_head| = 0.02954" in warnings[0]
    assert "keeping the trained lm_head" in warnings[0]


@pytest.mark.parametrize("relative", ["save_pretrained", "to_hf/from_ckpt", "to_hf/from_dcp"])
def test_exports_without_lm_head_are_tied(nemo_salm_dir, relative):
    source = read_checkpoint(nemo_salm_dir / relative).state_dict

    weights = split_salm_state_dict(source, lora_config=None)

    assert weights.tie_word_embeddings is True
    assert "lm_head.weight" not in weights.llm
    assert len(weights.llm) == 24


def test_lora_merge_matches_reference(nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / "lightning-lora" / "step=2.ckpt").state_dict
    lora = yaml.safe_load((nemo_salm_dir / "exp_config_lora.yaml").read_text())["model"]["lora"]

    weights = split_salm_state_dict(source, lora_config=lora)

    scale = lora["lora_alpha"] / lora["r"]
    modules = sorted(
        key.removeprefix(LORA_PREFIX).removesuffix(".lora_A.default.weight")
        for key in source
        if key.endswith(".lora_A.default.weight")
    )
    assert weights.lora_merged_modules == modules
    assert len(modules) == 4
    for module in modules:
        base = source[f"{LORA_PREFIX}{module}.base_layer.weight"]
        a = source[f"{LORA_PREFIX}{module}.lora_A.default.weight"]
        b = source[f"{LORA_PREFIX}{module}.lora_B.default.weight"]
        reference = (base.float() + scale * (b.float() @ a.float())).to(torch.bfloat16)
        merged = weights.llm[f"{module}.weight"]
        assert merged.dtype == torch.bfloat16
        assert torch.equal(merged, reference), module
        assert not torch.equal(merged, base), module


def test_lora_merge_matches_adapter_forward(nemo_salm_dir):
    # The merged layer computes what PEFT's unmerged forward does: x W^T + scale (x A^T) B^T.
    source = read_checkpoint(nemo_salm_dir / "lightning-lora" / "step=2.ckpt").state_dict
    weights = split_salm_state_dict(source, lora_config={"r": 4, "lora_alpha": 8})
    module = "model.layers.1.self_attn.v_proj"
    base = source[f"{LORA_PREFIX}{module}.base_layer.weight"].float()
    a = source[f"{LORA_PREFIX}{module}.lora_A.default.weight"].float()
    b = source[f"{LORA_PREFIX}{module}.lora_B.default.weight"].float()
    x = torch.randn(5, base.shape[1], generator=torch.Generator().manual_seed(0))

    unmerged = x @ base.T + 2.0 * (x @ a.T) @ b.T
    merged = x @ weights.llm[f"{module}.weight"].float().T

    torch.testing.assert_close(merged, unmerged, rtol=2e-2, atol=2e-2)


def test_lora_other_weights_pass_through(nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / "lightning-lora" / "step=2.ckpt").state_dict

    weights = split_salm_state_dict(source, lora_config={"r": 4, "lora_alpha": 8})

    assert sorted(weights.llm) == sorted(
        split_salm_state_dict(
            read_checkpoint(nemo_salm_dir / "lightning" / "step=2.ckpt").state_dict, lora_config=None
        ).llm
    )
    assert weights.llm["model.norm.weight"] is source[f"{LORA_PREFIX}model.norm.weight"]
    assert (
        weights.llm["model.layers.0.self_attn.k_proj.weight"]
        is source[f"{LORA_PREFIX}model.layers.0.self_attn.k_proj.weight"]
    )
    assert weights.tie_word_embeddings is True


def test_to_hf_lora_equals_lightning_lora(nemo_salm_dir):
    exported = read_checkpoint(nemo_salm_dir / "to_hf" / "from_ckpt_lora")
    trained = read_checkpoint(nemo_salm_dir / "lightning-lora" / "step=2.ckpt")

    from_export = split_salm_state_dict(exported.state_dict, lora_config=exported.config["lora"])
    from_training = split_salm_state_dict(trained.state_dict, lora_config=trained.config["lora"])

    assert sorted(from_export.llm) == sorted(from_training.llm)
    for name, tensor in from_training.llm.items():
        assert torch.equal(from_export.llm[name], tensor), name


def test_lora_without_config_rejected(nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / "lightning-lora" / "step=2.ckpt").state_dict

    with pytest.raises(CheckpointError, match=r"LoRA adapter weights but no LoRA config"):
        split_salm_state_dict(source, lora_config=None)


def test_lora_config_rank_mismatch(nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / "lightning-lora" / "step=2.ckpt").state_dict

    with pytest.raises(CheckpointError, match=r"has rank 4 in the weights but the LoRA config gives r=8"):
        split_salm_state_dict(source, lora_config={"r": 8, "lora_alpha": 16})


# --- hand-built layouts --------------------------------------------------------------------------


def make_salm_state_dict(*, embed_location: str = "top", lm_head: str = "tied") -> dict[str, torch.Tensor]:
    """A small SALM-shaped state dict: 1 layer, hidden 4, vocab 6, float32."""
    gen = torch.Generator().manual_seed(7)
    embed = torch.randn(6, 4, generator=gen)
    state = {
        "llm.model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=gen),
        "llm.model.layers.0.self_attn.q_proj.bias": torch.randn(4, generator=gen),
        "llm.model.norm.weight": torch.ones(4),
        "perception.proj.weight": torch.randn(4, 3, generator=gen),
        "perception.proj.bias": torch.zeros(4),
    }
    if embed_location == "top":
        state["embed_tokens.weight"] = embed
    elif embed_location == "llm":
        state["llm.model.embed_tokens.weight"] = embed
    if lm_head == "tied":
        state["llm.lm_head.weight"] = embed
    elif lm_head == "trained":
        state["llm.lm_head.weight"] = embed + 0.5
    return state


def to_peft(
    state: dict[str, torch.Tensor], module: str, *, rank: int, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """Wrap the LM keys PEFT-style and add a LoRA adapter on `module`."""
    gen = torch.Generator().manual_seed(11)
    wrapped = {}
    for key, tensor in state.items():
        if key.startswith("llm."):
            name = key.removeprefix("llm.")
            if name.startswith(f"{module}."):
                name = f"{module}.base_layer.{name.removeprefix(f'{module}.')}"
            wrapped[f"{LORA_PREFIX}{name}"] = tensor
        else:
            wrapped[key] = tensor
    out_features, in_features = state[f"llm.{module}.weight"].shape
    wrapped[f"{LORA_PREFIX}{module}.lora_A.{adapter}.weight"] = torch.randn(rank, in_features, generator=gen)
    wrapped[f"{LORA_PREFIX}{module}.lora_B.{adapter}.weight"] = torch.randn(out_features, rank, generator=gen)
    return wrapped


Q_PROJ = "model.layers.0.self_attn.q_proj"


def test_salm_automodel_embedding_inside_llm():
    state = make_salm_state_dict(embed_location="llm")

    weights = split_salm_state_dict(state, lora_config=None)

    assert weights.llm["model.embed_tokens.weight"] is state["llm.model.embed_tokens.weight"]
    assert weights.tie_word_embeddings is True


def test_lm_head_only_becomes_embedding():
    state = make_salm_state_dict(embed_location="none")

    weights = split_salm_state_dict(state, lora_config=None)

    assert weights.tie_word_embeddings is True
    assert "lm_head.weight" not in weights.llm
    assert weights.llm["model.embed_tokens.weight"] is state["llm.lm_head.weight"]


def test_trained_lm_head_kept(caplog):
    state = make_salm_state_dict(lm_head="trained")

    with caplog.at_level(logging.WARNING):
        weights = split_salm_state_dict(state, lora_config=None)

    assert weights.tie_word_embeddings is False
    assert weights.llm["lm_head.weight"] is state["llm.lm_head.weight"]
    assert weights.llm["model.embed_tokens.weight"] is state["embed_tokens.weight"]
    assert "max |embed_tokens - lm_head| = 0.5" in caplog.text


def test_missing_embedding_rejected():
    state = make_salm_state_dict(embed_location="none", lm_head="none")

    with pytest.raises(CheckpointError, match=r"neither model\.embed_tokens\.weight .* nor lm_head\.weight"):
        split_salm_state_dict(state, lora_config=None)


def test_two_embedding_layouts_rejected():
    state = make_salm_state_dict()
    state["llm.model.embed_tokens.weight"] = state["embed_tokens.weight"].clone()

    with pytest.raises(
        CheckpointError, match=r"embed_tokens\.weight and llm\.model\.embed_tokens\.weight both map"
    ):
        split_salm_state_dict(state, lora_config=None)


def test_extra_state_dropped():
    state = make_salm_state_dict()
    state["perception.encoder.layers.0._extra_state"] = torch.empty(0)
    state["llm.model.layers.0.self_attn._extra_state"] = torch.empty(0)

    weights = split_salm_state_dict(state, lora_config=None)

    assert not any("_extra_state" in key for key in [*weights.llm, *weights.perception])
    assert sorted(weights.perception) == ["proj.bias", "proj.weight"]


def test_unknown_keys_listed_sorted():
    state = make_salm_state_dict()
    for i in range(25):
        state[f"speech_decoder.layers.{i:02d}.weight"] = torch.zeros(1)
    state["audio_codec.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError) as caught:
        split_salm_state_dict(state, lora_config=None)

    message = str(caught.value)
    assert message.startswith(
        "26 keys match no known SALM layout: audio_codec.weight, speech_decoder.layers.00.weight,"
    )
    assert "speech_decoder.layers.18.weight, ..." in message
    assert "speech_decoder.layers.19.weight" not in message
    assert "Known layouts: NeMo SALM" in message


def test_lora_rslora_scale():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=4)

    weights = split_salm_state_dict(state, lora_config={"r": 4, "lora_alpha": 8, "use_rslora": True})

    a = state[f"{LORA_PREFIX}{Q_PROJ}.lora_A.default.weight"]
    b = state[f"{LORA_PREFIX}{Q_PROJ}.lora_B.default.weight"]
    base = state[f"{LORA_PREFIX}{Q_PROJ}.base_layer.weight"]
    torch.testing.assert_close(weights.llm[f"{Q_PROJ}.weight"], base + 8 / math.sqrt(4) * b @ a)


def test_lora_rank_and_alpha_patterns():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)
    config = {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"q_proj": 2},
        "alpha_pattern": {"layers.0.self_attn.q_proj": 3},
    }

    weights = split_salm_state_dict(state, lora_config=config)

    a = state[f"{LORA_PREFIX}{Q_PROJ}.lora_A.default.weight"]
    b = state[f"{LORA_PREFIX}{Q_PROJ}.lora_B.default.weight"]
    base = state[f"{LORA_PREFIX}{Q_PROJ}.base_layer.weight"]
    torch.testing.assert_close(weights.llm[f"{Q_PROJ}.weight"], base + 3 / 2 * b @ a)


def test_lora_bias_merged():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)
    state[f"{LORA_PREFIX}{Q_PROJ}.lora_B.default.bias"] = torch.tensor([1.0, 2.0, 3.0, 4.0])

    weights = split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 1})

    base_bias = state[f"{LORA_PREFIX}{Q_PROJ}.base_layer.bias"]
    torch.testing.assert_close(
        weights.llm[f"{Q_PROJ}.bias"], base_bias + 0.5 * torch.tensor([1.0, 2.0, 3.0, 4.0])
    )


def test_lora_other_adapter_name():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2, adapter="speech")

    weights = split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 2})

    assert weights.lora_merged_modules == [Q_PROJ]
    assert f"{Q_PROJ}.weight" in weights.llm


def test_lora_bf16_merged_in_float32():
    state = {key: t.to(torch.bfloat16) for key, t in to_peft(make_salm_state_dict(), Q_PROJ, rank=2).items()}

    weights = split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 2})

    a = state[f"{LORA_PREFIX}{Q_PROJ}.lora_A.default.weight"].float()
    b = state[f"{LORA_PREFIX}{Q_PROJ}.lora_B.default.weight"].float()
    base = state[f"{LORA_PREFIX}{Q_PROJ}.base_layer.weight"].float()
    assert weights.llm[f"{Q_PROJ}.weight"].dtype == torch.bfloat16
    assert torch.equal(weights.llm[f"{Q_PROJ}.weight"], (base + b @ a).to(torch.bfloat16))


def test_lora_embedding_merged():
    state = make_salm_state_dict(embed_location="llm", lm_head="none")
    state = {
        f"{LORA_PREFIX}{k.removeprefix('llm.')}" if k.startswith("llm.") else k: t for k, t in state.items()
    }
    embed = state.pop(f"{LORA_PREFIX}model.embed_tokens.weight")
    state[f"{LORA_PREFIX}model.embed_tokens.base_layer.weight"] = embed
    a, b = torch.randn(2, 6), torch.randn(4, 2)
    state[f"{LORA_PREFIX}model.embed_tokens.lora_embedding_A.default"] = a
    state[f"{LORA_PREFIX}model.embed_tokens.lora_embedding_B.default"] = b

    weights = split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 4})

    torch.testing.assert_close(weights.llm["model.embed_tokens.weight"], embed + 2 * (b @ a).T)


def test_modules_to_save_copy_used():
    state = make_salm_state_dict(lm_head="none")
    trained_norm = torch.full((4,), 3.0)
    state = {
        f"{LORA_PREFIX}{k.removeprefix('llm.')}" if k.startswith("llm.") else k: t for k, t in state.items()
    }
    state[f"{LORA_PREFIX}model.norm.original_module.weight"] = state.pop(f"{LORA_PREFIX}model.norm.weight")
    state[f"{LORA_PREFIX}model.norm.modules_to_save.default.weight"] = trained_norm

    weights = split_salm_state_dict(state, lora_config=None)

    assert weights.llm["model.norm.weight"] is trained_norm


def test_dora_rejected():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)
    state[f"{LORA_PREFIX}{Q_PROJ}.lora_magnitude_vector.default.weight"] = torch.ones(4)

    with pytest.raises(CheckpointError, match=r"lora_magnitude_vector.* is a DoRA magnitude vector"):
        split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 2, "use_dora": True})


def test_dora_config_rejected():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)

    with pytest.raises(CheckpointError, match=r"sets `use_dora: True`, which cannot be merged"):
        split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 2, "use_dora": True})


@pytest.mark.parametrize(
    ("config", "missing"), [({"r": 2}, "lora_alpha"), ({"lora_alpha": 2}, "r"), ({}, "r and lora_alpha")]
)
def test_lora_config_missing_keys(config, missing):
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)

    with pytest.raises(CheckpointError, match=rf"The LoRA config lacks {missing} "):
        split_salm_state_dict(state, lora_config=config)


def test_lora_a_without_b_rejected():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)
    del state[f"{LORA_PREFIX}{Q_PROJ}.lora_B.default.weight"]

    with pytest.raises(
        CheckpointError,
        match=rf"adapter 'default' on {Q_PROJ} is incomplete: .* but not {Q_PROJ}\.lora_B\.default",
    ):
        split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 2})


def test_lora_base_without_adapter_rejected():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)
    del state[f"{LORA_PREFIX}{Q_PROJ}.lora_A.default.weight"]
    del state[f"{LORA_PREFIX}{Q_PROJ}.lora_B.default.weight"]

    with pytest.raises(
        CheckpointError,
        match=r"base_layer\.(weight|bias).* PEFT base_layer weight\(s\) without lora_A/lora_B",
    ):
        split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 2})


def test_lora_two_adapters_rejected():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)
    state.update({k.replace(".default.", ".second."): t for k, t in state.items() if ".lora_" in k})

    with pytest.raises(CheckpointError, match=r"LoRA adapters named default, second"):
        split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 2})


@pytest.mark.parametrize(
    ("bf16_keys", "expected"),
    [
        # 24 + 16 bf16 elements against 8 float32 (bias, norm)
        (("embed_tokens.weight", "llm.model.layers.0.self_attn.q_proj.weight"), torch.bfloat16),
        # 4 bf16 elements (norm) against 44 float32
        (("llm.model.norm.weight",), torch.float32),
    ],
)
def test_source_dtype_is_dominant(bf16_keys, expected):
    state = make_salm_state_dict(lm_head="none")
    state = {key: t.to(torch.bfloat16) if key in bf16_keys else t for key, t in state.items()}

    weights = split_salm_state_dict(state, lora_config=None)

    assert weights.source_dtype == expected


def test_trainable_tokens_rejected():
    state = to_peft(make_salm_state_dict(), Q_PROJ, rank=2)
    state[f"{LORA_PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta.default"] = torch.zeros(2, 4)

    with pytest.raises(
        CheckpointError, match=r"token_adapter\.trainable_tokens_delta\.default belongs to PEFT's trainable"
    ):
        split_salm_state_dict(state, lora_config={"r": 2, "lora_alpha": 2})
