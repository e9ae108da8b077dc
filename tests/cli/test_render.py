"""`speechlm-bridge render`: JSON lines, the human view, per-dialog errors and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm_bridge.cli import main
from tests.conftest import fixture_path

GOOD = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
MULTI = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao."},
    ],
    "kwargs": {"enable_thinking": False},
}
NO_ANSWER = [{"role": "user", "content": "Hi"}]


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def run_json(capsys, *argv: str) -> tuple[int, list[dict]]:
    status = main(["render", *argv, "--json"])
    out = capsys.readouterr().out
    return status, [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def qwen3_dir() -> Path:
    return fixture_path("backbones", "qwen3")


def test_render_json_fields(tmp_path, capsys, qwen3_dir):
    messages = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    status, records = run_json(
        capsys,
        "--tokenizer",
        str(qwen3_dir),
        "--messages",
        str(messages),
        "--enable-thinking",
        "false",
    )
    assert status == 0
    assert len(records) == 1
    record = records[0]
    assert set(record) == {
        "dialog_index",
        "input_ids",
        "loss_mask",
        "context_ids",
        "answer_ids",
        "spans",
        "audio_positions",
    }
    assert record["dialog_index"] == 0
    assert record["input_ids"] == record["context_ids"] + record["answer_ids"]
    # "Hello." and <|im_end|> after the closed empty think block of the generation prompt.
    assert record["answer_ids"] == [9707, 13, 151645]
    assert record["spans"] == [{"turn_index": 1, "start": 13, "end": 16}]
    assert record["loss_mask"] == [False] * 13 + [True] * 3


def test_render_loss_on_all_splits(tmp_path, capsys, qwen3_dir):
    messages = write_jsonl(tmp_path / "d.jsonl", [MULTI])
    status, records = run_json(
        capsys, "--tokenizer", str(qwen3_dir), "--messages", str(messages), "--loss-on", "all"
    )
    assert status == 0
    assert [record["spans"][0]["turn_index"] for record in records] == [1, 3]
    assert [record["dialog_index"] for record in records] == [0, 0]


def test_render_error_line_and_status(tmp_path, capsys, qwen3_dir):
    messages = tmp_path / "d.jsonl"
    messages.write_text(
        json.dumps(GOOD)
        + "\n"
        + json.dumps(NO_ANSWER)
        + "\n\nnot json\n"
        + json.dumps(GOOD)
        + "\n",
        encoding="utf-8",
    )
    status = main(["render", "--tokenizer", str(qwen3_dir), "--messages", str(messages), "--json"])
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert status == 1
    assert [record["dialog_index"] for record in records] == [0, 1, 3, 4]
    assert "no assistant message" in records[1]["error"]
    assert set(records[1]) == {"dialog_index", "error"}
    assert "line 4 is not valid JSON" in records[2]["error"]
    assert "input_ids" in records[3]
    assert "2 of 4 dialog(s) could not be encoded exactly" in captured.err


def test_render_human_marks_spans(tmp_path, capsys, qwen3_dir):
    messages = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    status = main(["render", "--tokenizer", str(qwen3_dir), "--messages", str(messages)])
    out = capsys.readouterr().out
    assert status == 0
    assert "dialog 0, sample 1/1: 16 tokens, 7 in loss spans (turn 1 [9:16])" in out
    assert "<|im_start|>assistant\n⟦<think>\n\n</think>\n\nHello.<|im_end|>⟧" in out


def test_render_export_dir_audio(tmp_path, capsys):
    export_dir = fixture_path("nemo-salm", "to_hf", "from_ckpt")
    dialog = [
        {"role": "user", "content": [{"type": "text", "text": "Transcribe:"}, {"type": "audio"}]},
        {"role": "assistant", "content": "hello world"},
    ]
    messages = write_jsonl(tmp_path / "d.jsonl", [dialog])
    status, records = run_json(
        capsys,
        "--tokenizer",
        str(export_dir),
        "--messages",
        str(messages),
        "--enable-thinking",
        "false",
    )
    assert status == 0
    ids = records[0]["input_ids"]
    assert records[0]["audio_positions"] == [ids.index(151669)]


def test_render_missing_file(tmp_path, capsys, qwen3_dir):
    status = main(
        ["render", "--tokenizer", str(qwen3_dir), "--messages", str(tmp_path / "none.jsonl")]
    )
    assert status == 1
    assert "messages file" in capsys.readouterr().err


def test_render_bad_enable_thinking(qwen3_dir):
    with pytest.raises(SystemExit):
        main(
            [
                "render",
                "--tokenizer",
                str(qwen3_dir),
                "--messages",
                "x",
                "--enable-thinking",
                "maybe",
            ]
        )


@pytest.mark.slow
def test_render_console_script(tmp_path, qwen3_dir):
    messages = write_jsonl(tmp_path / "d.jsonl", [GOOD, NO_ANSWER])
    script = Path(sys.executable).parent / "speechlm-bridge"
    if not script.exists():
        pytest.skip(f"console script {script} not installed; run `pip install -e .` in this venv")
    result = subprocess.run(
        [
            str(script),
            "render",
            "--tokenizer",
            str(qwen3_dir),
            "--messages",
            str(messages),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["dialog_index"] for record in records] == [0, 1]
    assert records[0]["answer_ids"][-1] == 151645


def test_render_unknown_dialog_key(tmp_path, capsys, qwen3_dir):
    messages = write_jsonl(tmp_path / "d.jsonl", [{"messages": GOOD, "kwarg": {"enable_thinking": False}}])
    status, records = run_json(capsys, "--tokenizer", str(qwen3_dir), "--messages", str(messages))
    assert status == 1
    assert records[0]["dialog_index"] == 0
    assert "unknown key(s) ['kwarg']" in records[0]["error"]


def test_render_empty_file(tmp_path, capsys, qwen3_dir):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    status = main(["render", "--tokenizer", str(qwen3_dir), "--messages", str(tmp_path / "empty.jsonl")])
    assert status == 1
    assert "has no dialogs" in capsys.readouterr().err


def test_verbose_after_subcommand(tmp_path, capsys, qwen3_dir):
    messages = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    status = main(["render", "-v", "--tokenizer", str(qwen3_dir), "--messages", str(messages), "--json"])
    assert status == 0


def test_render_backbone_with_audio_tag(tmp_path, capsys, qwen3_dir):
    dialog = [{"role": "user", "content": "Transcribe: <|audio|>"}, {"role": "assistant", "content": "hi"}]
    messages = write_jsonl(tmp_path / "d.jsonl", [dialog])
    status, records = run_json(capsys, "--tokenizer", str(qwen3_dir), "--messages", str(messages))
    assert status == 0
    assert records[0]["audio_positions"] == []

    status, records = run_json(
        capsys, "--tokenizer", str(qwen3_dir), "--messages", str(messages), "--audio-locator-tag", "<|audio|>"
    )
    assert status == 0
    positions = records[0]["audio_positions"]
    assert len(positions) == 1
    assert records[0]["input_ids"][positions[0]] == 151669


def test_render_warns_without_audio_tag(tmp_path, capsys, qwen3_dir):
    dialog = [{"role": "user", "content": "Transcribe: <|audio|>"}, {"role": "assistant", "content": "hi"}]
    messages = write_jsonl(tmp_path / "d.jsonl", [dialog])
    main(["render", "--tokenizer", str(qwen3_dir), "--messages", str(messages), "--json"])
    assert "has no audio locator tag" in capsys.readouterr().err


def test_render_messages_directory(tmp_path, capsys, qwen3_dir):
    status = main(["render", "--tokenizer", str(qwen3_dir), "--messages", str(tmp_path)])
    assert status == 1
    assert "is a directory" in capsys.readouterr().err


def test_unused_template_kwarg_warns(tmp_path, qwen3_dir, caplog):
    messages = write_jsonl(tmp_path / "d.jsonl", [{"messages": GOOD, "kwargs": {"enable_thinkin": False}}])
    with caplog.at_level("WARNING", logger="speechlm_bridge.prompts.rendering"):
        assert main(["render", "--tokenizer", str(qwen3_dir), "--messages", str(messages), "--json"]) == 0
    assert "'enable_thinkin' is not read by this chat template" in caplog.text
