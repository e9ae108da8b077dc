"""Safe `torch.load` of Lightning checkpoints and plain state-dict files.

Every pickle goes through `torch.load(weights_only=True)`, so a checkpoint cannot run code while
it is read. Beyond torch's own allowlist (tensors, dtypes, `OrderedDict`, ...) only OmegaConf's
container types are accepted, and only when omegaconf is installed.

Why OmegaConf and nothing else: a Lightning 2.4 checkpoint written by NeMo's SALM and a
Lightning 2.6 checkpoint with ModelCheckpoint, EarlyStopping and LearningRateMonitor state both
load with torch's defaults alone, because their hyper-parameters are plain dicts. A LightningModule
that calls `save_hyperparameters` with an OmegaConf `DictConfig` (Hydra training scripts, NeMo
`ModelPT` models) pickles `DictConfig`, `ListConfig`, `ContainerMetadata`, `Metadata`, `AnyNode`,
`typing.Any`, `builtins.dict/list/int` and `collections.defaultdict` (measured with Lightning 2.6.6
and omegaconf 2.4.0). Rebuilding those runs only OmegaConf's own `__setstate__`. Typed nodes that
point at user classes (structured configs, enums) stay rejected.
"""

from __future__ import annotations

import collections
import logging
import pickle
import struct
import typing
import zipfile
from pathlib import Path
from typing import Any

import torch

from speechlm_bridge.errors import CheckpointError

logger = logging.getLogger(__name__)

_REWRITE_HINT = (
    "To convert it, load it once in the environment that wrote it and keep only the weights, e.g. "
    "`ckpt = torch.load(path, weights_only=False); "
    "torch.save({'state_dict': ckpt['state_dict']}, 'weights.pt')`, or save them with safetensors."
)


def load_torch_file(path: Path) -> Any:
    """Unpickle a torch checkpoint file with `weights_only=True` and tensors memory-mapped.

    With `mmap=True` the tensor bytes stay on disk until a tensor is used, so optimizer states in
    a Lightning checkpoint are mapped but not read, apart from the kernel's readahead around the
    weights. Files in torch's pre-1.6 (non-zip) format cannot be memory-mapped and are read whole.

    Raises:
        CheckpointError: the file is unreadable, truncated, or pickles a type outside the allowlist.
    """
    use_mmap = zipfile.is_zipfile(path)
    if not use_mmap:
        _check_legacy_header(path)
        logger.debug("%s is not in torch's zip format, so it is loaded without mmap", path)

    try:
        with torch.serialization.safe_globals(_extra_safe_globals()):
            return torch.load(path, weights_only=True, mmap=use_mmap, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise _unsafe_global_error(path, err) from err
    # The weights-only unpickler reports a damaged pickle stream as whichever error the bad opcode
    # triggers, hence the wide tuple.
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        struct.error,
    ) as err:
        raise CheckpointError(
            f"Cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)}). "
            "The file is truncated, corrupt or not written by torch.save. Check that the copy "
            "finished and that the size matches the original."
        ) from err


def _check_legacy_header(path: Path) -> None:
    # torch.save's pre-1.6 format starts with a pickle (protocol 2: b"\x80\x02"), and the current
    # format is a zip archive. Anything else is not a torch checkpoint.
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"PK":
        raise CheckpointError(
            f"Cannot read {path} as a PyTorch checkpoint: it starts like a zip archive but has no "
            "zip central directory, so it is truncated. Copy it again and compare its size with "
            "the original."
        )
    if len(head) < 2 or head[0] != 0x80:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint: it is neither a zip archive (torch.save since "
            "torch 1.6) nor a legacy pickle. Check that the path points at the checkpoint file and "
            "that the copy finished."
        )


def allowed_extra_globals() -> list[str]:
    """Return the qualified names allowlisted on top of torch's defaults (empty without omegaconf)."""
    return [f"{obj.__module__}.{obj.__qualname__}" for obj in _extra_safe_globals()]


def _extra_safe_globals() -> list[Any]:
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode
    except ImportError:
        return []
    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        FloatNode,
        IntegerNode,
        StringNode,
        typing.Any,
        # OmegaConf's Metadata stores the container's type (`object_type=dict`) and its defaultdict
        # of flags. Rebuilding these builtins constructs plain values.
        dict,
        list,
        int,
        float,
        str,
        bool,
        collections.defaultdict,
    ]


def _unsafe_global_error(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError):
        names = []
    allowed = set(allowed_extra_globals())
    blocked = sorted(name for name in names if name not in allowed)
    if not blocked:
        return CheckpointError(
            f"Cannot unpickle {path} with torch.load(weights_only=True): {_last_line(err)} {_REWRITE_HINT}"
        )

    if allowed:
        extra = "OmegaConf containers"
    else:
        extra = "nothing, since omegaconf (whose containers it would accept) is not installed"
    message = (
        f"{path} pickles objects of types that are not allowed for safe loading: "
        f"{', '.join(blocked)}. speechlm-bridge loads checkpoints with "
        "torch.load(weights_only=True) so that a file cannot run code, and beyond torch's defaults it "
        f"allows {extra}."
    )
    if any(name.startswith("omegaconf.") for name in blocked) and not allowed:
        message += (
            " The checkpoint stores hyper-parameters as an OmegaConf DictConfig: "
            "`pip install omegaconf` and run again."
        )
    else:
        message += f" {_REWRITE_HINT}"
    return CheckpointError(message)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
