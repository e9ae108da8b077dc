"""vLLM (with the plugin) against transformers and the training formatter, on real exports.

One vLLM engine per export runs every request, and the comparisons run here.
(a) The prompt ids vLLM builds from chat messages + audio equal the transformers processor's ids.
    They also equal the training formatter's context ids with each audio tag expanded.
(b) Greedy generation of 16 tokens is identical in fp32. The chosen tokens' logprobs agree up to
    float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import fixture_path
from tests.vllm_plugin.conftest import (
    decode_wav,
    input_audio_part,
    require_vllm,
    run_vllm_requests,
    wav_bytes,
)
from tests.vllm_plugin.exports import export_demo_model, export_nemo_fixture

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
TAG = "<|audio|>"


def _golden_audio() -> np.ndarray:
    from safetensors.torch import load_file

    golden = load_file(str(fixture_path("nemo-salm", "golden", "golden_outputs.safetensors")))
    return golden["audio"][0].numpy()


def _demo_audio_bytes() -> bytes:
    from importlib import resources

    return resources.files("speechlm_bridge.demo").joinpath("data/hello.wav").read_bytes()


def _user(text: str, *audios: bytes) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, *map(input_audio_part, audios)]}


def _nemo_cases(audio: bytes, short_audio: bytes) -> list[dict]:
    system = {"role": "system", "content": "You are a helpful transcriber."}
    return [
        {"name": "golden, thinking off", "messages": [system, _user(f"Transcribe the following: {TAG}", audio)],
         "chat_template_kwargs": {"enable_thinking": False}},
        {"name": "golden, thinking on", "messages": [system, _user(f"Transcribe the following: {TAG}", audio)],
         "chat_template_kwargs": {"enable_thinking": True}},
        {"name": "two turns, two audios", "messages": [
            _user(f"Transcribe the following: {TAG}", audio),
            {"role": "assistant", "content": "a tone"},
            _user(f"And this one? {TAG}", short_audio),
        ], "chat_template_kwargs": {"enable_thinking": False}},
        {"name": "two audios in one message", "messages": [_user(f"Compare {TAG} with {TAG}", audio, short_audio)],
         "chat_template_kwargs": {}},
    ]


def _demo_cases(audio: bytes) -> list[dict]:
    return [
        {"name": "demo transcribe", "messages": [_user(f"Transcribe the following: {TAG}", audio)]},
        {"name": "demo with system prompt", "messages": [
            {"role": "system", "content": "Answer briefly."},
            _user(f"What is said here: {TAG}", audio),
        ]},
    ]


def _resampling_cases(audio: bytes) -> list[dict]:
    """The demo clip at 8 kHz mono and at 16 kHz stereo: vLLM resamples and downmixes them.

    `audios` is what transformers gets: the clip resampled as `librosa.load(sr=16000)` does (soxr,
    high quality), and the mean of the two channels.
    """
    import librosa

    samples, rate = decode_wav(audio)
    slow_wav = wav_bytes(samples[::2], rate // 2)
    slow, _ = decode_wav(slow_wav)
    stereo_wav = wav_bytes(np.stack([samples, samples * 0.5], axis=1), rate)
    stereo, _ = decode_wav(stereo_wav)
    return [
        {"name": "8 kHz", "messages": [_user(f"Transcribe: {TAG}", slow_wav)],
         "audios": [librosa.resample(slow, orig_sr=rate // 2, target_sr=rate, res_type="soxr_hq")]},
        {"name": "stereo", "messages": [_user(f"Transcribe: {TAG}", stereo_wav)],
         "audios": [stereo.mean(axis=1)]},
    ]


def _run(export_dir: Path, cases: list[dict], workdir: Path, **options) -> list[tuple[dict, dict]]:
    """Run `cases`, then a request vLLM must reject: an audio part without the tag in the text."""
    audio_part = cases[0]["messages"][-1]["content"][1]
    cases = cases + [{"name": "no tag", "messages": [_user_parts("Transcribe:", audio_part)]}]
    requests = [
        {"messages": case["messages"], "chat_template_kwargs": case.get("chat_template_kwargs"), "max_tokens": MAX_TOKENS}
        for case in cases
    ]
    results = run_vllm_requests(export_dir, requests, workdir, **options)
    return list(zip(cases, results))


def _user_parts(text: str, *parts: dict) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, *parts]}


@pytest.fixture(scope="module")
def nemo_run(tmp_path_factory, nemo_salm_dir):
    require_vllm()
    root = tmp_path_factory.mktemp("vllm-nemo")
    export_dir = export_nemo_fixture(nemo_salm_dir, root / "export")
    audio = wav_bytes(_golden_audio(), 16000)
    short_audio = wav_bytes(_golden_audio()[:9000], 16000)
    return export_dir, _run(export_dir, _nemo_cases(audio, short_audio), root)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    require_vllm()
    root = tmp_path_factory.mktemp("vllm-demo")
    export_dir = export_demo_model(root / "demo")
    audio = _demo_audio_bytes()
    runs = _run(export_dir, _demo_cases(audio) + _resampling_cases(audio), root)
    # The rejected request stays last.
    return export_dir, [run for run in runs if "audios" not in run[0]], [run for run in runs if "audios" in run[0]]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    require_vllm()
    root = tmp_path_factory.mktemp("vllm-llama")
    export_dir = export_demo_model(root / "llama", seed=1, llama=True)
    samples, rate = decode_wav(_demo_audio_bytes())
    # This server accepts 2 s of audio: the 1.5 s cut is served, the whole 2.56 s clip is not.
    cases = _demo_cases(wav_bytes(samples[: rate * 3 // 2], rate))[:1]
    cases.append({"name": "too long", "messages": [_user(f"Transcribe: {TAG}", _demo_audio_bytes())], "rejected": True})
    runs = _run(export_dir, cases, root, hf_overrides={"max_audio_seconds": 2.0})
    # The request without a tag stays last.
    return export_dir, [run for run in runs if not run[0].get("rejected")], [run for run in runs if run[0].get("rejected")]


@pytest.fixture(scope="module")
def transformers_models():
    loaded = {}

    def load(export_dir: Path):
        from transformers import AutoModelForMultimodalLM, AutoProcessor

        import speechlm_bridge  # noqa: F401 - registers the auto classes

        if export_dir not in loaded:
            model = AutoModelForMultimodalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
            loaded[export_dir] = (model, AutoProcessor.from_pretrained(export_dir))
        return loaded[export_dir]

    return load


def _audios(messages: list[dict]) -> list[np.ndarray]:
    import base64

    arrays = []
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "input_audio":
                audio, sampling_rate = decode_wav(base64.b64decode(part["input_audio"]["data"]))
                assert sampling_rate == 16000
                arrays.append(audio)
    return arrays


def _check_case(export_dir, case, result, transformers_models):
    from speechlm_bridge.prompts import ChatFormatter

    assert "error" not in result, f"{case['name']}: {result.get('error')}"
    model, processor = transformers_models(export_dir)
    kwargs = case.get("chat_template_kwargs") or {}
    audios = case.get("audios") or _audios(case["messages"])

    # (a) prompt ids: vLLM == transformers processor == training formatter (tags expanded)
    inputs = processor(messages=case["messages"], audio=audios, template_kwargs=kwargs)
    processor_ids = inputs["input_ids"][0].tolist()
    formatter = ChatFormatter.from_pretrained(export_dir)
    dialog = case["messages"] + [{"role": "assistant", "content": "ok"}]
    context_ids = formatter.encode(dialog, loss_on="last", audios_count=len(audios), **kwargs)[-1].context_ids
    frames = iter(processor.audio_frame_count(len(audio)) for audio in audios)
    expanded = []
    for token in context_ids:
        expanded += [token] * next(frames) if token == processor.audio_token_id else [token]
    assert result["prompt_token_ids"] == processor_ids, case["name"]
    assert expanded == processor_ids, case["name"]
    assert processor_ids.count(processor.audio_token_id) == sum(processor.audio_frame_count(len(a)) for a in audios)

    # (b) greedy generation and the chosen tokens' logprobs
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    new_ids = generated.sequences[0, len(processor_ids):].tolist()
    assert result["token_ids"] == new_ids, case["name"]
    logprobs = [torch.log_softmax(scores[0].float(), -1)[token].item() for scores, token in zip(generated.scores, new_ids)]
    np.testing.assert_allclose(result["logprobs"], logprobs, atol=2e-3, err_msg=case["name"])
    return new_ids


def test_nemo_fixture_parity(nemo_run, transformers_models):
    export_dir, runs = nemo_run
    outputs = {case["name"]: _check_case(export_dir, case, result, transformers_models) for case, result in runs[:-1]}
    assert len(outputs["golden, thinking off"]) == MAX_TOKENS


def test_nemo_fixture_matches_golden_prompt(nemo_run):
    golden = json.loads(fixture_path("nemo-salm", "golden", "golden_inputs.json").read_text())
    _, runs = nemo_run
    case, result = runs[0]
    # NeMo keeps one placeholder; vLLM expands it to the 19 frames of the 1.5 s golden audio.
    expected = []
    for token in golden["prompt_input_ids"]:
        expected += [token] * golden["num_audio_frames"] if token == golden["audio_locator_tag_id"] else [token]
    assert result["prompt_token_ids"] == expected


def test_nemo_fixture_thinking_changes_prompt(nemo_run):
    _, runs = nemo_run
    off, on = runs[0][1]["prompt_token_ids"], runs[1][1]["prompt_token_ids"]
    assert len(off) == len(on) + 4  # "<think>\n\n</think>\n\n" is 4 tokens in Qwen3


def test_demo_model_parity(demo_run, transformers_models):
    export_dir, runs, _ = demo_run
    outputs = [_check_case(export_dir, case, result, transformers_models) for case, result in runs[:-1]]
    # The comparison is only worth something if the model does not repeat one token.
    assert all(len(set(ids)) > 3 for ids in outputs), outputs


def test_llama_backbone_parity(llama_run, transformers_models):
    export_dir, runs, _ = llama_run
    config = json.loads((export_dir / "config.json").read_text())
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]
    outputs = [_check_case(export_dir, case, result, transformers_models) for case, result in runs[:-1]]
    assert all(len(set(ids)) > 3 for ids in outputs), outputs


def test_audio_over_limit_is_refused(llama_run):
    _, _, runs = llama_run
    case, result = runs[0]
    assert "error" in result
    assert "audio 0 is 2.6 s long, over this server's limit of 2.0 s" in result["error"]


def test_audio_resampled_and_downmixed(demo_run, transformers_models):
    export_dir, _, runs = demo_run
    for case, result in runs:
        _check_case(export_dir, case, result, transformers_models)


@pytest.mark.parametrize("run", ["nemo_run", "demo_run", "llama_run"])
def test_audio_without_tag_is_refused(run, request):
    runs = request.getfixturevalue(run)[1]
    case, result = runs[-1]
    assert "error" in result
    assert "0 audio locator tag(s) '<|audio|>' but the request has 1 audio(s)" in result["error"]
