"""Stand in for a NeMo SALM training run: random weights in NeMo's names, an experiment YAML, and
a 2-rank FSDP2 torch.distributed checkpoint written the way Lightning's ModelParallelStrategy does.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import torch
import yaml

# NeMo's FastConformer settings for the demo encoder, in NeMo's own config keys.
DEMO_PREPROCESSOR = {
    "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
    "sample_rate": 16000,
    "normalize": "per_feature",
    "window_size": 0.025,
    "window_stride": 0.01,
    "window": "hann",
    "features": 80,
    "n_fft": 512,
    "log": True,
    "frame_splicing": 1,
    "dither": 1e-05,
    "pad_to": 0,
    "pad_value": 0.0,
}
DEMO_ENCODER = {
    "_target_": "nemo.collections.asr.modules.ConformerEncoder",
    "feat_in": 80,
    "feat_out": -1,
    "n_layers": 2,
    "d_model": 64,
    "subsampling": "dw_striding",
    "subsampling_factor": 8,
    "subsampling_conv_channels": 32,
    "causal_downsampling": False,
    "ff_expansion_factor": 4,
    "self_attention_model": "rel_pos",
    "n_heads": 4,
    "att_context_size": [-1, -1],
    "att_context_style": "regular",
    "xscaling": True,
    "untie_biases": True,
    "pos_emb_max_len": 5000,
    "conv_kernel_size": 9,
    "conv_norm_type": "batch_norm",
    "conv_context_size": None,
    "dropout": 0.0,
    "dropout_pre_encoder": 0.0,
    "dropout_emb": 0.0,
    "dropout_att": 0.0,
}
AUDIO_LOCATOR_TAG = "<|audio|>"

# Our exported names -> NeMo SALM names, for writing random weights the way NeMo stores them. The
# export reverses this (speechlm_bridge.export.nemo_perception) and audits the result.
_TO_NEMO_NAMES = (
    (r"^audio_encoder\.subsampling\.layers\.", "perception.encoder.pre_encode.conv."),
    (r"^audio_encoder\.subsampling\.linear\.", "perception.encoder.pre_encode.out."),
    (r"^audio_encoder\.", "perception.encoder."),
    (r"^(perception\..*)\.self_attn\.([qkv])_proj\.", r"\1.self_attn.linear_\2."),
    (r"^(perception\..*)\.self_attn\.o_proj\.", r"\1.self_attn.linear_out."),
    (r"^(perception\..*)\.self_attn\.relative_k_proj\.", r"\1.self_attn.linear_pos."),
    (r"^(perception\..*)\.self_attn\.bias_([uv])$", r"\1.self_attn.pos_bias_\2"),
    (r"^(perception\..*)\.conv\.norm\.", r"\1.conv.batch_norm."),
    (r"^audio_projector\.", "perception.proj."),
    (r"^language_model\.model\.embed_tokens\.", "embed_tokens."),
    (r"^language_model\.", "llm."),
)


def write_experiment_config(path: Path, *, backbone_dir: str, hidden_size: int) -> dict:
    """Write an exp_config.yaml like NeMo's salm_train.py saves; return its `model:` section."""
    model = {
        "pretrained_llm": backbone_dir,
        "pretrained_asr": "not-used-because-perception-has-the-encoder.nemo",
        "pretrained_weights": False,
        "audio_locator_tag": AUDIO_LOCATOR_TAG,
        "prompt_format": "qwen",
        "perception": {
            "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
            "output_dim": hidden_size,
            "preprocessor": DEMO_PREPROCESSOR,
            "encoder": DEMO_ENCODER,
            "modality_adapter": {
                "_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
                "d_model": DEMO_ENCODER["d_model"],
            },
        },
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4},
    }
    experiment = {
        "model": model,
        "trainer": {
            "devices": 2,
            "accelerator": "cpu",
            "strategy": {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"},
        },
    }
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return model


def random_salm_state_dict(backbone_config: dict, model_config: dict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the whole SALM model, under NeMo's state_dict names."""
    from speechlm_bridge.export.nemo_perception import (
        feature_extractor_config_from_nemo,
        parakeet_encoder_config_from_nemo,
        projector_config_from_nemo,
    )
    from speechlm_bridge.modeling.configuration import SpeechLMBridgeConfig
    from speechlm_bridge.modeling.feature_extraction import compute_mel_filters, compute_window
    from speechlm_bridge.modeling.modeling import SpeechLMBridgeForConditionalGeneration

    perception = model_config["perception"]
    torch.manual_seed(seed)
    config = SpeechLMBridgeConfig(
        text_config=dict(backbone_config),
        encoder_config=parakeet_encoder_config_from_nemo(perception["encoder"]),
        projector_config=projector_config_from_nemo(perception),
        audio_token_id=0,
    )
    model = SpeechLMBridgeForConditionalGeneration(config)
    ours = model.state_dict()

    nemo: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        for pattern, replacement in _TO_NEMO_NAMES:
            name = re.sub(pattern, replacement, name)
        nemo[name] = tensor.detach().clone()

    # NeMo keeps the featurizer's window and mel filterbank as buffers of the model.
    # The buffers do not exist yet; silence the converter's "assuming float32" warnings.
    converter_logger = logging.getLogger("speechlm_bridge.export.nemo_perception")
    level = converter_logger.level
    converter_logger.setLevel(logging.ERROR)
    try:
        extractor = feature_extractor_config_from_nemo(perception["preprocessor"], buffers={})
    finally:
        converter_logger.setLevel(level)
    nemo["perception.preprocessor.featurizer.window"] = compute_window(
        extractor["window_function"], win_length=extractor["win_length"]
    )
    nemo["perception.preprocessor.featurizer.fb"] = compute_mel_filters(
        sampling_rate=extractor["sampling_rate"],
        n_fft=extractor["n_fft"],
        feature_size=extractor["feature_size"],
        mel_min_frequency=extractor["mel_min_frequency"],
        mel_max_frequency=extractor["mel_max_frequency"],
        mel_norm=extractor["mel_norm"],
    ).unsqueeze(0)
    return nemo


def write_distributed_checkpoint(
    weights_file: Path, checkpoint_dir: Path, *, world_size: int = 2
) -> None:
    """Shard the weights in `weights_file` over `world_size` CPU ranks with FSDP2 and save them.

    Each rank takes one AdamW step on a tiny loss, so the checkpoint has optimizer state, and
    FSDP2 unties the input embedding and the LM head exactly as it does in real training.
    """
    import torch.multiprocessing as mp

    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rendezvous = checkpoint_dir.parent / ".rendezvous"
    rendezvous.unlink(missing_ok=True)
    # spawn, not fork: the parent has already run torch ops and owns a thread pool.
    mp.start_processes(
        _write_rank,
        args=(world_size, str(weights_file), str(checkpoint_dir), str(rendezvous)),
        nprocs=world_size,
        start_method="spawn",
    )
    rendezvous.unlink(missing_ok=True)


def _write_rank(rank: int, world_size: int, weights_file: str, checkpoint_dir: str, rendezvous: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    model = _module_from_state_dict(load_file(weights_file))
    mesh = init_device_mesh("cpu", (world_size,))
    # NeMo's SALM.configure_model shards the input embedding and the LM head separately.
    for child in (model.embed_tokens, model.llm.lm_head):
        fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = sum((parameter.float() ** 2).mean() for parameter in model.parameters())
    loss.backward()
    optimizer.step()

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"state_dict": model_state, "optimizer_0": optimizer_state}, checkpoint_id=checkpoint_dir)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without Python's interpreter teardown: gloo's background threads occasionally abort
    # it ("terminate called without an active exception", seen in 2 of 34 demo runs) after the
    # checkpoint is complete, which the parent would report as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Holder(torch.nn.Module):
    """An empty module that only has parameters and children under given names."""


def _module_from_state_dict(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    root = _Holder()
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        if tensor.is_floating_point() and "running_" not in leaf and leaf not in ("fb", "window"):
            module.register_parameter(leaf, torch.nn.Parameter(tensor))
        else:
            module.register_buffer(leaf, tensor)
    return root
