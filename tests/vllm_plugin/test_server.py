"""`speechlm-bridge serve` starts vLLM's OpenAI server on 127.0.0.1; a chat request with a base64 wav."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from tests.vllm_plugin.conftest import (
    ENGINE_TIMEOUT_SECONDS,
    decode_wav,
    input_audio_part,
    require_vllm,
    vllm_env,
)
from tests.vllm_plugin.exports import export_demo_model

pytestmark = pytest.mark.slow

MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        return {"status": err.code, "body": json.loads(err.read() or b"{}")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_vllm()
    root = tmp_path_factory.mktemp("vllm-server")
    export_dir = export_demo_model(root / "demo")
    port = _free_port()

    env = vllm_env()
    # `serve` sets vLLM's CPU KV cache size itself. Without it, vLLM stops at start on a machine
    # with less free memory than it wants.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    log_path = root / "server.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "speechlm_bridge.cli", "serve", str(export_dir),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
         "--served-model-name", "demo"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )

    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(process, base, log_path)
        yield base, export_dir
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_until_healthy(process: subprocess.Popen, base: str, log_path) -> None:
    deadline = time.monotonic() + ENGINE_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {ENGINE_TIMEOUT_SECONDS} s waiting for {base}/health")
        time.sleep(2)


def _demo_wav() -> bytes:
    from importlib import resources

    return resources.files("speechlm_bridge.demo").joinpath("data/hello.wav").read_bytes()


def test_chat_completion_with_base64_wav(server):
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    import speechlm_bridge  # noqa: F401 - registers the auto classes

    base, export_dir = server
    wav = _demo_wav()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Transcribe the following: <|audio|>"}, input_audio_part(wav)]}]
    reply = _post(base + "/v1/chat/completions", {
        "model": "demo", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
        "return_token_ids": True, "chat_template_kwargs": {"enable_thinking": False},
    })
    assert "choices" in reply, reply

    processor = AutoProcessor.from_pretrained(export_dir)
    model = AutoModelForMultimodalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    audio, _ = decode_wav(wav)
    inputs = processor(messages=messages, audio=[audio])
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0, prompt_length:].tolist()

    # 32 audio tokens for the 2.56 s clip, in a 50-token prompt
    assert reply["usage"]["prompt_tokens"] == prompt_length == 50
    assert reply["choices"][0]["token_ids"] == expected
    assert reply["choices"][0]["message"]["content"] == processor.decode(expected, skip_special_tokens=True)


def test_audio_part_without_tag_is_a_client_error(server):
    base, _ = server
    messages = [{"role": "user", "content": [{"type": "text", "text": "Transcribe:"}, input_audio_part(_demo_wav())]}]
    reply = _post(base + "/v1/chat/completions", {"model": "demo", "messages": messages, "max_tokens": 4})
    assert reply["status"] == 400, reply
    assert "0 audio locator tag(s) '<|audio|>' but the request has 1 audio(s)" in json.dumps(reply["body"])
