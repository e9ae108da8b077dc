"""Weights of an export: index and shard files, and names, shapes and dtypes against the model.

Only safetensors headers are read, never tensor data, so exports of hundreds of GB are checked
in seconds. The expected tensors come from the model that config.json describes, built on the
meta device (no memory is allocated for its parameters).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speechlm_bridge.check.config import ExportConfig
from speechlm_bridge.check.files import read_json_object
from speechlm_bridge.check.findings import CheckReport
from speechlm_bridge.check.safetensors_header import TensorInfo, read_safetensors_header
from speechlm_bridge.checkpoints.safetensors_files import INDEX_FILE, SINGLE_FILE
from speechlm_bridge.errors import CheckpointError, ConfigError, SpeechLMBridgeError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_SHARD_PATTERN = re.compile(r"^model-\d+-of-\d+\.safetensors$")
# Tensors listed one finding each, per code. A config that describes another model makes every
# tensor mismatch, so the rest are counted in one more finding.
MAX_FINDINGS_PER_CODE = 20
# Building a model from an arbitrary config raises whatever its layers' checks raise; the
# speechlm-bridge adapter and projector raise ConfigError.
_MODEL_BUILD_ERRORS = (
    SpeechLMBridgeError, ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, ZeroDivisionError,
)
_REEXPORT_FIX = "re-run `speechlm-bridge export`"


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as its safetensors header describes it, and the file (relative) that stores it."""

    file: str
    info: TensorInfo


def check_weights(report: CheckReport, export_config: ExportConfig, *, tokenizer_length: int | None) -> None:
    """Check the weight files, and compare them with the model config.json describes.

    `tokenizer_length` (`len(tokenizer)`) is the minimum number of embedding rows; None skips
    that check.
    """
    stored, unreadable = read_stored_tensors(report)
    if stored is None or export_config.config is None:
        return
    model = _build_meta_model(report, export_config.config)
    if model is None:
        return
    expected = _ExpectedTensors.from_model(model)
    _compare_names_and_shapes(report, stored, unreadable, expected)
    if export_config.dtype is not None:
        _compare_dtypes(report, stored, export_config.dtype)
    if tokenizer_length is not None:
        _check_embedding_rows(report, stored, expected, tokenizer_length)


def read_weight_index(path: Path) -> dict[str, str]:
    """Return the `weight_map` (tensor name -> file name) of a safetensors index file.

    Raises ConfigError when the file is not JSON or `weight_map` is not a dict of strings.
    """
    index = read_json_object(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{path} has no weight_map object mapping tensor names to file names")
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str) or not file_name:
            raise ConfigError(f"{path}: weight_map[{name!r}] is {file_name!r}, not a file name")
    return weight_map


def read_stored_tensors(report: CheckReport) -> tuple[dict[str, StoredTensor] | None, set[str]]:
    """Return the stored tensors by name, and the names the index maps to unreadable files.

    Returns `(None, set())` when the weight files cannot be located at all.
    """
    directory = report.export_dir
    if (directory / INDEX_FILE).is_file():
        if (directory / SINGLE_FILE).is_file():
            report.add(
                "warning",
                "weights-layout-ambiguous",
                file=INDEX_FILE,
                message=(
                    f"both {SINGLE_FILE} and {INDEX_FILE} exist; transformers 5.19 loads "
                    f"{SINGLE_FILE} and ignores the shards, other loaders may not"
                ),
                fix="keep either the single file or the shards with their index",
            )
            return _read_single_file(report), set()
        return _read_sharded(report)
    if (directory / SINGLE_FILE).is_file():
        # Without an index, vLLM loads every *.safetensors file of the directory.
        for path in sorted(directory.glob("*.safetensors")):
            if path.name != SINGLE_FILE:
                report.add(
                    "error",
                    "weights-file-unreferenced",
                    file=path.name,
                    message=(
                        f"{path.name} sits beside {SINGLE_FILE} with no {INDEX_FILE}; transformers "
                        "reads only the single file, but vLLM loads every .safetensors file it finds"
                    ),
                    fix=f"delete {path.name}, or re-run the export if it belongs to the model",
                )
        return _read_single_file(report), set()

    shards = sorted(path.name for path in directory.glob("*.safetensors") if _SHARD_PATTERN.match(path.name))
    if shards:
        report.add(
            "error",
            "weights-index-missing",
            file=INDEX_FILE,
            message=f"{len(shards)} shard file(s) ({shards[0]}, ...) exist but {INDEX_FILE} does not",
            fix=f"{_REEXPORT_FIX}; loaders find the shards through the index",
        )
    else:
        report.add(
            "error",
            "weights-missing",
            file=SINGLE_FILE,
            message=f"the export has no weights: neither {SINGLE_FILE} nor {INDEX_FILE} exists",
            fix=_REEXPORT_FIX,
        )
    return None, set()


def _read_single_file(report: CheckReport) -> dict[str, StoredTensor] | None:
    header = _read_header(report, SINGLE_FILE)
    if header is None:
        return None
    return {name: StoredTensor(SINGLE_FILE, info) for name, info in header.items()}


def _read_sharded(report: CheckReport) -> tuple[dict[str, StoredTensor] | None, set[str]]:
    directory = report.export_dir
    try:
        weight_map = read_weight_index(directory / INDEX_FILE)
    except ConfigError as err:
        report.add("error", "weights-index-invalid", file=INDEX_FILE, key="weight_map", message=str(err), fix=_REEXPORT_FIX)
        return None, set()

    # 1. Read each shard's header once; remember the shards that cannot be read.
    headers: dict[str, dict[str, TensorInfo]] = {}
    for file_name in sorted(set(weight_map.values())):
        path = directory / file_name
        # Judged on the name, not the resolved path: shards in a Hugging Face cache snapshot are
        # symbolic links into its blobs/ folder, outside the snapshot directory.
        if _escapes_directory(file_name):
            report.add(
                "error",
                "weights-path-escapes",
                file=INDEX_FILE,
                key=file_name,
                message=f"the index names {file_name!r}, which is outside the export directory",
                fix="name shard files relative to the export directory, e.g. model-00001-of-00002.safetensors",
            )
            continue
        if not path.is_file():
            report.add(
                "error",
                "weights-shard-missing",
                file=INDEX_FILE,
                key=file_name,
                message=f"the index maps tensors to {file_name}, which does not exist",
                fix=f"{_REEXPORT_FIX}, or copy the missing shard",
            )
            continue
        header = _read_header(report, file_name)
        if header is not None:
            headers[file_name] = header

    # 2. Check the index against the headers, in both directions.
    stored: dict[str, StoredTensor] = {}
    unreadable: set[str] = set()
    for name, file_name in weight_map.items():
        if file_name not in headers:
            unreadable.add(name)
        elif name in headers[file_name]:
            stored[name] = StoredTensor(file_name, headers[file_name][name])
        else:
            report.add(
                "error",
                "weights-index-tensor-not-in-shard",
                file=file_name,
                key=name,
                message=f"the index maps {name} to {file_name}, which does not contain it",
                fix=_REEXPORT_FIX,
            )
    for file_name, header in headers.items():
        for name in header:
            if weight_map.get(name) != file_name:
                report.add(
                    "warning",
                    "weights-shard-tensor-not-in-index",
                    file=file_name,
                    key=name,
                    message=f"{file_name} contains {name}, which the index does not map to this file; loaders skip it",
                    fix=_REEXPORT_FIX,
                )

    # 3. Shards the index never names are dead weight, or a sign of a mixed-up copy.
    named = set(weight_map.values())
    for path in sorted(directory.glob("*.safetensors")):
        if path.name not in named:
            report.add(
                "warning",
                "weights-file-unreferenced",
                file=path.name,
                message=f"{path.name} is not named by {INDEX_FILE}, so no loader reads it",
                fix=f"delete {path.name}, or re-run the export if it belongs to the model",
            )
    return stored, unreadable


def _escapes_directory(file_name: str) -> bool:
    normalized = os.path.normpath(file_name)
    return os.path.isabs(normalized) or normalized == ".." or normalized.startswith(".." + os.sep)


def _read_header(report: CheckReport, file_name: str) -> dict[str, TensorInfo] | None:
    try:
        return read_safetensors_header(report.export_dir / file_name)
    except CheckpointError as err:
        report.add(
            "error",
            "weights-file-corrupt",
            file=file_name,
            message=str(err),
            fix=f"{_REEXPORT_FIX}, or copy {file_name} again (compare its size with the source)",
        )
        return None


def _build_meta_model(report: CheckReport, config: Any) -> torch.nn.Module | None:
    import torch

    from speechlm_bridge.modeling.modeling import SpeechLMBridgeForConditionalGeneration

    try:
        with torch.device("meta"):
            return SpeechLMBridgeForConditionalGeneration(config)
    except _MODEL_BUILD_ERRORS as err:
        logger.debug("building the model on the meta device failed", exc_info=True)
        report.add(
            "error",
            "model-build-failed",
            file="config.json",
            message=f"the model config.json describes cannot be built: {type(err).__name__}: {err}",
            fix="fix the config value the message names, or re-run `speechlm-bridge export`",
        )
        return None


@dataclass
class _ExpectedTensors:
    shapes: dict[str, tuple[int, ...]]
    tied: set[str]
    """Names that share their tensor with an earlier name, so the file stores them once."""
    ignored_patterns: list[str]
    input_embeddings_key: str | None
    output_embeddings_key: str | None

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> _ExpectedTensors:
        from speechlm_bridge.export.weights import tied_keys

        return cls(
            shapes={name: tuple(tensor.shape) for name, tensor in model.state_dict().items()},
            tied=tied_keys(model),
            ignored_patterns=list(getattr(model, "_keys_to_ignore_on_load_missing", None) or []),
            input_embeddings_key=_module_weight_key(model, model.get_input_embeddings()),
            output_embeddings_key=_module_weight_key(model, model.get_output_embeddings()),
        )

    def is_ignored(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.ignored_patterns)


def _module_weight_key(model: torch.nn.Module, module: Any) -> str | None:
    if module is None:
        return None
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return f"{name}.weight"
    return None


def _compare_names_and_shapes(
    report: CheckReport, stored: dict[str, StoredTensor], unreadable: set[str], expected: _ExpectedTensors
) -> None:
    missing, unexpected, wrong_shape = [], [], []
    for name in expected.shapes:
        if name in expected.tied:
            if name in stored:
                report.add(
                    "error",
                    "weights-tied-tensor-stored",
                    file=stored[name].file,
                    key=name,
                    message=(
                        f"{name} is stored, but the config ties it to the input embeddings "
                        "(tie_word_embeddings is true), so loaders ignore or overwrite it and the "
                        "model computes logits with the embedding matrix instead"
                    ),
                    fix=(
                        "if the stored lm_head equals embed_tokens, delete it from the weights; if it "
                        "differs, set tie_word_embeddings to false in config.json and its text_config"
                    ),
                )
        elif name == expected.output_embeddings_key and name not in stored and name not in unreadable:
            report.add(
                "error",
                "weights-lm-head-missing",
                file=_weights_file(report),
                key=name,
                message=(
                    f"{name} is not stored, but tie_word_embeddings is false, so loaders initialize "
                    "lm_head randomly"
                ),
                fix=(
                    "set tie_word_embeddings to true in config.json and its text_config if lm_head "
                    "equals embed_tokens, otherwise re-run the export"
                ),
            )
        elif name not in stored and name not in unreadable and not expected.is_ignored(name):
            missing.append(name)

    for name, tensor in stored.items():
        if name not in expected.shapes:
            unexpected.append(name)
        elif name not in expected.tied and tensor.info.shape != expected.shapes[name]:
            wrong_shape.append(name)

    _add_capped(
        report,
        "weights-tensor-missing",
        missing,
        file=lambda name: _weights_file(report),
        message=lambda name: f"{name} is not stored, so loaders initialize it randomly",
        fix="re-run the export; if the config describes another model, fix config.json",
    )
    _add_capped(
        report,
        "weights-tensor-unexpected",
        unexpected,
        file=lambda name: stored[name].file,
        message=lambda name: f"{name} is stored but the model config.json describes has no such tensor",
        fix="re-run the export; if the config describes another model, fix config.json",
    )
    _add_capped(
        report,
        "weights-shape-mismatch",
        wrong_shape,
        file=lambda name: stored[name].file,
        message=lambda name: (
            f"{name} is stored with shape {list(stored[name].info.shape)} but the config describes "
            f"{list(expected.shapes[name])}"
        ),
        fix="make config.json describe the stored model (sizes in text_config, encoder_config, projector_config)",
    )


def _weights_file(report: CheckReport) -> str:
    """Return the file that lists the stored tensors: the single file when present (it wins), else the index."""
    return SINGLE_FILE if (report.export_dir / SINGLE_FILE).is_file() else INDEX_FILE


def _compare_dtypes(report: CheckReport, stored: dict[str, StoredTensor], dtype: str) -> None:
    # One finding per stored dtype: a cast export makes every tensor differ.
    by_dtype: dict[str, list[str]] = {}
    for name, tensor in sorted(stored.items()):
        if tensor.info.dtype.startswith(("float", "bfloat")) and tensor.info.dtype != dtype:
            by_dtype.setdefault(tensor.info.dtype, []).append(name)
    for stored_dtype, names in sorted(by_dtype.items()):
        report.add(
            "error",
            "weights-dtype-mismatch",
            file=stored[names[0]].file,
            key=names[0],
            message=(
                f"{len(names)} floating-point tensor(s) are stored as {stored_dtype} but config.json's "
                f"dtype is {dtype} (first: {', '.join(names[:3])}); loading casts them silently"
            ),
            fix=f"set dtype in config.json to {stored_dtype}, or re-export with --dtype {dtype}",
        )


def _check_embedding_rows(
    report: CheckReport, stored: dict[str, StoredTensor], expected: _ExpectedTensors, tokenizer_length: int
) -> None:
    for name in (expected.input_embeddings_key, expected.output_embeddings_key):
        tensor = stored.get(name) if name else None
        if tensor is None or not tensor.info.shape:
            continue
        rows = tensor.info.shape[0]
        if rows < tokenizer_length:
            report.add(
                "error",
                "embedding-rows-too-few",
                file=tensor.file,
                key=name,
                message=(
                    f"{name} has {rows} rows but the tokenizer has {tokenizer_length} tokens; ids "
                    f"{rows} and above index past the table"
                ),
                fix=(
                    f"re-run the export, which pads the table to at least {tokenizer_length} rows and "
                    "sets text_config.vocab_size"
                ),
            )


def _add_capped(report: CheckReport, code: str, names: list[str], *, file, message, fix: str) -> None:
    names = sorted(names)
    for name in names[:MAX_FINDINGS_PER_CODE]:
        report.add("error", code, file=file(name), key=name, message=message(name), fix=fix)
    if len(names) > MAX_FINDINGS_PER_CODE:
        rest = names[MAX_FINDINGS_PER_CODE:]
        report.add(
            "error",
            code,
            file=file(rest[0]),
            key=None,
            message=(
                f"and {len(rest)} more tensor(s) like the above: {rest[0]}"
                if len(rest) == 1
                else f"and {len(rest)} more tensor(s) like the above, from {rest[0]} to {rest[-1]}"
            ),
            fix=fix,
        )
