"""Fixtures for the checkpoint tests: the NeMo fixture manifest and a tensor digest matching it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def _digest(tensor: torch.Tensor) -> str:
    # manifest.json stores sha256[:16] of the tensor's raw little-endian bytes in its own dtype.
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


@pytest.fixture
def digest() -> Callable[[torch.Tensor], str]:
    return _digest


@pytest.fixture
def manifest(nemo_salm_dir: Path) -> dict:
    """Per artifact: `{name: {"shape", "dtype", "sha256"}}`, as the fixture generator recorded it."""
    artifacts = json.loads((nemo_salm_dir / "manifest.json").read_text())["artifacts"]
    return {name: entry["tensors"] for name, entry in artifacts.items()}
