"""Write a real FSDP2 distributed checkpoint from several CPU ranks (gloo), for the DCP tests.

Usage: python fsdp2_writer.py OUT_DIR WORLD_SIZE

Each rank builds the same small model, shards it with `fully_shard` on dim 0, takes one AdamW
step and saves `{"state_dict": ..., "optimizer_0": ...}` with `torch.distributed.checkpoint.save`,
the layout Lightning's ModelParallelStrategy writes. Rank 0 also writes the full (gathered)
model tensors to `OUT_DIR/expected.safetensors` for comparison.

The rows are chosen so that shards are uneven: 7 rows give chunks 4+3 on 2 ranks and 3+3+1 on 3.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


class TinySpeechLM(torch.nn.Module):
    """Parameters named like NeMo SALM's, in float32 and bfloat16, plus a replicated buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(11, 4).to(torch.bfloat16)
        self.llm = torch.nn.Module()
        self.llm.lm_head = torch.nn.Linear(4, 11, bias=False).to(torch.bfloat16)
        self.perception = torch.nn.Module()
        self.perception.proj = torch.nn.Linear(8, 7)
        self.perception.register_buffer("window", torch.hann_window(5))

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        audio = self.perception.proj(features * self.perception.window.sum())
        text = self.llm.lm_head(self.embed_tokens(ids)).float()
        return audio.pow(2).mean() + text.pow(2).mean()


def run_rank(rank: int, world_size: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size
    )
    torch.manual_seed(1234)
    model = TinySpeechLM()
    mesh = init_device_mesh("cpu", (world_size,))
    # FSDP2 groups must have one dtype, so the bf16 and fp32 parts are sharded separately.
    for module in (model.embed_tokens, model.llm.lm_head, model.perception.proj):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    loss = model(torch.randn(3, 8, generator=generator), torch.randint(0, 11, (5,), generator=generator))
    loss.backward()
    optimizer.step()

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save(
        {"state_dict": model_state, "optimizer_0": optimizer_state}, checkpoint_id=f"{out_dir}/checkpoint"
    )

    full = {
        name: (value.full_tensor() if hasattr(value, "full_tensor") else value).contiguous()
        for name, value in model_state.items()
    }
    if rank == 0:
        save_file(full, f"{out_dir}/expected.safetensors")
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown, where gloo's threads occasionally abort a finished rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    out_dir, world_size = Path(sys.argv[1]).resolve(), int(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # fork is safe here: this process has run no torch op (so no thread pool) before forking,
    # and it avoids re-importing torch in every rank.
    mp.start_processes(run_rank, args=(world_size, str(out_dir)), nprocs=world_size, start_method="fork")


if __name__ == "__main__":
    main()
