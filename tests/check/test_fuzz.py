"""Fuzzing: the readers and checks raise only the documented errors, or none, on any input.

Readers (`read_safetensors_header`, `read_weight_index`, `read_json_object`) may raise their
SpeechLMBridgeError subclass; checks turn every problem into findings and raise nothing. The
number of examples is bounded so the file runs in seconds; raise it with
SPEECHLM_BRIDGE_HYPOTHESIS_EXAMPLES to search longer.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechlm_bridge.check import CheckReport, check_export
from speechlm_bridge.check.config import check_config
from speechlm_bridge.check.parity import compare_context
from speechlm_bridge.check.safetensors_header import read_safetensors_header
from speechlm_bridge.check.weights import check_weights, read_weight_index
from speechlm_bridge.errors import CheckpointError, ConfigError, PromptError
from tests.check.conftest import DemoExport, build_demo_export

MAX_EXAMPLES = int(os.environ.get("SPEECHLM_BRIDGE_HYPOTHESIS_EXAMPLES", "40"))
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
INDEX = "model.safetensors.index.json"

# JSON values, with small numbers: a config with 10**9 layers is valid JSON but builds 10**9
# modules, which tests nothing the small numbers do not.
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
    st.sampled_from(["bfloat16", "float32", "qwen3", "speechlm_bridge", "<|audio|>", "llama", ""]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoExport:
    return build_demo_export(tmp_path_factory.mktemp("fuzz"), max_shard_size="1MB")


@pytest.fixture(scope="module")
def work_dir(demo, tmp_path_factory) -> Path:
    """One copy of the export that every example overwrites a file of (and restores)."""
    target = tmp_path_factory.mktemp("fuzz-work") / "export"
    shutil.copytree(demo.export_dir, target)
    return target


def _key_paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    paths = []
    if isinstance(document, dict):
        for key, value in document.items():
            paths.append(prefix + (key,))
            paths.extend(_key_paths(value, prefix + (key,)))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths.append(prefix + (index,))
            paths.extend(_key_paths(value, prefix + (index,)))
    return paths


@st.composite
def mutated(draw, document: dict) -> dict:
    """Replace or delete one to three values anywhere in `document`."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _key_paths(document)
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        target = document
        for parent in parents:
            target = target[parent]
        if isinstance(target, dict) and draw(st.booleans()):
            del target[last]
        else:
            target[last] = draw(JSON_VALUES)
    return document


def test_fuzz_safetensors_header_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"

    @FUZZ_SETTINGS
    @given(st.binary(max_size=256))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            read_safetensors_header(path)
        except CheckpointError:
            pass

    check()


def test_fuzz_safetensors_header_random_json(tmp_path):
    path = tmp_path / "random.safetensors"
    entries = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.one_of(st.sampled_from(["F32", "BF16", "I64", "F4", "X9"]), JSON_SCALARS),
            "shape": st.one_of(st.lists(st.integers(min_value=-1, max_value=4), max_size=3), JSON_VALUES),
            "data_offsets": st.one_of(st.lists(st.integers(min_value=-1, max_value=40), max_size=3), JSON_VALUES),
        },
    )
    headers = st.dictionaries(st.text(max_size=6), st.one_of(entries, JSON_VALUES), max_size=4)

    @FUZZ_SETTINGS
    @given(headers, st.integers(min_value=0, max_value=48))
    def check(header: dict, data_bytes: int) -> None:
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)
        try:
            tensors = read_safetensors_header(path)
        except CheckpointError:
            return
        assert all(isinstance(info.shape, tuple) for info in tensors.values())

    check()


def test_fuzz_weight_index_reader(demo, tmp_path):
    index = json.loads((demo.export_dir / INDEX).read_text())
    path = tmp_path / INDEX

    @FUZZ_SETTINGS
    @given(st.one_of(mutated(index), JSON_VALUES))
    def check(document: Any) -> None:
        path.write_text(json.dumps(document))
        try:
            weight_map = read_weight_index(path)
        except ConfigError:
            return
        assert all(isinstance(name, str) for name in weight_map.values())

    check()


def test_fuzz_weight_index_check(demo, work_dir):
    original = (demo.export_dir / INDEX).read_text()
    index = json.loads(original)
    export_config = check_config(CheckReport(export_dir=demo.export_dir))

    @FUZZ_SETTINGS
    @given(mutated(index))
    def check(document: dict) -> None:
        (work_dir / INDEX).write_text(json.dumps(document))
        report = CheckReport(export_dir=work_dir)
        check_weights(report, export_config, tokenizer_length=394)
        if document.get("weight_map") != index["weight_map"]:
            assert report.findings

    try:
        check()
    finally:
        (work_dir / INDEX).write_text(original)


def test_fuzz_config_check(demo, work_dir):
    original = (demo.export_dir / "config.json").read_text()
    config = json.loads(original)

    @FUZZ_SETTINGS
    @given(st.one_of(mutated(config), JSON_VALUES))
    def check(document: Any) -> None:
        (work_dir / "config.json").write_text(json.dumps(document))
        report = CheckReport(export_dir=work_dir)
        export_config = check_config(report)
        check_weights(report, export_config, tokenizer_length=394)

    try:
        check()
    finally:
        (work_dir / "config.json").write_text(original)


def test_fuzz_check_export_config(demo, work_dir):
    """The whole check on mutated config.json: the tokenizer and parity steps read it too."""
    original = (demo.export_dir / "config.json").read_text()
    config = json.loads(original)

    @settings(FUZZ_SETTINGS, max_examples=max(10, MAX_EXAMPLES // 4))
    @given(mutated(config))
    def check(document: dict) -> None:
        (work_dir / "config.json").write_text(json.dumps(document))
        report = check_export(work_dir)
        assert report.summary()["errors"] + report.summary()["warnings"] + report.summary()["infos"] == len(report.findings)

    try:
        check()
    finally:
        (work_dir / "config.json").write_text(original)


MESSAGE_TEXT = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["<|audio|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "\n", " "]),
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), st.text(max_size=5)),
            "content": st.one_of(
                MESSAGE_TEXT,
                st.none(),
                st.integers(),
                st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "audio", "image"]), "text": MESSAGE_TEXT}), max_size=2),
            ),
        },
        optional={"reasoning_content": MESSAGE_TEXT},
    ),
    max_size=5,
)


def test_fuzz_formatter_parity(demo):
    from transformers import AutoTokenizer

    from speechlm_bridge.prompts import ChatFormatter

    formatter = ChatFormatter.from_pretrained(demo.export_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo.export_dir)

    @FUZZ_SETTINGS
    @given(MESSAGES, st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()}))
    def check(messages: list[dict], template_kwargs: dict) -> None:
        try:
            pair = compare_context(formatter, tokenizer, messages, template_kwargs)
        except PromptError:
            return
        # The demo export is clean: whatever both sides render, they render alike.
        assert pair.first_difference is None

    check()
