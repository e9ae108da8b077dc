"""The exported tokenizer loads in a transformers 4.x environment (vLLM-era loaders) as in 5.x."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from transformers import AutoTokenizer

from speechlm_bridge.export.tokenizer import export_tokenizer

TAG = "<|audio|>"
PYTHON_VARIABLE = "SPEECHLM_BRIDGE_TRANSFORMERS4_PYTHON"
DIALOG = [
    {"role": "system", "content": "You are a helpful transcriber."},
    {"role": "user", "content": f"Transcribe the following: {TAG}"},
]

_PROBE = textwrap.dedent(
    """
    import json, sys, transformers
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    dialog = json.loads(sys.argv[2])
    prompt = tokenizer.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    print(json.dumps({
        "version": transformers.__version__,
        "class": type(tokenizer).__name__,
        "prompt": prompt,
        "ids": tokenizer.encode(prompt, add_special_tokens=False),
        "audio_token": getattr(tokenizer, "audio_token", None),
        "special": sorted(tokenizer.all_special_tokens),
    }))
    """
)


def test_transformers4_loads_export(backbones_dir, tmp_path):
    python = os.environ.get(PYTHON_VARIABLE)
    if not python:
        pytest.skip(f"set {PYTHON_VARIABLE} to a Python with transformers 4.x (.ci/run creates one)")
    export_tokenizer(backbones_dir / "qwen3", tmp_path, audio_locator_tag=TAG)

    result = subprocess.run(
        [python, "-c", _PROBE, str(tmp_path), json.dumps(DIALOG)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    old = json.loads(result.stdout.strip().splitlines()[-1])

    current = AutoTokenizer.from_pretrained(tmp_path)
    prompt = current.apply_chat_template(DIALOG, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert old["version"].startswith("4.")
    assert old["class"] == "Qwen2TokenizerFast"
    assert old["prompt"] == prompt
    assert old["ids"] == current.encode(prompt, add_special_tokens=False)
    assert old["ids"].count(151669) == 1
    assert old["audio_token"] == TAG
    assert TAG in old["special"]
    assert "<|im_end|>" in old["special"]
