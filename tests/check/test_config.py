"""config.json findings: each case breaks one key of a real export."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechlm_bridge.check import check_export
from tests.check.conftest import DemoExport, broken_copy, build_demo_export, edit_json, findings, problem_codes


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoExport:
    return build_demo_export(tmp_path_factory.mktemp("config"))


def _set(key: str, value):
    def edit(config: dict) -> None:
        config[key] = value

    return edit


def _delete(*keys: str):
    def edit(config: dict) -> None:
        for key in keys:
            target = config
            *parents, last = key.split(".")
            for parent in parents:
                target = target[parent]
            target.pop(last, None)

    return edit


def _set_dtype(value: str):
    def edit(config: dict) -> None:
        config["dtype"] = value
        config["text_config"]["dtype"] = value

    return edit


def _untie_text_config_only(config: dict) -> None:
    config["text_config"]["tie_word_embeddings"] = False


# (case, edit of config.json, (code, file, key) expected, all error/warning codes, exit status)
CASES = [
    (
        "model-type-missing",
        _delete("model_type"),
        ("config-model-type-missing", "config.json", "model_type"),
        {"config-model-type-missing"},
        1,
    ),
    (
        "model-type-unknown",
        _set("model_type", "llava"),
        ("config-model-type-unknown", "config.json", "model_type"),
        {"config-model-type-unknown"},
        1,
    ),
    (
        "architectures-missing",
        _delete("architectures"),
        ("config-architectures-missing", "config.json", "architectures"),
        {"config-architectures-missing"},
        1,
    ),
    (
        "architectures-unknown",
        _set("architectures", ["Qwen3ForCausalLM"]),
        ("config-architectures-unknown", "config.json", "architectures"),
        {"config-architectures-unknown"},
        1,
    ),
    (
        "audio-token-id-missing",
        _delete("audio_token_id"),
        ("config-audio-token-id-missing", "config.json", "audio_token_id"),
        {"config-audio-token-id-missing"},
        1,
    ),
    (
        "audio-locator-tag-missing",
        _delete("audio_locator_tag"),
        ("config-audio-locator-tag-missing", "config.json", "audio_locator_tag"),
        {"config-audio-locator-tag-missing"},
        0,
    ),
    (
        "prompt-format-unknown",
        _set("prompt_format", "chatml-v9"),
        ("config-prompt-format-unknown", "config.json", "prompt_format"),
        {"config-prompt-format-unknown"},
        1,
    ),
    (
        "dtype-invalid",
        _set_dtype("int8"),
        ("config-dtype-invalid", "config.json", "dtype"),
        {"config-dtype-invalid", "model-build-failed"},
        1,
    ),
    (
        "dtype-missing",
        _delete("dtype", "text_config.dtype"),
        ("config-dtype-missing", "config.json", "dtype"),
        {"config-dtype-missing"},
        0,
    ),
    (
        "tie-mismatch",
        _untie_text_config_only,
        ("config-tie-word-embeddings-mismatch", "config.json", "tie_word_embeddings"),
        {"config-tie-word-embeddings-mismatch", "weights-lm-head-missing"},
        1,
    ),
    (
        "text-model-type-unknown",
        lambda config: config["text_config"].update(model_type="no-such-model"),
        ("config-invalid", "config.json", None),
        # AutoTokenizer builds the config too, and fails the same way.
        {"config-invalid", "tokenizer-load-failed"},
        1,
    ),
]


@pytest.mark.parametrize(
    ("edit", "expected", "codes", "status"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_config_broken(demo, tmp_path, run_check, edit, expected, codes, status):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / "config.json", edit)

    exit_status, report = run_check(export_dir)

    code, file, key = expected
    assert (file, key) in findings(report, code)
    assert problem_codes(report) == codes
    assert exit_status == status


def test_config_prompt_format_not_chat(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / "config.json", _set("prompt_format", "canary"))

    exit_status, report = run_check(export_dir)

    assert findings(report, "config-prompt-format-not-chat") == [("config.json", "prompt_format")]
    assert findings(report, "parity-skipped") == [("tokenizer_config.json", None)]
    assert problem_codes(report) == set()
    assert exit_status == 0


def test_config_dtype_differs_from_weights(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / "config.json", _set_dtype("bfloat16"))

    exit_status, report = run_check(export_dir)

    # One finding per stored dtype, keyed by the first tensor name in sorted order.
    assert findings(report, "weights-dtype-mismatch") == [
        ("model.safetensors", "audio_encoder.layers.0.conv.depthwise_conv.bias")
    ]
    message = _message(report, "weights-dtype-mismatch")
    assert "stored as float32 but config.json's dtype is bfloat16" in message
    assert problem_codes(report) == {"weights-dtype-mismatch"}
    assert exit_status == 1


@pytest.mark.parametrize(
    ("content", "code"),
    [(None, "file-missing"), ("{not json", "file-invalid-json"), ("[1, 2]", "file-invalid-json")],
    ids=["missing", "not-json", "not-object"],
)
def test_config_file_unreadable(demo, tmp_path, run_check, content, code):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    config_path = export_dir / "config.json"
    if content is None:
        config_path.unlink()
    else:
        config_path.write_text(content, encoding="utf-8")

    exit_status, report = run_check(export_dir)

    assert findings(report, code) == [("config.json", None)]
    assert exit_status == 1


def test_config_clean_export(demo):
    report = check_export(demo.export_dir, backbone=demo.backbone_dir)

    assert report.errors == []
    assert report.warnings == []
    assert report.ok


def test_config_missing_export_dir(tmp_path: Path, run_check):
    exit_status, report = run_check(tmp_path / "no-such-export")

    assert findings(report, "export-dir-missing") == [(None, None)]
    assert "does not exist" in report["findings"][0]["message"]
    assert exit_status == 1


def _message(report: dict, code: str) -> str:
    return next(finding["message"] for finding in report["findings"] if finding["code"] == code)
