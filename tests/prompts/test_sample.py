"""TrainingSample: derived fields and the JSON form."""

from __future__ import annotations

import json

from speechlm_bridge.prompts import LossSpan, TrainingSample


def make_sample() -> TrainingSample:
    return TrainingSample(
        input_ids=[10, 11, 12, 13, 14, 15, 16],
        loss_mask=[False, False, True, False, False, True, True],
        spans=[LossSpan(1, 2, 3), LossSpan(3, 5, 7)],
        audio_positions=[1],
        dialog_index=4,
    )


def test_context_and_answer_split_at_last_span():
    sample = make_sample()
    assert sample.context_ids == [10, 11, 12, 13, 14]
    assert sample.answer_ids == [15, 16]
    assert sample.turn_indices == [1, 3]


def test_labels_mask_context():
    assert make_sample().labels() == [-100, -100, 12, -100, -100, 15, 16]
    assert make_sample().labels(ignore_index=-1)[:2] == [-1, -1]


def test_to_dict_is_json():
    data = json.loads(json.dumps(make_sample().to_dict()))
    assert data == {
        "dialog_index": 4,
        "input_ids": [10, 11, 12, 13, 14, 15, 16],
        "loss_mask": [False, False, True, False, False, True, True],
        "context_ids": [10, 11, 12, 13, 14],
        "answer_ids": [15, 16],
        "spans": [
            {"turn_index": 1, "start": 2, "end": 3},
            {"turn_index": 3, "start": 5, "end": 7},
        ],
        "audio_positions": [1],
    }
