"""encode_batch: the same samples as encode, per-dialog kwargs and error handling."""

from __future__ import annotations

import logging

import pytest

from speechlm_bridge.errors import PromptError
from speechlm_bridge.prompts import ChatFormatter
from tests.prompts.conftest import AUDIO_TAG

DIALOGS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [
        {"role": "user", "content": [{"type": "text", "text": "Transcribe:"}, {"type": "audio"}]},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "two"},
    ],
    {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}],
        "kwargs": {"enable_thinking": False},
    },
]


@pytest.fixture(scope="module")
def formatter(backbones):
    return ChatFormatter(backbones["qwen3"].tokenizer, audio_locator_tag=AUDIO_TAG)


def test_batch_equals_encode(formatter):
    batch = formatter.encode_batch(DIALOGS, loss_on="all")
    expected = []
    for index, item in enumerate(DIALOGS):
        if isinstance(item, dict):
            samples = formatter.encode(item["messages"], loss_on="all", **item["kwargs"])
        else:
            samples = formatter.encode(item, loss_on="all")
        for sample in samples:
            sample.dialog_index = index
        expected.extend(samples)
    assert batch == expected
    assert [sample.dialog_index for sample in batch] == [0, 1, 1, 2]


def test_batch_dialog_kwargs_apply(formatter):
    sample = formatter.encode_batch(DIALOGS[2:])[0]
    assert formatter.tokenizer.decode(sample.answer_ids) == "Yo.<|im_end|>"


def test_batch_audios_counts_checked(formatter):
    with pytest.raises(PromptError, match=r"dialog 1: the dialog has 1 audio locator\(s\)"):
        formatter.encode_batch(DIALOGS, audios_counts=[0, 2, 0])


def test_batch_skip_logs_and_continues(formatter, caplog):
    dialogs = [DIALOGS[0], [{"role": "user", "content": "no answer"}], DIALOGS[1]]
    with caplog.at_level(logging.WARNING, logger="speechlm_bridge.prompts.formatter"):
        samples = formatter.encode_batch(dialogs, on_error="skip")
    assert [sample.dialog_index for sample in samples] == [0, 2]
    assert "skipping dialog 1: the dialog has no assistant message" in caplog.text


def test_batch_raise_names_dialog(formatter):
    with pytest.raises(PromptError, match="dialog 1: the dialog has no assistant message"):
        formatter.encode_batch([DIALOGS[0], [{"role": "user", "content": "no answer"}]])


def test_batch_rejects_bad_item(formatter):
    with pytest.raises(PromptError, match="dialog 0: a dialog object needs a 'messages' key"):
        formatter.encode_batch([{"turns": []}])


def test_batch_audios_counts_length(formatter):
    with pytest.raises(PromptError, match="audios_counts has 2 entries for 3 dialogs"):
        formatter.encode_batch(DIALOGS, audios_counts=[0, 1])
