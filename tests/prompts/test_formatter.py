"""ChatFormatter: history rewriting, BPE boundaries, reasoning, BOS, and NeMo cross-checks."""

from __future__ import annotations

import copy
import json

import pytest

from speechlm_bridge.prompts import ChatFormatter, serving_prompt_ids
from tests.conftest import fixture_path
from tests.prompts.conftest import AUDIO_TAG, assert_exact

MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Count to two."},
    {"role": "assistant", "content": "One, two."},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You're welcome."},
]


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_history_rewrite_splits_samples(backbones):
    # Qwen3 puts "<think>\n\n</think>\n\n" before the final answer only, so a turn is rendered
    # differently once it is history: one exact sample per assistant turn.
    entry = backbones["qwen3"]
    samples = ChatFormatter(entry.tokenizer).encode(MULTI_TURN, loss_on="all")
    assert [sample.turn_indices for sample in samples] == [[1], [3], [5]]
    assert_exact(entry, MULTI_TURN, samples, loss_on="all")


def test_stable_history_packs_one_sample(backbones):
    entry = backbones["qwen2.5"]
    samples = ChatFormatter(entry.tokenizer).encode(MULTI_TURN, loss_on="all")
    assert len(samples) == 1
    assert samples[0].turn_indices == [1, 3, 5]
    assert_exact(entry, MULTI_TURN, samples, loss_on="all")


def test_emptied_history_reasoning_splits(backbones):
    entry = backbones["rewrite-history"]
    dialog = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Add again."},
    ]
    samples = ChatFormatter(entry.tokenizer).encode(dialog, loss_on="all")
    assert [sample.turn_indices for sample in samples] == [[1], [3]]
    decoded_history = entry.tokenizer.decode(samples[1].context_ids)
    assert "Add them." not in decoded_history
    assert "<think>\n\n</think>\n\n4<|im_end|>" in decoded_history


def test_bpe_boundary_keeps_serving_context(backbones):
    # Qwen2.5's prompt ends in "\n" and this answer starts with "\n": tokenized together they
    # make one "\n\n" token, so the answer is tokenized on its own after the serving context.
    tokenizer = backbones["qwen2.5"].tokenizer
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    sample = ChatFormatter(tokenizer).encode(dialog)[0]

    newline, double_newline = token_ids(tokenizer, "\n")[0], token_ids(tokenizer, "\n\n")[0]
    prompt = tokenizer.apply_chat_template(dialog[:1], tokenize=False, add_generation_prompt=True)
    assert sample.context_ids == token_ids(tokenizer, prompt)
    assert sample.context_ids[-1] == newline
    assert sample.answer_ids == token_ids(tokenizer, "\nHello<|im_end|>")
    assert sample.answer_ids[0] == newline
    joint = token_ids(tokenizer, prompt + "\nHello<|im_end|>")
    assert double_newline in joint
    assert sample.input_ids != joint
    assert_exact(backbones["qwen2.5"], dialog, [sample], loss_on="last")


def test_open_think_prompt_answer_continues(backbones):
    # The generation prompt already opens "<think>\n", and the answer is what follows it.
    entry = backbones["rewrite-history"]
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    sample = ChatFormatter(entry.tokenizer).encode(dialog)[0]
    assert entry.tokenizer.decode(sample.context_ids).endswith("<|im_start|>assistant\n<think>\n")
    assert entry.tokenizer.decode(sample.answer_ids) == "\n</think>\n\nHello.<|im_end|>"
    # "<think>\n" + "\n</think>" would tokenize as one "\n\n", so the answer starts with a "\n".
    newline = token_ids(entry.tokenizer, "\n")[0]
    assert sample.context_ids[-1] == newline
    assert sample.answer_ids[0] == newline


def test_nemotron_reasoning_after_open_think(backbones):
    entry = backbones["nemotron-3-nano"]
    dialog = [
        {"role": "user", "content": "Is 9 odd?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "9 = 2*4 + 1."},
    ]
    sample = ChatFormatter(entry.tokenizer).encode(dialog)[0]
    assert entry.tokenizer.decode(sample.context_ids).endswith("assistant\n<think>\n")
    assert entry.tokenizer.decode(sample.answer_ids) == "9 = 2*4 + 1.\n</think>\nYes.<|im_end|>"


def test_nemotron_thinking_off_closes_block(backbones):
    entry = backbones["nemotron-3-nano"]
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    sample = ChatFormatter(entry.tokenizer).encode(dialog, enable_thinking=False)[0]
    assert entry.tokenizer.decode(sample.context_ids).endswith("assistant\n<think></think>")
    assert entry.tokenizer.decode(sample.answer_ids) == "Hello.<|im_end|>"


@pytest.mark.parametrize(
    ("kwargs", "context_end", "answer"),
    [
        ({}, "assistant\n", "<think>\n\n</think>\n\nParis.<|im_end|>"),
        ({"enable_thinking": True}, "assistant\n", "<think>\n\n</think>\n\nParis.<|im_end|>"),
        ({"enable_thinking": False}, "assistant\n<think>\n\n</think>\n\n", "Paris.<|im_end|>"),
    ],
)
def test_qwen3_thinking_modes(backbones, kwargs, context_end, answer):
    tokenizer = backbones["qwen3"].tokenizer
    dialog = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    sample = ChatFormatter(tokenizer).encode(dialog, **kwargs)[0]
    assert tokenizer.decode(sample.context_ids).endswith(context_end)
    assert tokenizer.decode(sample.answer_ids) == answer


def test_formatter_kwargs_and_call_kwargs(backbones):
    tokenizer = backbones["qwen3"].tokenizer
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    formatter = ChatFormatter(tokenizer, template_kwargs={"enable_thinking": False})
    off = formatter.encode(dialog)[0]
    on = formatter.encode(dialog, enable_thinking=True)[0]
    assert tokenizer.decode(off.answer_ids) == "Hello.<|im_end|>"
    assert tokenizer.decode(on.answer_ids) == "<think>\n\n</think>\n\nHello.<|im_end|>"


def test_template_bos_not_doubled(backbones):
    tokenizer = backbones["llama3-like"].tokenizer
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    sample = ChatFormatter(tokenizer).encode(dialog)[0]
    assert sample.input_ids[0] == tokenizer.bos_token_id
    assert sample.input_ids.count(tokenizer.bos_token_id) == 1


def test_end_of_turn_differs_from_eos(backbones):
    for name, end_of_turn in (("llama3-like", "<|eot_id|>"), ("gemma-like", "<end_of_turn>")):
        tokenizer = backbones[name].tokenizer
        dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
        sample = ChatFormatter(tokenizer).encode(dialog)[0]
        assert sample.answer_ids[-1] == tokenizer.convert_tokens_to_ids(end_of_turn)
        assert tokenizer.eos_token_id not in sample.input_ids


def test_gemma_system_merged_into_user(backbones):
    tokenizer = backbones["gemma-like"].tokenizer
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    sample = ChatFormatter(tokenizer).encode(dialog)[0]
    assert tokenizer.decode(sample.context_ids) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tokenizer.decode(sample.answer_ids) == "Hello.<end_of_turn>"


def test_dated_system_prompt(backbones):
    entry = backbones["dated-system"]
    dialog = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    formatter = ChatFormatter(entry.tokenizer)
    pinned = formatter.encode(dialog, date_string="26 July 2024")[0]
    assert entry.tokenizer.decode(pinned.context_ids).startswith(
        "<|im_start|>system\nToday is 26 July 2024.\nYou are a helpful speech assistant.<|im_end|>"
    )
    today = formatter.encode(dialog)[0]
    assert_exact(entry, dialog, [today], loss_on="last")


def test_tool_calls_exact(backbones):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "Current time in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    dialog = [
        {"role": "user", "content": "Time in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_time", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "content": "14:05"},
        {"role": "assistant", "content": "It is 14:05 in Oslo."},
    ]
    cases = {"qwen3": {}, "qwen2.5": {}, "nemotron-3-nano": {"enable_thinking": False}}
    for name, kwargs in cases.items():
        entry = backbones[name]
        samples = ChatFormatter(entry.tokenizer).encode(
            dialog, loss_on="all", tools=tools, **kwargs
        )
        assert_exact(
            entry, dialog, samples, loss_on="all", template_kwargs={"tools": tools, **kwargs}
        )
        decoded = entry.tokenizer.decode(samples[0].input_ids)
        assert "get_time" in decoded


def test_audio_positions_point_at_tag(backbones):
    tokenizer = backbones["qwen3"].tokenizer
    dialog = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Transcribe:"}, {"type": "input_audio"}],
        },
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": [{"type": "audio_url"}, {"type": "text", "text": "and this"}]},
        {"role": "assistant", "content": "bye"},
    ]
    samples = ChatFormatter(tokenizer, audio_locator_tag=AUDIO_TAG).encode(
        dialog, loss_on="all", audios_count=2
    )
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TAG)
    assert [len(sample.audio_positions) for sample in samples] == [1, 2]
    for sample in samples:
        assert all(sample.input_ids[i] == audio_id for i in sample.audio_positions)
    text = tokenizer.decode(samples[1].context_ids)
    assert "Transcribe: <|audio|><|im_end|>" in text
    assert "<|audio|> and this<|im_end|>" in text


def test_encode_leaves_messages_unchanged(backbones):
    dialog = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "audio"}]},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
    ]
    before = copy.deepcopy(dialog)
    ChatFormatter(backbones["qwen3"].tokenizer, audio_locator_tag=AUDIO_TAG).encode(dialog)
    assert dialog == before


def test_loss_on_last_ignores_trailing_user(backbones):
    entry = backbones["qwen2.5"]
    dialog = MULTI_TURN + [{"role": "user", "content": "One more thing."}]
    samples = ChatFormatter(entry.tokenizer).encode(dialog)
    assert samples[0].turn_indices == [5]
    assert_exact(entry, dialog, samples, loss_on="last")


@pytest.fixture(scope="module")
def export_formatter() -> ChatFormatter:
    """A formatter on the directory NeMo's to_hf.py exported (config: qwen3, <|audio|>)."""
    return ChatFormatter.from_pretrained(fixture_path("nemo-salm", "to_hf", "from_ckpt"))


def test_nemo_golden_prompt_equals_serving(export_formatter):
    # NeMo's own qwen3 formatter rendered this inference prompt, and the Qwen3 template agrees.
    golden = json.loads(fixture_path("nemo-salm", "golden", "golden_inputs.json").read_text())
    ids = serving_prompt_ids(
        export_formatter.tokenizer, golden["dialog"], **golden["encode_dialog_kwargs"]
    )
    assert ids == golden["prompt_input_ids"]


def test_from_pretrained_export_config(export_formatter):
    assert export_formatter.audio_locator_tag == "<|audio|>"
    assert export_formatter.audio_locator_id == 151669
    assert export_formatter.loss_on == "last"  # prompt_format: qwen3


def test_nemo_training_answer_matches(export_formatter):
    # NeMo's qwen3 formatter wrote example-3 (reasoning, no injected /think tag). The sample
    # here equals it without the "\n" that follows <|im_end|>, which belongs to no turn.
    example = json.loads(fixture_path("nemo-salm", "lightning", "train_examples.json").read_text())[
        3
    ]
    formatter = export_formatter
    dialog = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Transcribe the following:"}, {"type": "audio"}],
        },
        {"role": "assistant", "content": "ok", "reasoning_content": "short reasoning"},
    ]
    sample = formatter.encode(dialog, audios_count=1)[0]
    assert sample.input_ids == example["input_ids"][:-1]
    assert sample.audio_positions == [example["input_ids"].index(151669)]


def test_from_pretrained_backbone_dir():
    formatter = ChatFormatter.from_pretrained(fixture_path("backbones", "qwen3"))
    assert formatter.loss_on == "last"
    assert formatter.audio_locator_tag is None
    assert formatter.end_of_turn_token() == "<|im_end|>"


def test_from_pretrained_prompt_format_defaults():
    formatter = ChatFormatter.from_pretrained(
        fixture_path("backbones", "qwen3"), prompt_format="qwen"
    )
    assert formatter.loss_on == "all"
    formatter = ChatFormatter.from_pretrained(
        fixture_path("backbones", "qwen3"), prompt_format="qwen3.5"
    )
    assert formatter.template_kwargs == {"enable_thinking": False}
