"""Exports the vLLM tests serve: the NeMo fixture's Lightning checkpoint, and the demo model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# A random model at the demo's init scale predicts the same token at every step, which would
# make a generation comparison trivial. Spreading the language model's weights gives varied
# greedy outputs, and a projector this wide makes the audio change them.
DEMO_WEIGHT_STD = 0.35


# The demo backbone as another architecture of vLLM's registry: Llama has the same layout
# without Qwen3's query/key norms.
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False}


def export_demo_model(workdir: Path, *, seed: int = 0, llama: bool = False) -> Path:
    """Write the demo backbone and random SALM weights in NeMo's names, export them, return the export.

    With `llama`, the backbone is a Llama model instead of the demo's Qwen3.
    """
    import json

    from safetensors.torch import save_file

    from speechlm_bridge.demo.backbone import write_demo_backbone
    from speechlm_bridge.demo.training_run import random_salm_state_dict, write_experiment_config
    from speechlm_bridge.export.pipeline import export_checkpoint

    backbone_config = write_demo_backbone(workdir / "backbone")
    if llama:
        backbone_config.update(LLAMA_CONFIG)
        (workdir / "backbone" / "config.json").write_text(json.dumps(backbone_config, indent=2))
    config_path = workdir / "exp_config.yaml"
    model_config = write_experiment_config(config_path, backbone_dir="backbone", hidden_size=backbone_config["hidden_size"])
    weights = random_salm_state_dict(backbone_config, model_config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        is_matrix = tensor.ndim == 2 and tensor.is_floating_point()
        if is_matrix and (name.startswith("llm.") or name.startswith("embed_tokens") or "proj" in name):
            weights[name] = torch.randn(tensor.shape, generator=generator) * DEMO_WEIGHT_STD
    weights_file = workdir / "weights.safetensors"
    save_file(weights, str(weights_file))
    export_checkpoint(weights_file, config=config_path, output=workdir / "export", dtype="float32")
    return workdir / "export"


def export_nemo_fixture(nemo_dir: Path, output: Path) -> Path:
    """Export the NeMo fixture's Lightning checkpoint in float32, as the golden outputs were computed."""
    from speechlm_bridge.export.pipeline import export_checkpoint

    previous = Path.cwd()
    # NeMo's config names the backbone and ASR model relative to the fixture folder.
    os.chdir(nemo_dir)
    try:
        export_checkpoint("lightning/step=2.ckpt", config="exp_config.yaml", output=output, dtype="float32")
    finally:
        os.chdir(previous)
    return output
