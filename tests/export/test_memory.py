"""Peak memory of the streaming writer: bounded by the largest tensor, not by the shard or model size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

MIB = 2**20
LAYERS = 20
# 20 float32 tensors of 8 MiB and one of 16 MiB: 176 MiB in all, the largest 16 MiB.
LARGEST_BYTES = 16 * MIB
TOTAL_BYTES = LAYERS * 8 * MIB + LARGEST_BYTES
BATCH_BYTES = 8 * MIB
# Room for the allocator, the loader thread and tensor temporaries, well under TOTAL_BYTES.
ALLOWANCE = 40 * MIB

MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from speechlm_bridge.checkpoints import read_checkpoint
    from speechlm_bridge.export import safetensors_writer
    from speechlm_bridge.export.weights import cast_floating, write_safetensors_shards

    checkpoint, output, max_shard_size, dtype = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    safetensors_writer.BATCH_BYTES = int(sys.argv[5])
    state_dict = read_checkpoint(Path(checkpoint), lazy=True).state_dict
    if dtype != "keep":
        state_dict = cast_floating(state_dict, getattr(torch, dtype))

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    # Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS (Linux 4.0+).
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status("VmRSS")
    output.mkdir()
    shards = write_safetensors_shards(state_dict, output, max_shard_size=max_shard_size)
    print(json.dumps({"growth": status("VmHWM") - before, "shards": shards}))
    """
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("memory") / "checkpoint"
    gen = torch.Generator().manual_seed(0)
    state = {f"llm.model.layers.{i}.mlp.weight": torch.randn(2 * MIB // 1024, 1024, generator=gen) for i in range(LAYERS)}
    state["embed_tokens.weight"] = torch.randn(LARGEST_BYTES // 4 // 1024, 1024, generator=gen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"state_dict": state}, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    return directory


def measure(checkpoint: Path, output: Path, *, max_shard_size: int, dtype: str) -> dict:
    # glibc raises its mmap threshold up to 32 MiB after freeing large blocks, so these 8 MiB
    # tensors would be recycled in the heap, which is not returned to the system. A fixed threshold
    # gives them the treatment real multi-MiB weights (above 32 MiB) always get.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkpoint), str(output), str(max_shard_size), dtype, str(BATCH_BYTES)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("max_shard_size", [10**9, 20 * MIB], ids=["one-shard", "many-shards"])
@pytest.mark.parametrize("dtype", ["keep", "bfloat16"], ids=["copied", "cast"])
def test_peak_memory_bounded(checkpoint, tmp_path, max_shard_size, dtype):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")

    measured = measure(checkpoint, tmp_path / "out", max_shard_size=max_shard_size, dtype=dtype)

    # float32 tensors make 11 shards of at most 20 MiB, their bfloat16 casts 5.
    expected_shards = {10**9: 1, 20 * MIB: 11 if dtype == "keep" else 5}[max_shard_size]
    assert measured["shards"] == expected_shards
    bound = LARGEST_BYTES + 2 * BATCH_BYTES + ALLOWANCE
    assert measured["growth"] < bound, f"peak RSS grew {measured['growth'] / MIB:.0f} MiB; bound {bound / MIB:.0f} MiB"
    assert measured["growth"] < TOTAL_BYTES / 2


def test_cast_output_values(checkpoint, tmp_path):
    measure(checkpoint, tmp_path / "out", max_shard_size=10**9, dtype="bfloat16")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        written = handle.get_tensor("embed_tokens.weight")
    state = {"state_dict": {"embed_tokens.weight": torch.empty(LARGEST_BYTES // 4 // 1024, 1024)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(checkpoint), no_dist=True)
    assert written.dtype == torch.bfloat16
    assert torch.equal(written, state["state_dict"]["embed_tokens.weight"].to(torch.bfloat16))
