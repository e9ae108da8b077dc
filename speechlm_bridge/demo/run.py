"""The demo: a tiny random speech LLM from a 2-rank training checkpoint to a transformers transcript."""

from __future__ import annotations

import shutil
import time
import wave
from importlib import resources
from pathlib import Path

import numpy as np

from speechlm_bridge.errors import SpeechLMBridgeError

DEMO_AUDIO = "hello.wav"
WORKDIR_MARKER = ".speechlm-bridge-demo"


def run_demo(workdir: str | Path, *, max_new_tokens: int = 12) -> str:
    """Run every step of the demo in `workdir` (replaced if present) and return the transcript."""
    from safetensors.torch import save_file

    from speechlm_bridge.demo.backbone import write_demo_backbone
    from speechlm_bridge.demo.training_run import (
        random_salm_state_dict,
        write_distributed_checkpoint,
        write_experiment_config,
    )
    from speechlm_bridge.export.pipeline import export_checkpoint

    workdir = Path(workdir).resolve()
    _prepare_workdir(workdir)
    started = time.monotonic()

    _step(1, f"writing a tiny Qwen3-style backbone (config + trained BPE tokenizer) to {workdir / 'backbone'}")
    backbone_config = write_demo_backbone(workdir / "backbone")

    _step(2, "writing the experiment config and random SALM weights in NeMo's names")
    config_path = workdir / "exp_config.yaml"
    model_config = write_experiment_config(config_path, backbone_dir="backbone", hidden_size=backbone_config["hidden_size"])
    initial = random_salm_state_dict(backbone_config, model_config)
    initial_file = workdir / "initial_weights.safetensors"
    save_file(initial, str(initial_file))
    print(f"    {len(initial)} tensors, {sum(t.numel() for t in initial.values()):,} parameters")

    checkpoint_dir = workdir / "checkpoints" / "step=1"
    _step(3, f"sharding them over 2 CPU ranks (FSDP2, gloo), one AdamW step, torch.distributed.checkpoint -> {checkpoint_dir}")
    write_distributed_checkpoint(initial_file, checkpoint_dir, world_size=2)
    files = sorted(path.name for path in checkpoint_dir.iterdir())
    print(f"    wrote {', '.join(files)}")

    export_dir = workdir / "export"
    _step(4, f"speechlm-bridge export {checkpoint_dir.relative_to(workdir)} --config exp_config.yaml --output export")
    result = export_checkpoint(checkpoint_dir, config=config_path, output=export_dir)
    print(
        f"    {result.tensors} tensors in {result.shards} safetensors file(s), audio token id "
        f"{result.audio_token_id}, {'tied' if result.tie_word_embeddings else 'untied'} embeddings"
    )
    for note in result.notes:
        print(f"    note: {note}")
    print(f"    files: {', '.join(sorted(path.name for path in export_dir.iterdir()))}")

    _step(5, "loading the export with transformers (AutoModelForMultimodalLM, AutoProcessor), offline")
    transcript = _transcribe(export_dir, max_new_tokens=max_new_tokens)
    print(f"    transcript ({max_new_tokens} greedy tokens from random weights): {transcript!r}")
    print(f"done in {time.monotonic() - started:.0f} s; files are in {workdir}")
    return transcript


def _transcribe(export_dir: Path, *, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    model = AutoModelForMultimodalLM.from_pretrained(str(export_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(export_dir))
    audio, sampling_rate = read_demo_audio()
    prompt = processor.render_prompt(
        [{"role": "user", "content": f"Transcribe the following: {processor.audio_token}"}]
    )
    inputs = processor(text=prompt, audio=audio, sampling_rate=sampling_rate)
    audio_tokens = int((inputs["input_ids"] == model.config.audio_token_id).sum())
    print(f"    audio: {len(audio) / sampling_rate:.2f} s -> {audio_tokens} audio tokens in a {inputs['input_ids'].shape[1]}-token prompt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new_tokens, skip_special_tokens=True)


def read_demo_audio() -> tuple[np.ndarray, int]:
    """Read the bundled 16 kHz mono clip ("Hello from speech L L M bridge.", espeak-ng)."""
    with resources.as_file(resources.files("speechlm_bridge.demo") / "data" / DEMO_AUDIO) as path:
        with wave.open(str(path), "rb") as clip:
            if clip.getsampwidth() != 2 or clip.getnchannels() != 1:
                raise SpeechLMBridgeError(f"{path} must be 16-bit mono PCM")
            frames = clip.readframes(clip.getnframes())
            sampling_rate = clip.getframerate()
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0, sampling_rate


def _prepare_workdir(workdir: Path) -> None:
    """Create `workdir`, replacing it only when an earlier demo made it (it has the marker file)."""
    cwd = Path.cwd().resolve()
    if workdir == cwd or workdir in cwd.parents:
        raise SpeechLMBridgeError(
            f"--workdir {workdir} is the working directory or contains it; pass a new directory "
            "for the demo's files, e.g. --workdir speechlm-bridge-demo"
        )
    if workdir.exists():
        if not workdir.is_dir():
            raise SpeechLMBridgeError(f"--workdir {workdir} is a file; pass a directory")
        if any(workdir.iterdir()) and not (workdir / WORKDIR_MARKER).is_file():
            raise SpeechLMBridgeError(
                f"--workdir {workdir} exists and was not made by the demo (no {WORKDIR_MARKER} file), so "
                "it is left alone; pass a new directory or remove it yourself."
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / WORKDIR_MARKER).write_text("made by `speechlm-bridge demo`; the next demo run replaces this directory\n")


def _step(number: int, text: str) -> None:
    print(f"[{number}/5] {text}", flush=True)
