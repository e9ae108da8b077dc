"""Wall time and peak RSS of `speechlm-bridge export` on synthetic FSDP2 checkpoints, against
`cp -r` of the same bytes and two load-everything references, measured in the same run.

    python bench/bench_export.py [--sizes 1 4] [--repeats 3] [--workdir /tmp/bench-export]

For each size (GB of bf16 model weights) the script writes a NeMo SALM checkpoint with 4 gloo
ranks: every parameter is a DTensor sharded on dim 0, saved with torch.distributed.checkpoint
under `state_dict.`, as Lightning's ModelParallelStrategy (FSDP2) writes it. The backbone is a
Qwen3 config scaled to the size (hidden 2048, untied embeddings as FSDP2 leaves them) with the
demo's tokenizer. The audio encoder is the demo's. There is no optimizer state, so `cp -r`
copies exactly the model bytes.

Each method then runs in its own subprocess, in turn within each round, `--repeats` rounds, after
`sync` so that no run starts with dirty pages of the one before:
- `cp -r` of the checkpoint directory;
- the interpreter start-up and imports of the export command alone;
- `speechlm-bridge export --quiet`: 1 worker with the default 5GB shards (one file), and 1 and 2
  workers with 1GB shards;
- the same export as a library call (`export_checkpoint`), timed inside its process after the
  imports;
- (a) build the model on the meta device, read the whole state dict, `load_state_dict(assign=True)`,
  `save_pretrained`;
- (b) `torch.distributed.checkpoint.format_utils.dcp_to_torch_save`, then load that file and
  save it with `huggingface_hub.save_torch_state_dict`.
Wall time includes interpreter start-up and imports, except for the library call. Peak RSS is
`ru_maxrss` from `wait4`, which covers the subprocess and the worker processes it waited for (the
largest single process). The page cache is warm after the first round (dropping it needs root).
Prints a Markdown table of medians, with ratios to `cp -r` taken within each round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 2048
# Per size: (vocab rows, decoder layers). A layer is 50.3M parameters, an embedding table
# vocab x 2048, and the LM head another one: 1 GB ~ 7 layers + 2 x 32768 rows, 4 GB ~ 28 layers +
# 2 x 151936 rows (Qwen3's vocabulary).
# Size 0 (about 0.1 GB) checks the script quickly.
GEOMETRY = {0: (4096, 1), 1: (32768, 7), 4: (151936, 28)}
RANKS = 4
START_UP = "start-up only (imports of the export command)"
# The same export as "export, 1 worker", timed inside its process around the library call, after
# the imports the start-up row measures.
IN_PROCESS = "export, 1 worker, library call after imports"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4], choices=sorted(GEOMETRY))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-export")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints for another run")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        return _run_method(args.run, json.loads(args.args))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for size in args.sizes:
        case_dir = args.workdir / f"{size}gb"
        checkpoint = case_dir / "checkpoint"
        if not (checkpoint / ".metadata").is_file():
            started = time.monotonic()
            # In a subprocess: a child forked from a parent that imported torch would inherit its
            # peak RSS, which Linux keeps across exec.
            _timed([sys.executable, __file__, "--run", "write", "--args", json.dumps([str(case_dir), size])],
                   cwd=PROJECT_ROOT)
            print(f"wrote {checkpoint} in {time.monotonic() - started:.0f} s", flush=True)
        results[size] = measure_case(case_dir, repeats=args.repeats)
        print_table(size, case_dir, results[size])
        if not args.keep:
            shutil.rmtree(case_dir, ignore_errors=True)
    return 0


# --- measuring -------------------------------------------------------------------------------------


def measure_case(case_dir: Path, *, repeats: int) -> dict[str, list[tuple[float, int]]]:
    checkpoint = case_dir / "checkpoint"
    config = case_dir / "exp_config.yaml"
    python = sys.executable
    export = [python, "-m", "speechlm_bridge.cli", "export", str(checkpoint), "--config", str(config), "--output", "{out}",
              "--quiet"]
    commands = {
        "cp -r": ["cp", "-r", str(checkpoint), "{out}"],
        START_UP: [
            python, "-c", "import speechlm_bridge.cli, speechlm_bridge.export.pipeline, speechlm_bridge.check, "
            "librosa.filters"
        ],
        "export, 1 worker": export,
        IN_PROCESS: [
            python, __file__, "--run", "in_process", "--args",
            json.dumps({"checkpoint": str(checkpoint), "config": str(config), "output": "{out}"}),
        ],
        "export, 1 worker, 1GB shards": [*export, "--max-shard-size", "1GB"],
        "export, 2 workers, 1GB shards": [*export, "--max-shard-size", "1GB", "--workers", "2"],
        "(a) model + load_state_dict + save_pretrained": [
            python, __file__, "--run", "model", "--args",
            json.dumps({"checkpoint": str(checkpoint), "config": str(config), "output": "{out}"}),
        ],
        "(b) dcp_to_torch_save + safetensors save": [
            python, __file__, "--run", "dcp_to_torch_save",
            "--args", json.dumps({"checkpoint": str(checkpoint), "output": "{out}"}),
        ],
    }
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for round_number in range(repeats):
        for name, command in commands.items():
            out = case_dir / "out"
            shutil.rmtree(out, ignore_errors=True)
            # Every method starts without dirty pages from the one before; none of them syncs.
            os.sync()
            seconds, peak_kb, stdout = _timed([part.replace("{out}", str(out)) for part in command], cwd=case_dir)
            if name == IN_PROCESS:
                seconds = json.loads(stdout.splitlines()[-1])["export_seconds"]
            samples[name].append((seconds, peak_kb))
            print(f"  round {round_number + 1}: {name}: {seconds:.1f} s, peak RSS {peak_kb / 1024:.0f} MB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return samples


def _timed(command: list[str], *, cwd: Path) -> tuple[float, int, str]:
    """Run `command`; return its wall time, peak RSS in KiB and stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr.read().decode(errors='replace')[-3000:]}")
        return seconds, usage.ru_maxrss, stdout.read().decode(errors="replace")


def print_table(size: int, case_dir: Path, samples: dict[str, list[tuple[float, int]]]) -> None:
    """Print medians. Ratios to `cp -r` are medians of the ratios within each round, so that a
    slow round (another job on the machine) slows both sides of its ratios."""
    vocab, layers = GEOMETRY[size]
    largest = vocab * HIDDEN * 2
    copies = [seconds for seconds, _ in samples["cp -r"]]
    start_ups = [seconds for seconds, _ in samples[START_UP]]
    print(f"\n{size} GB case: hidden {HIDDEN}, {layers} layers, vocab {vocab}, largest tensor "
          f"{largest / 2**20:.0f} MiB; medians of {len(copies)} runs\n")
    print("| method | wall time | vs cp -r | wall time - start-up, vs cp -r | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in samples.items():
        seconds = [s for s, _ in runs]
        ratio = statistics.median(s / c for s, c in zip(seconds, copies))
        peak = statistics.median(kb for _, kb in runs) / 1024
        work = ""
        if name.startswith("export") and name != IN_PROCESS:
            work = f"{statistics.median((s - u) / c for s, u, c in zip(seconds, start_ups, copies)):.2f}x"
        print(f"| {name} | {statistics.median(seconds):.2f} s | {ratio:.2f}x | {work} | {peak:,.0f} MiB |")
    print(flush=True)


# --- the reference methods, each run in its own subprocess ------------------------------------------


def _run_method(method: str, options) -> int:
    import torch

    if method == "write":
        write_synthetic_checkpoint(Path(options[0]), options[1])
        return 0

    if method == "in_process":
        # The modules the export imports on its way (check, the model class for the audit, the
        # mel filterbank) are imported first, so that the timed call is the export's own work.
        import librosa.filters  # noqa: F401

        import speechlm_bridge.check  # noqa: F401
        import speechlm_bridge.modeling.modeling  # noqa: F401
        from speechlm_bridge.export.pipeline import export_checkpoint

        started = time.monotonic()
        export_checkpoint(options["checkpoint"], config=options["config"], output=options["output"], progress=False)
        print(json.dumps({"export_seconds": time.monotonic() - started}))
        return 0

    if method == "dcp_to_torch_save":
        from huggingface_hub import save_torch_state_dict
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        output = Path(options["output"])
        output.mkdir(parents=True)
        torch_file = output / "consolidated.pt"
        dcp_to_torch_save(options["checkpoint"], torch_file)
        state_dict = torch.load(torch_file, weights_only=True, mmap=True)["state_dict"]
        save_torch_state_dict(state_dict, output, max_shard_size="5GB")
        torch_file.unlink()
        return 0

    if method == "model":
        from speechlm_bridge.modeling.modeling import SpeechLMBridgeForConditionalGeneration

        state_dict, config = _converted_state_dict(options)
        with torch.device("meta"):
            model = SpeechLMBridgeForConditionalGeneration(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        del state_dict
        model.save_pretrained(options["output"], max_shard_size="5GB")
        return 0
    raise SystemExit(f"unknown method {method}")


def _converted_state_dict(options: dict) -> tuple[dict, object]:
    """Read the whole checkpoint into memory and rename it with the export's own conversion.

    The config comes from `config-only/`, an export whose weights were deleted, so the reference
    differs from the export only in how the weights reach the disk.
    """
    from transformers import AutoConfig

    import speechlm_bridge  # noqa: F401  (registers the config class)
    from speechlm_bridge.backbones import backbone_family_for, read_backbone_config
    from speechlm_bridge.checkpoints import read_checkpoint, split_salm_state_dict
    from speechlm_bridge.export.experiment import read_experiment_config
    from speechlm_bridge.export.perception_config import export_perception
    from speechlm_bridge.export.weights import language_model_state_dict

    export_dir = Path(options["output"]).parent / "config-only"
    config = AutoConfig.from_pretrained(export_dir)
    experiment = read_experiment_config(options["config"])
    loaded = read_checkpoint(options["checkpoint"])
    backbone_dir = Path(options["config"]).parent / "backbone"
    text_config = read_backbone_config(backbone_dir)
    family = backbone_family_for(text_config)
    salm = split_salm_state_dict(loaded.state_dict, lora_config=None)
    perception = export_perception(experiment, salm.perception, asr_override=None, search_dirs=[])
    state_dict = language_model_state_dict(
        salm.llm, family=family, tie_word_embeddings=salm.tie_word_embeddings, text_config=text_config,
        audio_token_id=config.audio_token_id,
    )
    state_dict.update(perception.state_dict)
    return state_dict, config


# --- the synthetic checkpoint --------------------------------------------------------------------------


def write_synthetic_checkpoint(case_dir: Path, size: int) -> None:
    """Write backbone/, exp_config.yaml, checkpoint/ (DCP by 4 gloo ranks) and config-only/."""
    import torch.multiprocessing as mp

    from speechlm_bridge.demo.backbone import write_demo_backbone
    from speechlm_bridge.demo.training_run import write_experiment_config

    vocab, layers = GEOMETRY[size]
    case_dir.mkdir(parents=True, exist_ok=True)
    backbone = write_demo_backbone(case_dir / "backbone", hidden_size=HIDDEN)
    backbone.update(
        vocab_size=vocab, num_hidden_layers=layers, intermediate_size=3 * HIDDEN, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, dtype="bfloat16",
    )
    (case_dir / "backbone" / "config.json").write_text(json.dumps(backbone, indent=2) + "\n")
    write_experiment_config(case_dir / "exp_config.yaml", backbone_dir="backbone", hidden_size=HIDDEN)

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rendezvous = case_dir / ".rendezvous"
    rendezvous.unlink(missing_ok=True)
    mp.start_processes(_write_rank, args=(str(case_dir), backbone, str(rendezvous)), nprocs=RANKS, start_method="spawn")
    rendezvous.unlink(missing_ok=True)
    _write_config_only(case_dir)


def _write_rank(rank: int, case_dir: str, backbone: dict, rendezvous: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from speechlm_bridge.demo.training_run import random_salm_state_dict, write_experiment_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=RANKS)
    mesh = init_device_mesh("cpu", (RANKS,))
    generator = torch.Generator().manual_seed(rank)

    shapes = _llm_shapes(backbone)
    # The audio side comes from the demo model with a one-layer, small-vocabulary LM of the same
    # hidden size (its LM weights are discarded).
    small = {**backbone, "num_hidden_layers": 1, "vocab_size": 1024}
    model_config = write_experiment_config(Path(case_dir) / ".unused.yaml", backbone_dir="backbone", hidden_size=HIDDEN)
    perception = {
        key: tensor.to(torch.bfloat16) if tensor.is_floating_point() and "featurizer" not in key else tensor
        for key, tensor in random_salm_state_dict(small, model_config, seed=0).items()
        if key.startswith("perception.")
    }

    state: dict[str, DTensor] = {}
    for name, shape in shapes.items():
        rows = -(-shape[0] // RANKS)
        local_rows = max(0, min(rows, shape[0] - rank * rows))
        local = (torch.randn((local_rows, *shape[1:]), generator=generator) * 0.02).to(torch.bfloat16)
        state[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                         stride=torch.empty(shape, device="meta").stride())
    for name, tensor in perception.items():
        chunks = list(torch.chunk(tensor, RANKS, dim=0)) if tensor.dim() else [tensor] * RANKS
        local = chunks[rank] if rank < len(chunks) else tensor[:0]
        state[name] = DTensor.from_local(local.contiguous(), mesh, [Shard(0)], run_check=False,
                                         shape=tensor.shape, stride=tensor.stride()) if tensor.dim() else tensor
    dcp.save({"state_dict": state}, checkpoint_id=Path(case_dir) / "checkpoint")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _llm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    shapes = {"embed_tokens.weight": (config["vocab_size"], hidden)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"llm.model.layers.{layer}."
        shapes.update({
            prefix + "self_attn.q_proj.weight": (q_rows, hidden),
            prefix + "self_attn.k_proj.weight": (kv_rows, hidden),
            prefix + "self_attn.v_proj.weight": (kv_rows, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q_rows),
            prefix + "self_attn.q_norm.weight": (head_dim,),
            prefix + "self_attn.k_norm.weight": (head_dim,),
            prefix + "mlp.gate_proj.weight": (config["intermediate_size"], hidden),
            prefix + "mlp.up_proj.weight": (config["intermediate_size"], hidden),
            prefix + "mlp.down_proj.weight": (hidden, config["intermediate_size"]),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["llm.model.norm.weight"] = (hidden,)
    shapes["llm.lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def _write_config_only(case_dir: Path) -> None:
    """Export once and keep only the configs and tokenizer, for reference (a)'s model class."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    subprocess.run(
        [sys.executable, "-m", "speechlm_bridge.cli", "export", "checkpoint", "--config", "exp_config.yaml",
         "--output", "config-only", "--quiet"],
        cwd=case_dir, env=env, check=True, stdout=subprocess.DEVNULL,
    )
    for path in (case_dir / "config-only").glob("model*.safetensors*"):
        path.unlink()


if __name__ == "__main__":
    sys.exit(main())
