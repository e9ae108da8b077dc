"""Weight findings: index, shards, names, shapes, dtypes and tying, each broken in a copy of a real export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speechlm_bridge.check import check_export
from speechlm_bridge.check.weights import MAX_FINDINGS_PER_CODE
from tests.check.conftest import DemoExport, broken_copy, build_demo_export, edit_json, findings, problem_codes

INDEX = "model.safetensors.index.json"
EMBEDDINGS = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"
PROJECTOR = "audio_projector.weight"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, DemoExport]:
    """The same weights exported as one file and as two shards with an index."""
    return {
        "single": build_demo_export(tmp_path_factory.mktemp("single")),
        "sharded": build_demo_export(tmp_path_factory.mktemp("sharded"), max_shard_size="1MB"),
    }


def _weight_map(export_dir: Path) -> dict[str, str]:
    return json.loads((export_dir / INDEX).read_text())["weight_map"]


def _rewrite_tensors(export_dir: Path, file_name: str, edit) -> None:
    """Load a (tiny) safetensors file, let `edit` change the dict, and save it back."""
    tensors = load_file(str(export_dir / file_name))
    edit(tensors)
    save_file(tensors, str(export_dir / file_name), metadata={"format": "pt"})


def _shard_of(export_dir: Path, name: str) -> str:
    return _weight_map(export_dir)[name]


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_weights_clean_export(exports, layout):
    report = check_export(exports[layout].export_dir, backbone=exports[layout].backbone_dir)

    assert report.errors == []
    assert report.warnings == []


def test_weights_shard_missing(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    (export_dir / "model-00002-of-00002.safetensors").unlink()

    status, report = run_check(export_dir)

    assert findings(report, "weights-shard-missing") == [(INDEX, "model-00002-of-00002.safetensors")]
    # Tensors of the missing shard are not reported again as missing tensors.
    assert problem_codes(report) == {"weights-shard-missing"}
    assert status == 1


@pytest.mark.parametrize("keep_bytes", [4, 100, -1000], ids=["no-header-length", "header-cut", "data-cut"])
def test_weights_shard_truncated(exports, tmp_path, run_check, keep_bytes):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    shard = export_dir / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:keep_bytes])

    status, report = run_check(export_dir)

    assert findings(report, "weights-file-corrupt") == [("model-00001-of-00002.safetensors", None)]
    assert problem_codes(report) == {"weights-file-corrupt"}
    assert status == 1


def test_weights_single_file_trailing_bytes(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    with (export_dir / "model.safetensors").open("ab") as handle:
        handle.write(b"\0" * 16)

    status, report = run_check(export_dir)

    assert findings(report, "weights-file-corrupt") == [("model.safetensors", None)]
    message = next(f["message"] for f in report["findings"] if f["code"] == "weights-file-corrupt")
    assert "longer than its header says" in message
    assert status == 1


def test_weights_path_escapes(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    shutil.copy(export_dir / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    edit_json(export_dir / INDEX, lambda index: index["weight_map"].update({PROJECTOR: "../outside.safetensors"}))

    status, report = run_check(export_dir)

    assert findings(report, "weights-path-escapes") == [(INDEX, "../outside.safetensors")]
    # The shard still contains the tensor, but the index maps it elsewhere.
    assert findings(report, "weights-shard-tensor-not-in-index") == [(_shard_of(exports["sharded"].export_dir, PROJECTOR), PROJECTOR)]
    assert problem_codes(report) == {"weights-path-escapes", "weights-shard-tensor-not-in-index"}
    assert status == 1


def test_weights_tensor_left_out_of_index(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    shard = _shard_of(export_dir, PROJECTOR)
    edit_json(export_dir / INDEX, lambda index: index["weight_map"].pop(PROJECTOR))

    status, report = run_check(export_dir)

    assert findings(report, "weights-shard-tensor-not-in-index") == [(shard, PROJECTOR)]
    assert findings(report, "weights-tensor-missing") == [(INDEX, PROJECTOR)]
    assert problem_codes(report) == {"weights-shard-tensor-not-in-index", "weights-tensor-missing"}
    assert status == 1


def test_weights_index_names_absent_tensor(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    edit_json(
        export_dir / INDEX,
        lambda index: index["weight_map"].update({"audio_projector.extra.weight": "model-00002-of-00002.safetensors"}),
    )

    status, report = run_check(export_dir)

    assert findings(report, "weights-index-tensor-not-in-shard") == [
        ("model-00002-of-00002.safetensors", "audio_projector.extra.weight")
    ]
    assert problem_codes(report) == {"weights-index-tensor-not-in-shard"}
    assert status == 1


def test_weights_tensor_unexpected(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    _rewrite_tensors(export_dir, "model.safetensors", lambda tensors: tensors.update({"audio_projector.extra.weight": torch.zeros(2)}))

    status, report = run_check(export_dir)

    assert findings(report, "weights-tensor-unexpected") == [("model.safetensors", "audio_projector.extra.weight")]
    assert problem_codes(report) == {"weights-tensor-unexpected"}
    assert status == 1


def test_weights_tensor_missing(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    _rewrite_tensors(export_dir, "model.safetensors", lambda tensors: tensors.pop(PROJECTOR))

    status, report = run_check(export_dir)

    assert findings(report, "weights-tensor-missing") == [("model.safetensors", PROJECTOR)]
    assert problem_codes(report) == {"weights-tensor-missing"}
    assert status == 1


def test_weights_shape_mismatch(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    _rewrite_tensors(export_dir, "model.safetensors", lambda tensors: tensors.update({PROJECTOR: tensors[PROJECTOR][:, :-1].clone()}))

    status, report = run_check(export_dir)

    assert findings(report, "weights-shape-mismatch") == [("model.safetensors", PROJECTOR)]
    message = next(f["message"] for f in report["findings"] if f["code"] == "weights-shape-mismatch")
    assert "stored with shape [64, 63] but the config describes [64, 64]" in message
    assert problem_codes(report) == {"weights-shape-mismatch"}
    assert status == 1


def test_weights_dtype_mismatch(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    shard = _shard_of(export_dir, PROJECTOR)
    _rewrite_tensors(export_dir, shard, lambda tensors: tensors.update({PROJECTOR: tensors[PROJECTOR].half()}))

    status, report = run_check(export_dir)

    assert findings(report, "weights-dtype-mismatch") == [(shard, PROJECTOR)]
    assert problem_codes(report) == {"weights-dtype-mismatch"}
    assert status == 1


def test_weights_tied_lm_head_stored(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    _rewrite_tensors(export_dir, "model.safetensors", lambda tensors: tensors.update({LM_HEAD: tensors[EMBEDDINGS].clone()}))

    status, report = run_check(export_dir)

    assert findings(report, "weights-tied-tensor-stored") == [("model.safetensors", LM_HEAD)]
    assert problem_codes(report) == {"weights-tied-tensor-stored"}
    assert status == 1


def test_weights_untied_lm_head_missing(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)

    def untie(config: dict) -> None:
        config["tie_word_embeddings"] = False
        config["text_config"]["tie_word_embeddings"] = False

    edit_json(export_dir / "config.json", untie)

    status, report = run_check(export_dir)

    assert findings(report, "weights-lm-head-missing") == [(INDEX, LM_HEAD)]
    assert problem_codes(report) == {"weights-lm-head-missing"}
    assert status == 1


def test_weights_embedding_rows_too_few(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    rows = 300
    _rewrite_tensors(export_dir, "model.safetensors", lambda tensors: tensors.update({EMBEDDINGS: tensors[EMBEDDINGS][:rows].clone()}))
    edit_json(export_dir / "config.json", lambda config: config["text_config"].update(vocab_size=rows))

    status, report = run_check(export_dir)

    assert findings(report, "embedding-rows-too-few") == [("model.safetensors", EMBEDDINGS)]
    message = next(f["message"] for f in report["findings"] if f["code"] == "embedding-rows-too-few")
    assert f"has {rows} rows but the tokenizer has 394 tokens" in message
    assert problem_codes(report) == {"embedding-rows-too-few"}
    assert status == 1


def test_weights_missing_tensors_capped(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)

    def four_layers(config: dict) -> None:
        config["text_config"]["num_hidden_layers"] = 4
        config["text_config"]["layer_types"] = ["full_attention"] * 4
        config["text_config"]["max_window_layers"] = 4

    edit_json(export_dir / "config.json", four_layers)

    status, report = run_check(export_dir)

    missing = findings(report, "weights-tensor-missing")
    # Two absent layers of 11 tensors each: 20 listed, the other 2 counted in one more finding.
    assert len(missing) == MAX_FINDINGS_PER_CODE + 1
    assert missing[0] == ("model.safetensors", "language_model.model.layers.2.input_layernorm.weight")
    assert missing[-1] == ("model.safetensors", None)
    rest = next(f for f in report["findings"] if f["code"] == "weights-tensor-missing" and f["key"] is None)
    assert rest["message"].startswith("and 2 more tensor(s) like the above")
    assert problem_codes(report) == {"weights-tensor-missing"}
    assert status == 1


def test_weights_file_unreferenced(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    shutil.copy(export_dir / "model-00002-of-00002.safetensors", export_dir / "model-00003-of-00003.safetensors")

    status, report = run_check(export_dir)

    assert findings(report, "weights-file-unreferenced") == [("model-00003-of-00003.safetensors", None)]
    assert problem_codes(report) == {"weights-file-unreferenced"}
    assert status == 0


def test_weights_stray_file_beside_single_file(exports, tmp_path, run_check):
    # With no index, vLLM loads every .safetensors file, so a stray copy would be loaded too.
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    shutil.copy(export_dir / "model.safetensors", export_dir / "model-old.safetensors")

    status, report = run_check(export_dir)

    assert findings(report, "weights-file-unreferenced") == [("model-old.safetensors", None)]
    assert problem_codes(report) == {"weights-file-unreferenced"}
    assert status == 1


def test_weights_layout_ambiguous(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    shutil.copy(exports["single"].export_dir / "model.safetensors", export_dir / "model.safetensors")

    status, report = run_check(export_dir)

    assert findings(report, "weights-layout-ambiguous") == [(INDEX, None)]
    assert problem_codes(report) == {"weights-layout-ambiguous"}
    assert status == 0


def test_weights_index_missing(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    (export_dir / INDEX).unlink()

    status, report = run_check(export_dir)

    assert findings(report, "weights-index-missing") == [(INDEX, None)]
    assert problem_codes(report) == {"weights-index-missing"}
    assert status == 1


@pytest.mark.parametrize("weight_map", [[], {}, {PROJECTOR: 3}], ids=["list", "empty", "not-a-name"])
def test_weights_index_invalid(exports, tmp_path, run_check, weight_map):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    edit_json(export_dir / INDEX, lambda index: index.update(weight_map=weight_map))

    status, report = run_check(export_dir)

    assert findings(report, "weights-index-invalid") == [(INDEX, "weight_map")]
    assert problem_codes(report) == {"weights-index-invalid"}
    assert status == 1


def test_weights_missing(exports, tmp_path, run_check):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    (export_dir / "model.safetensors").unlink()

    status, report = run_check(export_dir)

    assert findings(report, "weights-missing") == [("model.safetensors", None)]
    assert status == 1


@pytest.mark.parametrize("name", ["pytorch_model.bin", "training/optimizer.pt", "extra.pkl", "last.ckpt"])
def test_weights_pickle_file(exports, tmp_path, run_check, name):
    export_dir = broken_copy(exports["single"].export_dir, tmp_path)
    (export_dir / name).parent.mkdir(exist_ok=True)
    (export_dir / name).write_bytes(b"\x80\x04N.")

    status, report = run_check(export_dir)

    assert findings(report, "pickle-file") == [(name, None)]
    assert problem_codes(report) == {"pickle-file"}
    assert status == 1


def test_weights_symlinked_shards_accepted(exports, tmp_path, run_check):
    # A Hugging Face cache snapshot: every shard is a symbolic link into a blobs folder.
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for shard in sorted(export_dir.glob("model-*.safetensors")):
        shard.rename(blobs / shard.name)
        shard.symlink_to(blobs / shard.name)

    status, report = run_check(export_dir)

    assert problem_codes(report) == set()
    assert status == 0


@pytest.mark.parametrize("file_name", ["/tmp/model.safetensors", "sub/../../model.safetensors", ".."])
def test_weights_escaping_names(exports, tmp_path, run_check, file_name):
    export_dir = broken_copy(exports["sharded"].export_dir, tmp_path)
    edit_json(export_dir / INDEX, lambda index: index["weight_map"].update({PROJECTOR: file_name}))

    status, report = run_check(export_dir)

    assert findings(report, "weights-path-escapes") == [(INDEX, file_name)]
    assert status == 1
