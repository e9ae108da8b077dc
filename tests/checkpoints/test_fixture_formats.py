"""read_checkpoint on every artifact NeMo 3.0 wrote: format, keys and exact values."""

from __future__ import annotations

import pytest
import torch

from speechlm_bridge.checkpoints import read_checkpoint, read_nemo_archive

# (path under nemo-salm/, manifest artifact, expected format)
ARTIFACTS = [
    ("lightning/step=2.ckpt", "lightning/step=2.ckpt:state_dict", "lightning"),
    ("lightning-lora/step=2.ckpt", "lightning-lora/step=2.ckpt:state_dict", "lightning"),
    ("dcp/step=2", "dcp/step=2:state_dict", "dcp"),
    ("save_pretrained", "save_pretrained/model.safetensors", "nemo-save-pretrained"),
    ("to_hf/from_ckpt", "to_hf/from_ckpt/model.safetensors", "nemo-to-hf"),
    ("to_hf/from_dcp", "to_hf/from_dcp/model.safetensors", "nemo-to-hf"),
    ("to_hf/from_ckpt_lora", "to_hf/from_ckpt_lora/model.safetensors", "nemo-to-hf"),
    ("backbone/tiny-qwen3", "backbone/tiny-qwen3/model.safetensors", "safetensors"),
]


@pytest.mark.parametrize(("relative", "artifact", "expected_format"), ARTIFACTS)
def test_fixture_values_match_manifest(nemo_salm_dir, manifest, digest, relative, artifact, expected_format):
    loaded = read_checkpoint(nemo_salm_dir / relative)
    expected = manifest[artifact]

    assert loaded.format == expected_format
    assert loaded.path == nemo_salm_dir / relative
    assert sorted(loaded.state_dict) == sorted(expected)
    for name, tensor in loaded.state_dict.items():
        assert list(tensor.shape) == expected[name]["shape"], name
        assert str(tensor.dtype).removeprefix("torch.") == expected[name]["dtype"], name
        assert digest(tensor) == expected[name]["sha256"], name


def test_lightning_config_is_cfg_as_passed(nemo_salm_dir):
    loaded = read_checkpoint(nemo_salm_dir / "lightning" / "step=2.ckpt")

    assert loaded.config["pretrained_llm"] == "backbone/tiny-qwen3"
    assert loaded.config["audio_locator_tag"] == "<|audio|>"
    # hyper_parameters.cfg is saved before SALM fills perception from the ASR model.
    assert "encoder" not in loaded.config["perception"]
    assert "lora" not in loaded.config


def test_lightning_lora_config_has_lora(nemo_salm_dir):
    loaded = read_checkpoint(nemo_salm_dir / "lightning-lora" / "step=2.ckpt")

    assert loaded.config["lora"]["r"] == 4
    assert loaded.config["lora"]["lora_alpha"] == 8


def test_lightning_tied_tensors_share_storage(nemo_salm_dir):
    state_dict = read_checkpoint(nemo_salm_dir / "lightning" / "step=2.ckpt").state_dict

    embed, head = state_dict["embed_tokens.weight"], state_dict["llm.lm_head.weight"]
    assert embed.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()


def test_dcp_config_comes_from_meta_pt(nemo_salm_dir):
    loaded = read_checkpoint(nemo_salm_dir / "dcp" / "step=2")

    assert loaded.config["prompt_format"] == "qwen3"
    assert loaded.config["perception"]["output_dim"] == 8


def test_dcp_metadata_file_path_reads_directory(nemo_salm_dir):
    loaded = read_checkpoint(nemo_salm_dir / "dcp" / "step=2" / ".metadata")

    assert loaded.format == "dcp"
    assert len(loaded.state_dict) == 121


@pytest.mark.parametrize("relative", ["save_pretrained", "to_hf/from_ckpt"])
def test_nemo_dir_config_is_config_json(nemo_salm_dir, relative):
    loaded = read_checkpoint(nemo_salm_dir / relative)

    assert loaded.config["model_type"] == "nemo_speechlm"
    assert loaded.config["architectures"] == ["NeMoSpeechLMForConditionalGeneration"]
    # save_pretrained writes the config after construction, with the ASR blocks filled in.
    assert loaded.config["perception"]["encoder"]["d_model"] == 32


def test_safetensors_single_file(nemo_salm_dir, manifest, digest):
    loaded = read_checkpoint(nemo_salm_dir / "to_hf" / "from_dcp" / "model.safetensors")

    assert loaded.format == "safetensors"
    assert loaded.config is None
    expected = manifest["to_hf/from_dcp/model.safetensors"]
    assert {name: digest(t) for name, t in loaded.state_dict.items()} == {
        name: entry["sha256"] for name, entry in expected.items()
    }


def test_nemo_archive_config_and_weights(nemo_salm_dir):
    archive = read_nemo_archive(nemo_salm_dir / "asr" / "tiny-fastconformer-ctc.nemo")

    assert archive.config["encoder"]["_target_"] == "nemo.collections.asr.modules.ConformerEncoder"
    assert archive.config["encoder"]["d_model"] == 32
    assert archive.config["preprocessor"]["features"] == 128
    assert len(archive.state_dict) == 96
    assert archive.state_dict["encoder.pre_encode.out.weight"].shape == (32, 256)
    assert archive.state_dict["preprocessor.featurizer.fb"].dtype == torch.float32


def test_nemo_archive_matches_salm_copies(nemo_salm_dir, manifest, digest):
    # SALM copied the ASR preprocessor/encoder config into perception and loaded its weights,
    # training never changed the mel filterbank and window buffers, and bf16-true cast them.
    archive = read_nemo_archive(nemo_salm_dir / "asr" / "tiny-fastconformer-ctc.nemo")
    saved = read_checkpoint(nemo_salm_dir / "save_pretrained")
    expected = manifest["lightning/step=2.ckpt:state_dict"]

    assert saved.config["perception"]["encoder"] == archive.config["encoder"]
    assert saved.config["perception"]["preprocessor"] == archive.config["preprocessor"]
    for buffer in ("preprocessor.featurizer.fb", "preprocessor.featurizer.window"):
        as_trained = archive.state_dict[buffer].to(torch.bfloat16)
        assert digest(as_trained) == expected[f"perception.{buffer}"]["sha256"], buffer
