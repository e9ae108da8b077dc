"""NeMo perception -> feature extractor + ParakeetEncoder + adapter + projector, against NeMo's golden output."""

from __future__ import annotations

import copy
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import ParakeetEncoder, ParakeetEncoderConfig

from speechlm_bridge.errors import CheckpointError, ConfigError
from speechlm_bridge.export.nemo_perception import (
    adapter_config_from_nemo,
    convert_perception_state_dict,
    feature_extractor_config_from_nemo,
    parakeet_encoder_config_from_nemo,
    perception_configs_from_nemo,
    projector_config_from_nemo,
)
from speechlm_bridge.modeling.feature_extraction import SpeechLMBridgeFeatureExtractor
from speechlm_bridge.modeling.perception import build_audio_adapter, build_audio_projector, encode_audio

CONFORMER_ADAPTER = {
    "_target_": "nemo.collections.asr.modules.ConformerEncoder",
    "feat_in": 32,
    "feat_out": -1,
    "n_layers": 2,
    "d_model": 32,
    "subsampling": "dw_striding",
    "subsampling_factor": 1,
    "subsampling_conv_channels": 256,
    "causal_downsampling": False,
    "ff_expansion_factor": 2,
    "self_attention_model": "rel_pos",
    "n_heads": 2,
    "att_context_size": [-1, -1],
    "att_context_style": "regular",
    "xscaling": True,
    "untie_biases": True,
    "pos_emb_max_len": 5000,
    "conv_kernel_size": 9,
    "conv_norm_type": "batch_norm",
    "conv_context_size": None,
    "dropout": 0,
    "dropout_pre_encoder": 0,
    "dropout_emb": 0.0,
    "dropout_att": 0,
}


@pytest.fixture
def nemo_perception(nemo_salm_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The fixture's perception config and its ``perception.*`` weights, prefix removed."""
    config = json.loads((nemo_salm_dir / "save_pretrained" / "config.json").read_text())["perception"]
    state_dict = {}
    with safe_open(nemo_salm_dir / "to_hf" / "from_ckpt" / "model.safetensors", "pt") as weights:
        for key in weights.keys():
            if key.startswith("perception."):
                state_dict[key.removeprefix("perception.")] = weights.get_tensor(key)
    return config, state_dict


@pytest.fixture
def golden(nemo_salm_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(nemo_salm_dir / "golden" / "golden_outputs.safetensors", "pt") as outputs:
        return {key: outputs.get_tensor(key) for key in ("audio", "perception_output")}


def _load(module: torch.nn.Module, converted: dict[str, torch.Tensor], prefix: str) -> None:
    weights = {k.removeprefix(prefix): v.float() for k, v in converted.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(weights, strict=False)
    # Only the batch-norm step counters are left out of the export; transformers initializes them.
    assert unexpected == []
    assert all(name.endswith("num_batches_tracked") for name in missing), missing


def _perception_output(
    configs: dict, converted: dict[str, torch.Tensor], audio: torch.Tensor, **feature_overrides: str
) -> torch.Tensor:
    encoder = ParakeetEncoder(ParakeetEncoderConfig(**configs["audio_encoder"])).eval()
    projector = build_audio_projector(configs["audio_projector"]).eval()
    _load(encoder, converted, "audio_encoder.")
    _load(projector, converted, "audio_projector.")
    extractor = SpeechLMBridgeFeatureExtractor(**{**configs["feature_extractor"], **feature_overrides})
    features = extractor(audio[0].numpy(), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        (embeddings,) = encode_audio(encoder, None, projector, features["input_features"], features["attention_mask"])
    return embeddings


# --- golden ------------------------------------------------------------------------------------------------


def test_golden_perception_output(nemo_perception, golden) -> None:
    config, state_dict = nemo_perception
    configs = perception_configs_from_nemo(config, state_dict=state_dict)
    converted = convert_perception_state_dict(
        state_dict,
        encoder_cfg=config["encoder"],
        adapter_cfg=config["modality_adapter"],
        projector_cfg=configs["audio_projector"],
        feature_extractor_kwargs=configs["feature_extractor"],
    )
    embeddings = _perception_output(configs, converted, golden["audio"])
    assert embeddings.shape == golden["perception_output"].shape == (19, 8)
    # Measured 3.6e-7 (fp32, CPU).
    max_diff = (embeddings - golden["perception_output"]).abs().max().item()
    assert max_diff < 1e-5, max_diff


def test_golden_needs_rounded_filters(nemo_perception, golden) -> None:
    # The checkpoint's featurizer buffers are bf16; float32 ones move the output by about 4.6e-3.
    config, state_dict = nemo_perception
    configs = perception_configs_from_nemo(config, state_dict=state_dict)
    assert configs["feature_extractor"]["mel_filters_dtype"] == "bfloat16"
    assert configs["feature_extractor"]["window_dtype"] == "bfloat16"
    converted = convert_perception_state_dict(state_dict, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"])
    embeddings = _perception_output(
        configs, converted, golden["audio"], mel_filters_dtype="float32", window_dtype="float32"
    )
    assert (embeddings - golden["perception_output"]).abs().max().item() > 1e-3


def test_fixture_configs(nemo_perception) -> None:
    config, state_dict = nemo_perception
    configs = perception_configs_from_nemo(config, state_dict=state_dict)
    assert configs["feature_extractor"] == {
        "feature_size": 128,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 512,
        "win_length": 400,
        "preemphasis": 0.97,
        "padding_value": 0.0,
        "window_function": "hann",
        "mel_min_frequency": 0.0,
        "mel_max_frequency": 8000.0,
        "mel_norm": "slaney",
        "mag_power": 2.0,
        "log_zero_guard_type": "add",
        "log_zero_guard_value": 2**-24,
        "normalize": "per_feature",
        "mel_filters_dtype": "bfloat16",
        "window_dtype": "bfloat16",
        "return_attention_mask": True,
    }
    assert configs["audio_encoder"] == {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "silu",
        "attention_bias": True,
        "convolution_bias": True,
        "conv_kernel_size": 9,
        "scale_input": True,
        "max_position_embeddings": 5000,
        "dropout": 0.0,
        "dropout_positions": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
        "num_mel_bins": 128,
        "subsampling_factor": 8,
        "subsampling_conv_channels": 16,
        "subsampling_conv_kernel_size": 3,
        "subsampling_conv_stride": 2,
    }
    assert configs["audio_adapter"] is None
    assert configs["audio_projector"] == {"projector_type": "linear", "input_size": 32, "output_size": 8, "bias": True}


def test_converted_keys(nemo_perception) -> None:
    config, state_dict = nemo_perception
    converted = convert_perception_state_dict(state_dict, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"])
    # 96 NeMo tensors: 2 featurizer buffers and 2 num_batches_tracked are not exported.
    assert len(state_dict) == 96
    assert len(converted) == 92
    assert converted["audio_encoder.subsampling.layers.0.weight"] is state_dict["encoder.pre_encode.conv.0.weight"]
    assert converted["audio_encoder.subsampling.linear.bias"] is state_dict["encoder.pre_encode.out.bias"]
    assert converted["audio_encoder.layers.1.self_attn.q_proj.weight"] is state_dict["encoder.layers.1.self_attn.linear_q.weight"]
    assert converted["audio_encoder.layers.0.self_attn.o_proj.bias"] is state_dict["encoder.layers.0.self_attn.linear_out.bias"]
    assert (
        converted["audio_encoder.layers.0.self_attn.relative_k_proj.weight"]
        is state_dict["encoder.layers.0.self_attn.linear_pos.weight"]
    )
    assert converted["audio_encoder.layers.1.self_attn.bias_v"] is state_dict["encoder.layers.1.self_attn.pos_bias_v"]
    assert converted["audio_encoder.layers.0.conv.norm.running_var"] is state_dict["encoder.layers.0.conv.batch_norm.running_var"]
    assert converted["audio_projector.weight"] is state_dict["proj.weight"]
    assert not any("featurizer" in key or "num_batches_tracked" in key for key in converted)


# --- weights audit ------------------------------------------------------------------------------------------


def test_unknown_weight_key(nemo_perception) -> None:
    config, state_dict = nemo_perception
    extra = {**state_dict, "encoder.out_proj.weight": torch.zeros(4, 32)}
    with pytest.raises(CheckpointError, match=r"unknown keys \['encoder.out_proj.weight'\]"):
        convert_perception_state_dict(extra, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"])


def test_missing_weight_key(nemo_perception) -> None:
    config, state_dict = nemo_perception
    partial = {k: v for k, v in state_dict.items() if not k.startswith("encoder.layers.1.feed_forward2.")}
    with pytest.raises(CheckpointError, match=r"Missing: \['audio_encoder.layers.1.feed_forward2.linear1.bias'"):
        convert_perception_state_dict(partial, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"])


def test_extra_layer_is_unexpected(nemo_perception) -> None:
    config, state_dict = nemo_perception
    extra = {**state_dict, "encoder.layers.2.norm_out.weight": torch.ones(32)}
    with pytest.raises(CheckpointError, match=r"Unexpected: \['audio_encoder.layers.2.norm_out.weight'\]"):
        convert_perception_state_dict(extra, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"])


def test_wrong_shape(nemo_perception) -> None:
    config, state_dict = nemo_perception
    wrong = {**state_dict, "proj.weight": torch.zeros(8, 16)}
    with pytest.raises(CheckpointError, match=r"audio_projector.weight: \(8, 16\) instead of \(8, 32\)"):
        convert_perception_state_dict(
            wrong, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"],
            projector_cfg={"projector_type": "linear", "input_size": 32, "output_size": 8},
        )  # fmt: skip


def test_extra_state_dropped(nemo_perception) -> None:
    config, state_dict = nemo_perception
    extra = {**state_dict, "encoder.layers.0.self_attn._extra_state": torch.zeros(0)}
    converted = convert_perception_state_dict(extra, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"])
    assert len(converted) == 92


def test_custom_filterbank_rejected_in_conversion(nemo_perception) -> None:
    config, state_dict = nemo_perception
    kwargs = feature_extractor_config_from_nemo(config["preprocessor"], buffers=state_dict)
    doubled = {**state_dict, "preprocessor.featurizer.fb": state_dict["preprocessor.featurizer.fb"] * 2}
    with pytest.raises(CheckpointError, match="perception.preprocessor.featurizer.fb does not match"):
        convert_perception_state_dict(
            doubled, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"],
            feature_extractor_kwargs=kwargs,
        )  # fmt: skip


# --- untie_biases: false ------------------------------------------------------------------------------------


def _shared_bias_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # NeMo registers one Parameter in every layer; a safetensors export keeps a single alias of it.
    shared = {k: v for k, v in state_dict.items() if ".pos_bias_" not in k or k.startswith("encoder.layers.0.")}
    assert "encoder.layers.1.self_attn.pos_bias_u" not in shared
    return shared


def test_shared_biases_copied(nemo_perception) -> None:
    config, state_dict = nemo_perception
    encoder_cfg = {**config["encoder"], "untie_biases": False}
    converted = convert_perception_state_dict(
        _shared_bias_state(state_dict), encoder_cfg=encoder_cfg, adapter_cfg=config["modality_adapter"]
    )
    for layer in (0, 1):
        for name in ("u", "v"):
            target = converted[f"audio_encoder.layers.{layer}.self_attn.bias_{name}"]
            assert target is state_dict[f"encoder.layers.0.self_attn.pos_bias_{name}"]

    # Every layer's own copy of the same Parameter, as torch.save writes it, works as well.
    equal = dict(state_dict)
    for name in ("u", "v"):
        equal[f"encoder.layers.1.self_attn.pos_bias_{name}"] = state_dict[f"encoder.layers.0.self_attn.pos_bias_{name}"]
    assert len(convert_perception_state_dict(equal, encoder_cfg=encoder_cfg, adapter_cfg=config["modality_adapter"])) == 92


def test_shared_biases_must_be_equal(nemo_perception) -> None:
    config, state_dict = nemo_perception
    encoder_cfg = {**config["encoder"], "untie_biases": False}
    # The fixture's layers were trained with their own biases, which differ.
    with pytest.raises(CheckpointError, match="differ, but untie_biases is false"):
        convert_perception_state_dict(state_dict, encoder_cfg=encoder_cfg, adapter_cfg=config["modality_adapter"])


def test_shared_biases_need_one(nemo_perception) -> None:
    config, state_dict = nemo_perception
    encoder_cfg = {**config["encoder"], "untie_biases": False}
    without = {k: v for k, v in state_dict.items() if ".pos_bias_" not in k}
    with pytest.raises(CheckpointError, match=r"Missing: \['audio_encoder.layers.0.self_attn.bias_u'"):
        convert_perception_state_dict(without, encoder_cfg=encoder_cfg, adapter_cfg=config["modality_adapter"])


# --- ConformerEncoder adapter -------------------------------------------------------------------------------


def _conformer_adapter_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NeMo-named adapter weights: the encoder's real layer keys and shapes under ``modality_adapter.``.

    CONFORMER_ADAPTER has the fixture encoder's block sizes (d_model 32, 2 heads, ff 64, kernel 9),
    so the shapes come from tensors NeMo wrote, not from the modules under test.
    """
    generator = torch.Generator().manual_seed(5)
    adapter_state = {}
    for key, tensor in state_dict.items():
        if key.startswith("encoder.layers."):
            random = torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point() else tensor.clone()
            if key.endswith("running_var"):
                random = random.abs() + 0.5
            adapter_state["modality_adapter." + key.removeprefix("encoder.")] = random.to(tensor.dtype)
    adapter_state["modality_adapter.pre_encode.weight"] = torch.randn(32, 32, generator=generator)
    adapter_state["modality_adapter.pre_encode.bias"] = torch.randn(32, generator=generator)
    return {**state_dict, **adapter_state}


def test_conformer_adapter_conversion(nemo_perception, golden) -> None:
    config, state_dict = nemo_perception
    config = {**copy.deepcopy(config), "modality_adapter": dict(CONFORMER_ADAPTER)}
    full_state = _conformer_adapter_state(state_dict)

    configs = perception_configs_from_nemo(config, state_dict=full_state)
    assert configs["audio_adapter"] == {
        "adapter_type": "conformer",
        "input_size": 32,
        "conformer_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "hidden_act": "silu",
            "attention_bias": True,
            "convolution_bias": True,
            "conv_kernel_size": 9,
            "scale_input": True,
            "max_position_embeddings": 5000,
            "dropout": 0.0,
            "dropout_positions": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "layerdrop": 0.0,
        },
    }
    assert configs["audio_projector"]["input_size"] == 32

    converted = convert_perception_state_dict(
        full_state, encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"],
        projector_cfg=configs["audio_projector"],
    )  # fmt: skip
    adapter_keys = sorted(k for k in converted if k.startswith("audio_adapter."))
    nemo_adapter_keys = [k for k in full_state if k.startswith("modality_adapter.") and "num_batches_tracked" not in k]
    # pre_encode weight and bias, and 39 tensors per layer
    assert len(adapter_keys) == len(nemo_adapter_keys) == 2 + 2 * 39
    assert converted["audio_adapter.input_proj.weight"] is full_state["modality_adapter.pre_encode.weight"]
    assert (
        converted["audio_adapter.layers.1.conv.norm.running_mean"]
        is full_state["modality_adapter.layers.1.conv.batch_norm.running_mean"]
    )

    # shape flow: features -> encoder (19 x 32) -> adapter (19 x 32) -> projector (19 x 8)
    adapter = build_audio_adapter(configs["audio_adapter"]).eval()
    _load(adapter, converted, "audio_adapter.")
    encoder = ParakeetEncoder(ParakeetEncoderConfig(**configs["audio_encoder"])).eval()
    _load(encoder, converted, "audio_encoder.")
    projector = build_audio_projector(configs["audio_projector"]).eval()
    _load(projector, converted, "audio_projector.")
    extractor = SpeechLMBridgeFeatureExtractor(**configs["feature_extractor"])
    features = extractor([golden["audio"][0].numpy(), golden["audio"][0, :8000].numpy()], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        embeddings = encode_audio(encoder, adapter, projector, features["input_features"], features["attention_mask"])
        without_adapter = encode_audio(encoder, None, projector, features["input_features"], features["attention_mask"])
    assert [tuple(e.shape) for e in embeddings] == [(19, 8), (7, 8)]
    assert not torch.allclose(embeddings[0], without_adapter[0], atol=1e-3)


def test_conformer_adapter_missing_pre_encode(nemo_perception) -> None:
    config, state_dict = nemo_perception
    full_state = _conformer_adapter_state(state_dict)
    del full_state["modality_adapter.pre_encode.bias"]
    with pytest.raises(CheckpointError, match=r"Missing: \['audio_adapter.input_proj.bias'\]"):
        convert_perception_state_dict(full_state, encoder_cfg=config["encoder"], adapter_cfg=CONFORMER_ADAPTER)


def test_adapter_weights_with_identity_config(nemo_perception) -> None:
    config, state_dict = nemo_perception
    with pytest.raises(CheckpointError, match="modality_adapter.pre_encode.bias"):
        convert_perception_state_dict(
            _conformer_adapter_state(state_dict), encoder_cfg=config["encoder"], adapter_cfg=config["modality_adapter"]
        )


# --- unsupported NeMo settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subsampling": "striding"}, r"perception.encoder.subsampling='striding'"),
        ({"subsampling_factor": 6}, r"perception.encoder.subsampling_factor=6"),
        ({"causal_downsampling": True}, r"perception.encoder.causal_downsampling=True"),
        ({"att_context_size": [70, 13]}, r"perception.encoder.att_context_size=\[70, 13\]"),
        ({"att_context_style": "chunked_limited"}, r"perception.encoder.att_context_style='chunked_limited'"),
        ({"self_attention_model": "rel_pos_local_attn"}, r"perception.encoder.self_attention_model='rel_pos_local_attn'"),
        ({"conv_norm_type": "layer_norm"}, r"perception.encoder.conv_norm_type='layer_norm'"),
        ({"conv_context_size": "causal"}, r"perception.encoder.conv_context_size='causal'"),
        ({"conv_kernel_size": 8}, r"perception.encoder.conv_kernel_size=8"),
        ({"feat_out": 64}, r"perception.encoder.feat_out=64"),
        ({"reduction": "pooling", "reduction_factor": 2}, r"perception.encoder.reduction='pooling'"),
        ({"feat_in": 100}, r"perception.encoder.feat_in=100 is not divisible"),
        ({"n_heads": 3}, r"perception.encoder.d_model=32 is not divisible by perception.encoder.n_heads=3"),
        ({"conv_dual_mode": True}, r"perception.encoder has unknown keys \['conv_dual_mode'\]"),
        ({"_target_": "nemo.collections.asr.modules.SqueezeformerEncoder"}, r"perception.encoder._target_="),
    ],
)
def test_unsupported_encoder(nemo_perception, change: dict, message: str) -> None:
    config, _ = nemo_perception
    with pytest.raises(ConfigError, match=message):
        parakeet_encoder_config_from_nemo({**config["encoder"], **change})


def test_encoder_defaults() -> None:
    # ConformerEncoder's own defaults apply to keys a config omits: striding subsampling is one of them.
    minimal = {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 80, "n_layers": 1, "d_model": 16}
    with pytest.raises(ConfigError, match="subsampling='striding'"):
        parakeet_encoder_config_from_nemo(minimal)
    config = parakeet_encoder_config_from_nemo({**minimal, "subsampling": "dw_striding"})
    assert config["subsampling_factor"] == 4
    assert config["subsampling_conv_channels"] == 16
    assert config["intermediate_size"] == 64
    assert config["num_attention_heads"] == 4
    assert config["conv_kernel_size"] == 31
    assert config["scale_input"] is True
    assert config["attention_bias"] is config["convolution_bias"] is True


def test_encoder_without_bias(nemo_perception) -> None:
    config, _ = nemo_perception
    converted = parakeet_encoder_config_from_nemo({**config["encoder"], "use_bias": False, "xscaling": False})
    assert converted["attention_bias"] is False
    assert converted["convolution_bias"] is False
    assert converted["scale_input"] is False


@pytest.mark.parametrize(
    "target",
    [
        "nemo.collections.speechlm2.modules.perception.MultiLayerProjectionConnector",
        "nemo.collections.speechlm2.modules.perception.QformerConnector",
        "my.custom.Adapter",
    ],
)
def test_unsupported_adapter(target: str) -> None:
    with pytest.raises(ConfigError, match=r"perception.modality_adapter._target_=.*IdentityConnector"):
        adapter_config_from_nemo({"_target_": target, "d_model": 32})


def test_adapter_subsampling_rejected() -> None:
    with pytest.raises(ConfigError, match="perception.modality_adapter.subsampling_factor=2"):
        adapter_config_from_nemo({**CONFORMER_ADAPTER, "subsampling_factor": 2})


def test_adapter_input_size_mismatch(nemo_perception) -> None:
    config, state_dict = nemo_perception
    config = {**config, "modality_adapter": {**CONFORMER_ADAPTER, "feat_in": 64}}
    with pytest.raises(ConfigError, match="feat_in=64 does not match perception.encoder.d_model=32"):
        perception_configs_from_nemo(config, state_dict=state_dict)


def test_projector_config_errors(nemo_perception) -> None:
    config, _ = nemo_perception
    with pytest.raises(ConfigError, match="perception.output_dim"):
        projector_config_from_nemo({k: v for k, v in config.items() if k != "output_dim"})
    with pytest.raises(ConfigError, match="modality_adapter.d_model=16 does not match"):
        projector_config_from_nemo({**config, "modality_adapter": {**config["modality_adapter"], "d_model": 16}})


def test_perception_level_errors(nemo_perception) -> None:
    config, state_dict = nemo_perception
    with pytest.raises(ConfigError, match="perception.encoder is missing.*model_config.yaml"):
        perception_configs_from_nemo({k: v for k, v in config.items() if k != "encoder"}, state_dict=state_dict)
    with pytest.raises(ConfigError, match="perception.rote"):
        perception_configs_from_nemo({**config, "rote": {"_target_": "x"}}, state_dict=state_dict)
    transcription = "nemo.collections.speechlm2.modules.perception.AudioTranscriptionPerceptionModule"
    with pytest.raises(ConfigError, match="perception.target='.*AudioTranscriptionPerceptionModule'"):
        perception_configs_from_nemo({**config, "target": transcription}, state_dict=state_dict)


# --- preprocessor -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"normalize": "all_features"}, r"perception.preprocessor.normalize='all_features'"),
        ({"normalize": None}, r"perception.preprocessor.normalize=None"),
        ({"log": False}, r"perception.preprocessor.log=False"),
        ({"frame_splicing": 3}, r"perception.preprocessor.frame_splicing=3"),
        ({"exact_pad": True}, r"perception.preprocessor.exact_pad=True"),
        ({"use_torchaudio": True}, r"perception.preprocessor.use_torchaudio=True"),
        ({"window": "kaiser"}, r"perception.preprocessor.window='kaiser'"),
        ({"log_zero_guard_type": "floor"}, r"perception.preprocessor.log_zero_guard_type='floor'"),
        ({"log_zero_guard_value": "huge"}, r"perception.preprocessor.log_zero_guard_value='huge'"),
        ({"n_window_size": 400}, r"sets both window_size and n_window_size"),
        ({"use_grads": True}, r"unknown keys \['use_grads'\]"),
        ({"_target_": "nemo.collections.asr.modules.AudioToMFCCPreprocessor"}, r"perception.preprocessor._target_="),
    ],
)
def test_unsupported_preprocessor(nemo_perception, change: dict, message: str) -> None:
    config, _ = nemo_perception
    with pytest.raises(ConfigError, match=message):
        feature_extractor_config_from_nemo({**config["preprocessor"], **change}, buffers=None)


def test_preprocessor_defaults_and_sample_counts(nemo_perception) -> None:
    config, _ = nemo_perception
    preprocessor = {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "window_size": None,
        "window_stride": None,
        "n_window_size": 320,
        "n_window_stride": 80,
        "highfreq": 7600,
        "preemph": None,
        "mag_power": 1.0,
    }
    kwargs = feature_extractor_config_from_nemo(preprocessor, buffers=None)
    assert kwargs["win_length"] == 320
    assert kwargs["hop_length"] == 80
    assert kwargs["n_fft"] == 512
    assert kwargs["feature_size"] == 64
    assert kwargs["mel_max_frequency"] == 7600.0
    assert kwargs["preemphasis"] is None
    assert kwargs["mag_power"] == 1.0
    # NeMo's default window_size 0.02 s is 320 samples at 16 kHz, so n_fft becomes 512.
    defaults = feature_extractor_config_from_nemo({"_target_": preprocessor["_target_"]}, buffers=None)
    assert (defaults["win_length"], defaults["hop_length"], defaults["n_fft"]) == (320, 160, 512)
    assert defaults["preemphasis"] == 0.97


def test_dither_logged(nemo_perception, caplog) -> None:
    config, state_dict = nemo_perception
    with caplog.at_level(logging.INFO, logger="speechlm_bridge.export.nemo_perception"):
        feature_extractor_config_from_nemo(config["preprocessor"], buffers=state_dict)
    assert "perception.preprocessor.dither=1e-05 applies only in training" in caplog.text


def test_float32_buffers(nemo_perception) -> None:
    config, state_dict = nemo_perception
    reference = feature_extractor_config_from_nemo(config["preprocessor"], buffers=None)
    extractor = SpeechLMBridgeFeatureExtractor(**reference)
    buffers = {
        "preprocessor.featurizer.fb": extractor.mel_filters.unsqueeze(0).clone(),
        "preprocessor.featurizer.window": extractor.window.clone(),
    }
    kwargs = feature_extractor_config_from_nemo(config["preprocessor"], buffers=buffers)
    assert kwargs["mel_filters_dtype"] == kwargs["window_dtype"] == "float32"


def test_custom_filterbank_rejected(nemo_perception) -> None:
    config, state_dict = nemo_perception
    fb = state_dict["preprocessor.featurizer.fb"].clone()
    fb[0, 10, :] = 0
    with pytest.raises(ConfigError, match=r"featurizer.fb \(torch.bfloat16\) matches neither the bfloat16/float32"):
        feature_extractor_config_from_nemo(
            config["preprocessor"], buffers={**state_dict, "preprocessor.featurizer.fb": fb}
        )
    with pytest.raises(ConfigError, match=r"featurizer.window has shape \(400,\), but .* gives \(320,\)"):
        feature_extractor_config_from_nemo({**config["preprocessor"], "window_size": 0.02}, buffers=state_dict)


def test_filterbank_one_ulp_accepted(nemo_perception, caplog) -> None:
    # Another librosa version may round one filter value differently; one ulp is accepted with a warning.
    config, state_dict = nemo_perception
    fb = state_dict["preprocessor.featurizer.fb"].clone()
    column = int(fb[0, 20].float().argmax())
    fb.view(torch.int16)[0, 20, column] += 1  # the next bfloat16 value
    with caplog.at_level(logging.WARNING, logger="speechlm_bridge.export.nemo_perception"):
        kwargs = feature_extractor_config_from_nemo(
            config["preprocessor"], buffers={**state_dict, "preprocessor.featurizer.fb": fb}
        )
    assert kwargs["mel_filters_dtype"] == "bfloat16"
    assert "differs from the recomputed bfloat16 values in 1 of 32896 elements" in caplog.text


def test_missing_buffers_assume_float32(nemo_perception, caplog) -> None:
    config, _ = nemo_perception
    with caplog.at_level(logging.WARNING, logger="speechlm_bridge.export.nemo_perception"):
        kwargs = feature_extractor_config_from_nemo(config["preprocessor"], buffers={})
    assert kwargs["mel_filters_dtype"] == kwargs["window_dtype"] == "float32"
    assert "preprocessor.featurizer.fb is not in the checkpoint" in caplog.text


def test_configs_from_asr_nemo(nemo_perception, nemo_salm_dir: Path) -> None:
    # SALM copies perception.preprocessor and perception.encoder from the .nemo's model_config.yaml.
    config, state_dict = nemo_perception
    with tarfile.open(nemo_salm_dir / "asr" / "tiny-fastconformer-ctc.nemo") as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("model_config.yaml"))
        asr_config = yaml.safe_load(archive.extractfile(member))
    assert feature_extractor_config_from_nemo(asr_config["preprocessor"], buffers=state_dict) == (
        feature_extractor_config_from_nemo(config["preprocessor"], buffers=state_dict)
    )
    assert parakeet_encoder_config_from_nemo(asr_config["encoder"]) == parakeet_encoder_config_from_nemo(config["encoder"])

