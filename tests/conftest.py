"""Shared test fixtures: the location of the NeMo and backbone fixtures, offline mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub: everything loads from local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(
    os.environ.get("SPEECHLM_BRIDGE_FIXTURES", _PROJECT_ROOT.parent / "shared" / "fixtures")
).resolve()


def fixture_path(*parts: str) -> Path:
    """Return a path inside the fixtures folder, or skip the test when it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"fixture {path} not found; set SPEECHLM_BRIDGE_FIXTURES to the folder that holds "
            "backbones/ and nemo-salm/"
        )
    return path


@pytest.fixture(scope="session")
def nemo_salm_dir() -> Path:
    return fixture_path("nemo-salm")


@pytest.fixture(scope="session")
def backbones_dir() -> Path:
    return fixture_path("backbones")
