"""Parity of training and serving context ids, on the NeMo fixture's Qwen3 export and the demo's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from speechlm_bridge.check import check_export
from speechlm_bridge.check.parity import ContextPair, canonical_dialogs, compare_context
from speechlm_bridge.demo.backbone import DEMO_CHAT_TEMPLATE
from speechlm_bridge.prompts import ChatFormatter
from tests.check.conftest import DemoExport, broken_copy, build_demo_export, edit_json, findings, problem_codes

AUDIO_TAG = "<|audio|>"
DIALOG_NAMES = ["plain", "system-prompt", "multi-turn", "reasoning-on", "reasoning-off", "audio"]
# The demo template with the system role rejected, as Gemma's and Mistral's templates do.
NO_SYSTEM_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{%- endif %}"
    + DEMO_CHAT_TEMPLATE
)


@pytest.fixture(scope="module")
def nemo_exports(tmp_path_factory, nemo_salm_dir) -> dict[str, Path]:
    """The NeMo fixture's checkpoints exported (real Qwen3 tokenizer and template).

    `lightning` has tied embeddings in one file; `dcp` (FSDP2) an untied lm_head in 1 MB shards.
    """
    from speechlm_bridge.export.pipeline import export_checkpoint

    root = tmp_path_factory.mktemp("parity")
    previous = Path.cwd()
    # NeMo's configs name the backbone and ASR model relative to the fixture folder.
    os.chdir(nemo_salm_dir)
    try:
        export_checkpoint("lightning/step=2.ckpt", config="exp_config.yaml", output=root / "lightning")
        export_checkpoint("dcp/step=2", config="exp_config_fsdp2.yaml", output=root / "dcp", max_shard_size="1MB")
    finally:
        os.chdir(previous)
    return {"lightning": root / "lightning", "dcp": root / "dcp"}


@pytest.fixture(scope="module")
def qwen3_export(nemo_exports) -> Path:
    return nemo_exports["lightning"]


@pytest.fixture(scope="module")
def qwen3_sides(qwen3_export) -> tuple[ChatFormatter, object]:
    """The training formatter and the serving tokenizer of the Qwen3 export."""
    return ChatFormatter.from_pretrained(qwen3_export), AutoTokenizer.from_pretrained(qwen3_export)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoExport:
    return build_demo_export(tmp_path_factory.mktemp("parity-demo"))


@pytest.mark.parametrize("name", ["lightning", "dcp"])
def test_parity_nemo_export_clean(nemo_exports, nemo_salm_dir, name):
    report = check_export(nemo_exports[name], backbone=nemo_salm_dir / "backbone" / "tiny-qwen3")

    assert report.errors == []
    assert report.warnings == []
    # The Qwen3 template expresses every canonical dialog, reasoning on and off included.
    assert report.infos == []


def test_parity_dcp_export_is_untied_and_sharded(nemo_exports):
    config = json.loads((nemo_exports["dcp"] / "config.json").read_text())
    weight_map = json.loads((nemo_exports["dcp"] / "model.safetensors.index.json").read_text())["weight_map"]

    assert config["text_config"]["tie_word_embeddings"] is False
    assert "language_model.lm_head.weight" in weight_map
    assert len(set(weight_map.values())) > 1


def test_parity_qwen3_reasoning_context(qwen3_sides):
    formatter, tokenizer = qwen3_sides
    dialogs = {dialog.name: dialog for dialog in canonical_dialogs(AUDIO_TAG)}

    thinking_on = compare_context(formatter, tokenizer, dialogs["reasoning-on"].messages, {"enable_thinking": True})
    thinking_off = compare_context(formatter, tokenizer, dialogs["reasoning-off"].messages, {"enable_thinking": False})

    assert thinking_on.first_difference is None
    assert thinking_off.first_difference is None
    assert tokenizer.decode(thinking_on.serving_ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(thinking_off.serving_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_parity_qwen3_audio_context(qwen3_sides):
    formatter, tokenizer = qwen3_sides
    audio = next(dialog for dialog in canonical_dialogs(AUDIO_TAG) if dialog.name == "audio")

    pair = compare_context(formatter, tokenizer, audio.messages, {})

    assert pair.training_ids == pair.serving_ids
    assert pair.serving_ids.count(tokenizer.convert_tokens_to_ids(AUDIO_TAG)) == 1


def test_parity_mismatch_names_tokens(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(
        export_dir / "tokenizer.json",
        lambda tokenizer: tokenizer.update(added_tokens=[t for t in tokenizer["added_tokens"] if t["content"] != AUDIO_TAG]),
    )
    edit_json(export_dir / "tokenizer_config.json", lambda config: config.pop("extra_special_tokens"))
    prompt_ids = AutoTokenizer.from_pretrained(export_dir)("<|im_start|>user\nTranscribe the following: ")["input_ids"]

    status, report = run_check(export_dir)

    assert findings(report, "parity-context-mismatch") == [("tokenizer_config.json", "audio")]
    message = next(f["message"] for f in report["findings"] if f["code"] == "parity-context-mismatch")
    assert f"differ at position {len(prompt_ids)}: training has " in message
    assert f"'{AUDIO_TAG}'" in message
    assert status == 1


def test_parity_skips_system_dialog(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    edit_json(export_dir / "tokenizer_config.json", lambda config: config.update(chat_template=NO_SYSTEM_TEMPLATE))

    status, report = run_check(export_dir)

    skipped = [key for file, key in findings(report, "parity-dialog-skipped")]
    assert skipped == ["system-prompt", "reasoning-on", "reasoning-off"]
    assert "System role not supported" in next(
        f["message"] for f in report["findings"] if f["key"] == "system-prompt"
    )
    assert problem_codes(report) == set()
    assert status == 0


def test_parity_canonical_dialog_names():
    dialogs = canonical_dialogs("<|sound|>")

    assert [dialog.name for dialog in dialogs] == DIALOG_NAMES
    assert "<|sound|>" in dialogs[-1].messages[0]["content"]
    assert all(dialog.messages[-1]["role"] == "assistant" for dialog in dialogs)


@pytest.mark.parametrize(
    ("training", "serving", "expected"),
    [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2], [1, 2, 3], 2), ([], [4], 0)],
    ids=["equal", "differ", "prefix", "empty"],
)
def test_parity_first_difference(training, serving, expected):
    assert ContextPair(training_ids=training, serving_ids=serving).first_difference == expected


def test_parity_plain_dialog_failure_warns(demo, tmp_path, run_check):
    export_dir = broken_copy(demo.export_dir, tmp_path)
    # A template that ends no assistant turn as it prompts for one: no dialog can be trained exactly.
    template = DEMO_CHAT_TEMPLATE.replace("{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}", "{%- if add_generation_prompt %}{{- '<|im_start|>model\\n' }}")
    assert template != DEMO_CHAT_TEMPLATE
    edit_json(export_dir / "tokenizer_config.json", lambda config: config.update(chat_template=template))

    status, report = run_check(export_dir)

    assert findings(report, "parity-dialog-failed") == [("tokenizer_config.json", "plain"), ("tokenizer_config.json", "audio")]
    assert ("tokenizer_config.json", "multi-turn") in findings(report, "parity-dialog-skipped")
    assert problem_codes(report) == {"parity-dialog-failed"}
    assert status == 0
