"""Export with a hybrid Mamba backbone (a tiny NemotronH written here) and with a Conformer adapter."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import save_file

import speechlm_bridge  # noqa: F401  (registers the auto classes)
from speechlm_bridge.demo.backbone import write_demo_backbone
from speechlm_bridge.demo.training_run import random_salm_state_dict, write_experiment_config
from speechlm_bridge.export.pipeline import export_checkpoint


def _nemotron_h_config(vocab_size: int) -> dict:
    from transformers import NemotronHConfig

    config = NemotronHConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        layers_block_type=["mamba", "attention", "mlp"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
        mamba_d_conv=4,
        expand=1,
        tie_word_embeddings=False,
        architectures=["NemotronHForCausalLM"],
        eos_token_id=2,
        pad_token_id=0,
    )
    return config.to_dict()


@pytest.fixture
def hybrid_run(tmp_path):
    """A backbone directory with a NemotronH config, an experiment YAML and random SALM weights."""
    demo_config = write_demo_backbone(tmp_path / "backbone")
    config = _nemotron_h_config(demo_config["vocab_size"])
    (tmp_path / "backbone" / "config.json").write_text(json.dumps(config))
    model_config = write_experiment_config(tmp_path / "exp.yaml", backbone_dir="backbone", hidden_size=64)
    weights = random_salm_state_dict(config, model_config, seed=3)
    return tmp_path, weights


def _export_and_generate(tmp_path, weights: dict, name: str):
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    checkpoint = tmp_path / f"{name}.safetensors"
    save_file(weights, str(checkpoint))
    output = tmp_path / f"export-{name}"
    result = export_checkpoint(checkpoint, config=tmp_path / "exp.yaml", output=output)

    model = AutoModelForMultimodalLM.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    prompt = processor.render_prompt([{"role": "user", "content": "Transcribe: <|audio|>"}])
    audio = torch.sin(torch.arange(8000) / 7.0).numpy()
    inputs = processor(text=prompt, audio=audio, sampling_rate=16000)
    with torch.no_grad():
        output_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return result, model, output_ids, inputs


def test_hybrid_export_runs_generate(hybrid_run):
    tmp_path, weights = hybrid_run
    assert "llm.model.embeddings.weight" in weights
    result, model, output_ids, inputs = _export_and_generate(tmp_path, weights, "current-names")

    assert result.backbone_family == "hybrid-mamba"
    assert type(model.language_model).__name__ == "NemotronHForCausalLM"
    assert output_ids.shape[1] == inputs["input_ids"].shape[1] + 4
    torch.testing.assert_close(
        model.language_model.model.layers[0].mixer.A_log.detach(),
        weights["llm.model.layers.0.mixer.A_log"],
        atol=0,
        rtol=0,
    )
    # The hybrid backbone is untied here, so both matrices are kept.
    torch.testing.assert_close(model.language_model.lm_head.weight.detach(), weights["llm.lm_head.weight"], atol=0, rtol=0)


def test_hybrid_legacy_backbone_prefix(hybrid_run):
    # NemotronH checkpoints published on the Hub name the decoder `backbone.`, not `model.`.
    tmp_path, weights = hybrid_run
    legacy = {re.sub(r"^llm\.model\.", "llm.backbone.", key): value for key, value in weights.items()}
    assert "llm.backbone.embeddings.weight" in legacy
    _, model, _, _ = _export_and_generate(tmp_path, legacy, "legacy-names")
    torch.testing.assert_close(
        model.language_model.model.embeddings.weight.detach(), weights["llm.model.embeddings.weight"], atol=0, rtol=0
    )


def test_conformer_adapter_export(tmp_path):
    from transformers import AutoModelForMultimodalLM

    from speechlm_bridge.export.nemo_perception import convert_perception_state_dict  # noqa: F401

    backbone_config = write_demo_backbone(tmp_path / "backbone")
    model_config = write_experiment_config(tmp_path / "exp.yaml", backbone_dir="backbone", hidden_size=64)
    weights = random_salm_state_dict(backbone_config, model_config, seed=5)

    # NeMo's older salm.yaml: a 1-layer ConformerEncoder adapter without subsampling; its
    # pre_encode is a Linear from the encoder width to the adapter width.
    adapter_width, encoder_width = 32, model_config["perception"]["encoder"]["d_model"]
    adapter = {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": encoder_width,
        "n_layers": 1,
        "d_model": adapter_width,
        "subsampling_factor": 1,
        "ff_expansion_factor": 2,
        "self_attention_model": "rel_pos",
        "n_heads": 2,
        "conv_kernel_size": 3,
        "xscaling": True,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
    }
    experiment = yaml.safe_load((tmp_path / "exp.yaml").read_text())
    experiment["model"]["perception"]["modality_adapter"] = adapter
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment))

    generator = torch.Generator().manual_seed(0)
    weights["perception.modality_adapter.pre_encode.weight"] = torch.randn(adapter_width, encoder_width, generator=generator)
    weights["perception.modality_adapter.pre_encode.bias"] = torch.randn(adapter_width, generator=generator)
    layer_shapes = {
        key.removeprefix("perception.encoder.layers.0."): tensor
        for key, tensor in weights.items()
        if key.startswith("perception.encoder.layers.0.")
    }
    for suffix, tensor in layer_shapes.items():
        shape = _adapter_shape(suffix, tensor.shape, encoder_width, adapter_width, heads=2, kernel=3, expansion=2)
        if tensor.dtype == torch.int64:
            weights[f"perception.modality_adapter.layers.0.{suffix}"] = torch.zeros(shape, dtype=torch.int64)
        else:
            weights[f"perception.modality_adapter.layers.0.{suffix}"] = torch.randn(shape, generator=generator) * 0.1
    weights["perception.proj.weight"] = torch.randn(64, adapter_width, generator=generator) * 0.1
    weights["perception.modality_adapter.layers.0.conv.batch_norm.running_var"] = torch.ones(adapter_width)

    save_file(weights, str(tmp_path / "adapter.safetensors"))
    export_checkpoint(tmp_path / "adapter.safetensors", config=tmp_path / "exp.yaml", output=tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["adapter_config"]["adapter_type"] == "conformer"
    assert config["projector_config"]["input_size"] == adapter_width

    model = AutoModelForMultimodalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(
        model.audio_adapter.input_proj.weight.detach(),
        weights["perception.modality_adapter.pre_encode.weight"],
        atol=0,
        rtol=0,
    )
    features = torch.randn(1, 200, 80, generator=generator)
    mask = torch.ones(1, 200, dtype=torch.long)
    with torch.no_grad():
        audio = model.get_audio_features(features, mask)
    assert audio[0].shape == (25, 64)
    assert torch.isfinite(audio[0]).all()


def _adapter_shape(suffix, shape, encoder_width, adapter_width, *, heads, kernel, expansion):
    """Shape of an adapter layer tensor, derived from the encoder layer tensor of the same name."""
    shape = list(shape)
    replaced = []
    for dim in shape:
        if dim == encoder_width:
            replaced.append(adapter_width)
        elif dim == encoder_width * 4:
            replaced.append(adapter_width * expansion)
        elif dim == 9:
            replaced.append(kernel)
        elif dim == encoder_width * 2:
            replaced.append(adapter_width * 2)
        elif dim == encoder_width // 4:
            replaced.append(adapter_width // heads)
        elif dim == 4 and "pos_bias" in suffix:
            replaced.append(heads)
        else:
            replaced.append(dim)
    return tuple(replaced)


def test_adapter_positions_initialized_on_load(tmp_path):
    # Regression: the adapter's non-persistent inv_freq buffer is not in the weights. Before the
    # model's _init_weights covered it, the buffer kept uninitialized memory, so the adapter
    # output NaN in some runs.
    from speechlm_bridge.modeling.configuration import SpeechLMBridgeConfig
    from speechlm_bridge.modeling.modeling import SpeechLMBridgeForConditionalGeneration

    backbone_config = write_demo_backbone(tmp_path / "backbone")
    config = SpeechLMBridgeConfig(
        text_config=backbone_config,
        encoder_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64, "num_mel_bins": 80, "subsampling_conv_channels": 8},
        adapter_config={
            "adapter_type": "conformer",
            "input_size": 32,
            "conformer_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 32},
        },
        projector_config={"projector_type": "linear", "input_size": 16, "output_size": 64, "bias": True},
        audio_token_id=0,
    )
    model = SpeechLMBridgeForConditionalGeneration(config)
    positions = model.audio_adapter.encode_positions
    expected = positions.compute_default_relative_positional_parameters(positions.config)
    positions.inv_freq.fill_(float("nan"))
    positions._is_hf_initialized = False
    model._init_weights(positions)
    assert torch.equal(positions.inv_freq, expected)

    model.save_pretrained(tmp_path / "saved")
    for _ in range(3):
        loaded = SpeechLMBridgeForConditionalGeneration.from_pretrained(tmp_path / "saved")
        assert torch.equal(loaded.audio_adapter.encode_positions.inv_freq, expected)
