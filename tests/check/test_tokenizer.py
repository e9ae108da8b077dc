"""Tokenizer, chat template, audio tag and generation findings: each case breaks one file of a real export."""

from __future__ import annotations

import json

import pytest

from tests.check.conftest import DemoExport, broken_copy, build_demo_export, edit_json, findings, problem_codes

AUDIO_TAG = "<|audio|>"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoExport:
    return build_demo_export(tmp_path_factory.mktemp("tokenizer"))


def _tokenizer_config(edit):
    return "tokenizer_config.json", edit


def _set(key: str, value):
    def edit(document: dict) -> None:
        document[key] = value

    return edit


def _delete(key: str):
    def edit(document: dict) -> None:
        document.pop(key, None)

    return edit


def _drop_audio_tag(tokenizer: dict) -> None:
    tokenizer["added_tokens"] = [token for token in tokenizer["added_tokens"] if token["content"] != AUDIO_TAG]


def _im_end_id(demo: DemoExport) -> int:
    tokenizer = json.loads((demo.export_dir / "tokenizer.json").read_text())
    return next(token["id"] for token in tokenizer["added_tokens"] if token["content"] == "<|im_end|>")


# (case, file, edit, (code, file, key) expected, all error/warning codes, exit status)
CASES = [
    (
        "class-unknown",
        "tokenizer_config.json",
        _set("tokenizer_class", "NoSuchTokenizer"),
        ("tokenizer-class-unknown", "tokenizer_config.json", "tokenizer_class"),
        {"tokenizer-class-unknown"},
        1,
    ),
    (
        "class-not-portable",
        "tokenizer_config.json",
        _set("tokenizer_class", "TokenizersBackend"),
        ("tokenizer-class-not-portable", "tokenizer_config.json", "tokenizer_class"),
        {"tokenizer-class-not-portable"},
        0,
    ),
    (
        "class-missing",
        "tokenizer_config.json",
        _delete("tokenizer_class"),
        ("tokenizer-class-missing", "tokenizer_config.json", "tokenizer_class"),
        {"tokenizer-class-missing"},
        0,
    ),
    (
        "extra-special-tokens-list",
        "tokenizer_config.json",
        _set("extra_special_tokens", [AUDIO_TAG]),
        ("tokenizer-extra-special-tokens-not-dict", "tokenizer_config.json", "extra_special_tokens"),
        {"tokenizer-extra-special-tokens-not-dict"},
        1,
    ),
    (
        "named-audio-token-differs",
        "tokenizer_config.json",
        _set("extra_special_tokens", {"audio_token": "<|im_start|>"}),
        ("audio-tag-mismatch", "tokenizer_config.json", "extra_special_tokens.audio_token"),
        {"audio-tag-mismatch"},
        1,
    ),
    (
        "processor-audio-token-differs",
        "processor_config.json",
        _set("audio_token", "<|sound|>"),
        ("audio-tag-mismatch", "processor_config.json", "audio_token"),
        {"audio-tag-mismatch"},
        1,
    ),
    (
        "chat-template-missing",
        "tokenizer_config.json",
        _delete("chat_template"),
        ("chat-template-missing", "tokenizer_config.json", "chat_template"),
        {"chat-template-missing"},
        1,
    ),
    (
        "chat-template-empty",
        "tokenizer_config.json",
        _set("chat_template", "  \n"),
        ("chat-template-empty", "tokenizer_config.json", "chat_template"),
        # A blank template still renders, but ends no turn with a special token and renders no dialog.
        {"chat-template-empty", "end-of-turn-unknown", "parity-dialog-failed"},
        1,
    ),
    (
        "split-special-tokens",
        "tokenizer_config.json",
        _set("split_special_tokens", True),
        ("audio-tag-not-single-token", "tokenizer_config.json", AUDIO_TAG),
        # Split special tokens also hide the end-of-turn token and stop the training formatter.
        {"audio-tag-not-single-token", "end-of-turn-unknown", "parity-formatter-failed"},
        1,
    ),
    (
        "audio-token-id-differs",
        "config.json",
        _set("audio_token_id", 5),
        ("audio-token-id-mismatch", "config.json", "audio_token_id"),
        {"audio-token-id-mismatch"},
        1,
    ),
    (
        "generation-eos-null",
        "generation_config.json",
        _set("eos_token_id", None),
        ("generation-eos-missing", "generation_config.json", "eos_token_id"),
        {"generation-eos-missing"},
        1,
    ),
    (
        "generation-eos-without-end-of-turn",
        "generation_config.json",
        _set("eos_token_id", [0]),
        ("generation-eos-missing-end-of-turn", "generation_config.json", "eos_token_id"),
        {"generation-eos-missing-end-of-turn"},
        1,
    ),
]


@pytest.mark.parametrize(
    ("file_name", "edit", "expected", "codes", "status"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_tokenizer_broken(demo, tmp_path, run_check, file_name, edit, expected, codes, status):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / file_name, edit)

    exit_status, report = run_check(export_dir)

    code, file, key = expected
    assert (file, key) in findings(report, code)
    assert problem_codes(report) == codes
    assert exit_status == status


def test_tokenizer_audio_tag_not_added(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / "tokenizer.json", _drop_audio_tag)
    # transformers re-adds named special tokens from tokenizer_config.json, so drop it there too.
    edit_json(export_dir / "tokenizer_config.json", _delete("extra_special_tokens"))

    exit_status, report = run_check(export_dir)

    assert findings(report, "audio-tag-not-in-tokenizer") == [("tokenizer.json", AUDIO_TAG)]
    # The training formatter registers the tag as one token; serving splits it into pieces.
    assert findings(report, "parity-context-mismatch") == [("tokenizer_config.json", "audio")]
    assert problem_codes(report) == {"audio-tag-not-in-tokenizer", "parity-context-mismatch"}
    assert exit_status == 1


def test_tokenizer_eos_message_names_end_of_turn(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / "generation_config.json", _set("eos_token_id", [0]))

    _, report = run_check(export_dir)

    finding = next(f for f in report["findings"] if f["code"] == "generation-eos-missing-end-of-turn")
    assert f"does not include {_im_end_id(demo)} ('<|im_end|>')" in finding["message"]
    assert finding["fix"] == f"add {_im_end_id(demo)} to eos_token_id"


def test_tokenizer_jinja_disagrees_with_inline(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    inline = json.loads((export_dir / "tokenizer_config.json").read_text())["chat_template"]
    # A Jinja comment renders as nothing: the copies differ, but every dialog renders alike.
    (export_dir / "chat_template.jinja").write_text(inline + "{# local edit #}", encoding="utf-8")

    exit_status, report = run_check(export_dir)

    assert findings(report, "chat-template-files-disagree") == [("chat_template.jinja", "chat_template")]
    assert problem_codes(report) == {"chat-template-files-disagree"}
    assert exit_status == 1


def test_tokenizer_jinja_equal_to_inline(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    inline = json.loads((export_dir / "tokenizer_config.json").read_text())["chat_template"]
    (export_dir / "chat_template.jinja").write_text(inline, encoding="utf-8")

    exit_status, report = run_check(export_dir, "--backbone", str(demo.backbone_dir))

    assert problem_codes(report) == set()
    assert exit_status == 0


def test_tokenizer_template_differs_from_backbone(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(
        export_dir / "tokenizer_config.json",
        lambda config: config.update(chat_template=config["chat_template"] + "{# local edit #}"),
    )

    clean_status, clean_report = run_check(export_dir)
    exit_status, report = run_check(export_dir, "--backbone", str(demo.backbone_dir))

    assert clean_status == 0
    assert problem_codes(clean_report) == set()
    assert findings(report, "chat-template-differs-from-backbone") == [("tokenizer_config.json", "chat_template")]
    finding = next(f for f in report["findings"] if f["code"] == "chat-template-differs-from-backbone")
    template_length = len(json.loads((demo.backbone_dir / "tokenizer_config.json").read_text())["chat_template"])
    assert f"from character {template_length}" in finding["message"]
    assert problem_codes(report) == {"chat-template-differs-from-backbone"}
    assert exit_status == 1


def test_tokenizer_backbone_not_found(demo, tmp_path, run_check):
    exit_status, report = run_check(demo.export_dir, "--backbone", str(tmp_path / "missing"))

    assert findings(report, "backbone-not-found") == [(None, None)]
    assert exit_status == 1


def test_tokenizer_backbone_without_template(demo, tmp_path, run_check):
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "tokenizer_config.json").write_text("{}", encoding="utf-8")

    exit_status, report = run_check(demo.export_dir, "--backbone", str(backbone))

    assert findings(report, "backbone-chat-template-missing") == [(None, None)]
    assert exit_status == 0


def test_tokenizer_json_corrupt(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    (export_dir / "tokenizer.json").write_text('{"version": "1.0", "model": 7}', encoding="utf-8")

    exit_status, report = run_check(export_dir)

    assert findings(report, "tokenizer-load-failed") == [("tokenizer_config.json", None)]
    assert findings(report, "parity-skipped") == [("tokenizer_config.json", None)]
    assert exit_status == 1


def test_tokenizer_generation_config_missing(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    (export_dir / "generation_config.json").unlink()

    exit_status, report = run_check(export_dir)

    assert findings(report, "file-missing") == [("generation_config.json", None)]
    assert problem_codes(report) == {"file-missing"}
    assert exit_status == 0


@pytest.mark.parametrize("file_name", ["processor_config.json", "preprocessor_config.json", "tokenizer_config.json"])
def test_tokenizer_required_file_missing(demo, tmp_path, run_check, file_name):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    (export_dir / file_name).unlink()

    exit_status, report = run_check(export_dir)

    assert ("error", file_name) in [(f["severity"], f["file"]) for f in report["findings"] if f["code"] == "file-missing"]
    assert exit_status == 1


def test_tokenizer_jinja_not_utf8(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    (export_dir / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")

    exit_status, report = run_check(export_dir)

    assert ("chat_template.jinja", None) in findings(report, "file-unreadable")
    assert exit_status == 1


def test_tokenizer_json_missing_is_one_clear_error(demo, tmp_path, run_check):
    # Without tokenizer.json transformers builds a tiny tokenizer from tokenizer_config.json, and
    # the checks on it would suggest harmful fixes (another audio_token_id, another eos id).
    export_dir = broken_copy(demo.export_dir, tmp_path)
    (export_dir / "tokenizer.json").unlink()

    exit_status, report = run_check(export_dir)

    assert findings(report, "file-missing") == [("tokenizer.json", None)]
    assert "audio-token-id-mismatch" not in problem_codes(report)
    assert "generation-eos-missing-end-of-turn" not in problem_codes(report)
    assert exit_status == 1
