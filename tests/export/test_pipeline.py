"""End-to-end exports of the checkpoints NeMo's own code wrote, compared with NeMo's outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import speechlm_bridge  # noqa: F401  (registers the auto classes)
from speechlm_bridge.checkpoints import read_checkpoint
from speechlm_bridge.export.pipeline import export_checkpoint

# (checkpoint, experiment YAML or None when the checkpoint stores its config)
FIXTURE_INPUTS = {
    "lightning": ("lightning/step=2.ckpt", "exp_config.yaml"),
    "lightning-no-yaml": ("lightning/step=2.ckpt", None),
    "dcp": ("dcp/step=2", "exp_config_fsdp2.yaml"),
    "lightning-lora": ("lightning-lora/step=2.ckpt", "exp_config_lora.yaml"),
    "save_pretrained": ("save_pretrained", None),
    "to_hf-ckpt": ("to_hf/from_ckpt", None),
    "to_hf-dcp": ("to_hf/from_dcp", None),
    "to_hf-lora": ("to_hf/from_ckpt_lora", None),
}
# Exports of these hold the Lightning checkpoint's weights, on which NeMo computed golden/.
GOLDEN_WEIGHTS = ("lightning", "lightning-no-yaml", "save_pretrained", "to_hf-ckpt")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, nemo_salm_dir) -> dict[str, Path]:
    """Export every NeMo fixture once per module, with the fixture folder as working directory
    (NeMo's configs name the backbone and ASR model relative to it)."""
    nemo_dir = nemo_salm_dir
    root = tmp_path_factory.mktemp("exports")
    previous = Path.cwd()
    os.chdir(nemo_dir)
    try:
        outputs = {}
        for name, (checkpoint, config) in FIXTURE_INPUTS.items():
            outputs[name] = root / name
            export_checkpoint(checkpoint, config=config, output=outputs[name])
    finally:
        os.chdir(previous)
    return outputs


@pytest.fixture(scope="module")
def golden(nemo_salm_dir):
    outputs = load_file(nemo_salm_dir / "golden" / "golden_outputs.safetensors")
    inputs = json.loads((nemo_salm_dir / "golden" / "golden_inputs.json").read_text())
    return inputs, outputs


def _load(export_dir: Path):
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    model = AutoModelForMultimodalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(export_dir)


@pytest.mark.parametrize("name", GOLDEN_WEIGHTS)
def test_export_matches_nemo_golden(name, exports, golden):
    golden_inputs, golden_outputs = golden
    model, processor = _load(exports[name])
    prompt = processor.tokenizer.decode(golden_inputs["prompt_input_ids"])
    inputs = processor(text=prompt, audio=golden_outputs["audio"][0].numpy(), sampling_rate=16000)

    assert inputs["input_ids"].shape[1] == golden_outputs["input_embeds"].shape[0]
    with torch.no_grad():
        audio = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
        embeds = model.embed_inputs(inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"])
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)

    assert len(audio) == 1
    assert audio[0].shape == golden_outputs["perception_output"].shape
    torch.testing.assert_close(audio[0], golden_outputs["perception_output"].float(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(embeds[0], golden_outputs["input_embeds"].float(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(logits[-1], golden_outputs["logits_last"].float(), atol=1e-6, rtol=1e-5)
    assert logits.argmax(-1).tolist() == golden_outputs["argmax_ids"].tolist()
    assert generated[0, inputs["input_ids"].shape[1]:].tolist() == golden_outputs["generated_ids"].tolist()


def test_prompt_ids_match_nemo(exports, golden):
    golden_inputs, _ = golden
    _, processor = _load(exports["lightning"])
    prompt = processor.render_prompt(golden_inputs["dialog"], enable_thinking=False)
    ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids == golden_inputs["prompt_input_ids"]


@pytest.mark.parametrize("name", sorted(FIXTURE_INPUTS))
def test_export_loads_offline_with_auto_classes(name, exports):
    from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer

    export_dir = exports[name]
    config = AutoConfig.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    feature_extractor = AutoFeatureExtractor.from_pretrained(export_dir)
    assert type(config).__name__ == "SpeechLMBridgeConfig"
    assert config.audio_token_id == 151669
    assert tokenizer.convert_tokens_to_ids(config.audio_locator_tag) == 151669
    assert feature_extractor.feature_size == 128
    assert config.prompt_format == "qwen3"
    assert config.encoder_config.model_type == "parakeet_encoder"


def test_export_directory_files(exports):
    export_dir = exports["lightning"]
    names = sorted(path.name for path in export_dir.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == "speechlm_bridge"
    assert config["architectures"] == ["SpeechLMBridgeForConditionalGeneration"]
    assert config["text_config"]["architectures"] == ["Qwen3ForCausalLM"]
    assert config["audio_locator_tag"] == "<|audio|>"
    generation = json.loads((export_dir / "generation_config.json").read_text())
    assert 151645 in generation["eos_token_id"]  # <|im_end|> ends an assistant turn
    preprocessor = json.loads((export_dir / "preprocessor_config.json").read_text())
    assert preprocessor["sampling_rate"] == 16000
    assert preprocessor["n_fft"] == 512
    assert preprocessor["hop_length"] == 160
    assert preprocessor["normalize"] == "per_feature"
    assert "dither" not in preprocessor or preprocessor["dither"] == 0.0


def test_export_keeps_bf16_weights_exactly(exports, nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / "lightning" / "step=2.ckpt").state_dict
    with safe_open(exports["lightning"] / "model.safetensors", "pt") as exported:
        assert exported.get_tensor("language_model.model.norm.weight").dtype == torch.bfloat16
        assert torch.equal(exported.get_tensor("language_model.model.norm.weight"), source["llm.model.norm.weight"])
        assert torch.equal(
            exported.get_tensor("language_model.model.embed_tokens.weight"), source["embed_tokens.weight"]
        )
        assert torch.equal(exported.get_tensor("audio_projector.weight"), source["perception.proj.weight"])
        assert "language_model.lm_head.weight" not in exported.keys()


def test_dcp_export_keeps_trained_lm_head(exports, nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / "dcp" / "step=2").state_dict
    assert not torch.equal(source["embed_tokens.weight"], source["llm.lm_head.weight"])
    with safe_open(exports["dcp"] / "model.safetensors", "pt") as exported:
        assert torch.equal(exported.get_tensor("language_model.lm_head.weight"), source["llm.lm_head.weight"])
        assert torch.equal(
            exported.get_tensor("language_model.model.embed_tokens.weight"), source["embed_tokens.weight"]
        )
    config = json.loads((exports["dcp"] / "config.json").read_text())
    assert config["text_config"]["tie_word_embeddings"] is False

    model, _ = _load(exports["dcp"])
    torch.testing.assert_close(
        model.language_model.lm_head.weight, source["llm.lm_head.weight"].float(), atol=0, rtol=0
    )
    assert model.language_model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_nemo_to_hf_from_dcp_lost_lm_head(exports):
    # NeMo's to_hf of the same DCP kept only embed_tokens; our export of the DCP keeps both.
    with safe_open(exports["to_hf-dcp"] / "model.safetensors", "pt") as nemo_export:
        assert "language_model.lm_head.weight" not in nemo_export.keys()


def test_lora_merged_with_config_scale(exports, nemo_salm_dir):
    import yaml

    lora = yaml.safe_load((nemo_salm_dir / "exp_config_lora.yaml").read_text())["model"]["lora"]
    scale = lora["lora_alpha"] / lora["r"]
    source = read_checkpoint(nemo_salm_dir / "lightning-lora" / "step=2.ckpt").state_dict
    prefix = "llm.base_model.model.model.layers.0.self_attn.q_proj."
    expected = (
        source[prefix + "base_layer.weight"].float()
        + scale * source[prefix + "lora_B.default.weight"].float() @ source[prefix + "lora_A.default.weight"].float()
    ).to(torch.bfloat16)
    for name in ("lightning-lora", "to_hf-lora"):
        with safe_open(exports[name] / "model.safetensors", "pt") as exported:
            keys = list(exported.keys())
            assert not [key for key in keys if "lora_" in key or "base_layer" in key]
            merged = exported.get_tensor("language_model.model.layers.0.self_attn.q_proj.weight")
        assert torch.equal(merged, expected), name
    assert not torch.equal(expected, source[prefix + "base_layer.weight"])


def test_generate_runs_on_every_export(exports, golden):
    _, golden_outputs = golden
    for name in ("dcp", "lightning-lora"):
        model, processor = _load(exports[name])
        prompt = processor.render_prompt(
            [{"role": "user", "content": "Transcribe the following: <|audio|>"}], enable_thinking=False
        )
        inputs = processor(text=prompt, audio=golden_outputs["audio"][0].numpy(), sampling_rate=16000)
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert output.shape == (1, inputs["input_ids"].shape[1] + 3), name


def test_batched_generate_matches_single(exports, golden):
    # Regression: right padding (the backbone tokenizer's default) changed the shorter row's logits.
    _, golden_outputs = golden
    model, processor = _load(exports["lightning"])
    audio = golden_outputs["audio"][0].numpy()
    dialogs = [
        [{"role": "user", "content": "Transcribe the following: <|audio|>"}],
        [{"role": "system", "content": "You are a careful, helpful transcriber."},
         {"role": "user", "content": "Please transcribe the following clip: <|audio|>"}],
    ]
    kwargs = {"sampling_rate": 16000, "template_kwargs": {"enable_thinking": False}}
    batch = processor(messages=dialogs, audio=[audio[:16000], audio], **kwargs)
    with torch.no_grad():
        batch_logits = model(**batch).logits[:, -1]
        for row, (dialog, clip) in enumerate(zip(dialogs, [audio[:16000], audio])):
            single = processor(messages=dialog, audio=clip, **kwargs)
            torch.testing.assert_close(batch_logits[row], model(**single).logits[0, -1], atol=1e-5, rtol=1e-4)


def test_full_disk_stops_before_copying(tmp_path, nemo_salm_dir, monkeypatch):
    from collections import namedtuple

    from speechlm_bridge.errors import CheckpointError
    from speechlm_bridge.export import pipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    monkeypatch.chdir(nemo_salm_dir)
    output = tmp_path / "my-model"

    with pytest.raises(CheckpointError) as raised:
        export_checkpoint("dcp/step=2", config="exp_config_fsdp2.yaml", output=output)

    message = str(raised.value)
    assert message.startswith("the weights need 5.0 MB, but the filesystem of ")
    assert f"{output} has 1.0 MB free. Free space there or choose another --output." in message
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []
