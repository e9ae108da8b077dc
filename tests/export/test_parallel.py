"""Parallel export: worker processes and torchrun ranks write byte-identical directories."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from speechlm_bridge.checkpoints import read_checkpoint
from speechlm_bridge.checkpoints.lazy import TensorRef
from speechlm_bridge.export.parallel import write_shards
from speechlm_bridge.export.pipeline import export_checkpoint
from speechlm_bridge.export.safetensors_writer import plan_shards

CHECKPOINT = "dcp/step=2"
CONFIG = "exp_config_fsdp2.yaml"
# float32 and 1 MB shards turn the fixture's 6 MB of bf16 weights into several shard files.
OPTIONS = {"dtype": "float32", "max_shard_size": "1MB"}


def file_hashes(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())}


def run_torchrun(args: list[str], *, cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
        "-m", "speechlm_bridge.cli", "export", *args, "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, nemo_salm_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    previous = Path.cwd()
    os.chdir(nemo_salm_dir)
    try:
        outputs = {}
        for workers in (1, 2, 3):
            outputs[f"workers={workers}"] = root / f"workers{workers}"
            export_checkpoint(
                CHECKPOINT, config=CONFIG, output=outputs[f"workers={workers}"], workers=workers, progress=False,
                **OPTIONS,
            )
    finally:
        os.chdir(previous)

    outputs["torchrun"] = root / "torchrun"
    result = run_torchrun(
        [CHECKPOINT, "--config", CONFIG, "--output", str(outputs["torchrun"]), "--dtype", "float32",
         "--max-shard-size", "1MB"],
        cwd=nemo_salm_dir,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return outputs


def test_export_has_several_shards(exports):
    index = json.loads((exports["workers=1"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3


@pytest.mark.parametrize("name", ["workers=2", "workers=3", "torchrun"])
def test_parallel_output_byte_identical(exports, name):
    assert file_hashes(exports[name]) == file_hashes(exports["workers=1"])


def test_parallel_values_match_checkpoint(exports, nemo_salm_dir):
    source = read_checkpoint(nemo_salm_dir / CHECKPOINT).state_dict
    index = json.loads((exports["torchrun"] / "model.safetensors.index.json").read_text())
    checks = {
        "language_model.lm_head.weight": "llm.lm_head.weight",
        "language_model.model.embed_tokens.weight": "embed_tokens.weight",
        "audio_projector.weight": "perception.proj.weight",
    }
    for exported_name, source_name in checks.items():
        with safe_open(exports["torchrun"] / index["weight_map"][exported_name], "pt") as handle:
            exported = handle.get_tensor(exported_name)
        assert exported.dtype == torch.float32
        assert torch.equal(exported, source[source_name].float()), exported_name


def test_torchrun_leaves_no_staging(exports):
    assert sorted(path.name for path in exports["torchrun"].parent.iterdir() if path.name.startswith(".")) == []


def test_torchrun_rank0_failure_stops_all(tmp_path, nemo_salm_dir):
    result = run_torchrun(
        [CHECKPOINT, "--config", CONFIG, "--output", str(tmp_path / "out"), "--backbone", str(tmp_path)],
        cwd=nemo_salm_dir,
    )

    assert result.returncode != 0
    assert "has no config.json" in result.stderr
    assert "rank 0 failed before the shards were planned" in result.stderr
    assert not (tmp_path / "out").exists()


def test_workers_must_be_positive(tmp_path):
    from speechlm_bridge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--workers must be a positive integer, got 0"):
        export_checkpoint("unused", output=tmp_path / "out", workers=0)


class SlowLoad(TensorRef):
    """A tensor whose loading marks its worker's pid in a file, then blocks for two minutes."""

    shape = (4,)
    dtype = torch.float32

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def load(self, cache=None):
        import time

        self.marker.write_text(str(os.getpid()))
        time.sleep(120)
        return torch.zeros(4)


@pytest.fixture
def python_sigint_handler():
    """Install Python's own Ctrl-C handler, which an earlier test in the process may have replaced."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_terminates_workers(tmp_path, python_sigint_handler):
    import signal
    import threading
    import time

    markers = [tmp_path / f"worker{number}.pid" for number in range(2)]
    shards = plan_shards({f"w{n}.weight": SlowLoad(marker) for n, marker in enumerate(markers)}, max_shard_size=16)
    assert len(shards) == 2
    output = tmp_path / "out"
    output.mkdir()
    signalled = []

    def interrupt_when_loading() -> None:
        deadline = time.monotonic() + 120
        while not all(marker.exists() for marker in markers) and time.monotonic() < deadline:
            time.sleep(0.05)
        signalled.append(time.monotonic())
        # A real SIGINT, as Ctrl-C sends: it also wakes the main thread from its wait.
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_loading, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        write_shards(shards, output, indices=[0, 1], workers=2)
    stopped = time.monotonic()

    # The workers were killed, not waited for: each blocks for two minutes in its load.
    assert stopped - signalled[0] < 30
    for marker in markers:
        pid = int(marker.read_text())
        while time.monotonic() - stopped < 10:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"worker {pid} still runs 10 s after the interrupt")
