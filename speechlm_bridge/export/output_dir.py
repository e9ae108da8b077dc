"""Write an output directory all at once: build it beside the target, then rename it into place."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from speechlm_bridge.errors import SpeechLMBridgeError
from speechlm_bridge.modeling.configuration import MODEL_TYPE

logger = logging.getLogger(__name__)


def check_output_dir(output: Path, *, overwrite: bool, inputs: Iterable[Path | None] = ()) -> None:
    """Fail early, before any work, when `output` exists and may not be replaced.

    `--overwrite` replaces only an empty directory or an earlier export (a config.json with
    `model_type: speechlm_bridge`), and never a directory that contains the working directory or
    one of `inputs`: a mistyped --output must not delete a checkpoint or a home directory.
    """
    if not output.exists():
        return
    if not output.is_dir():
        raise SpeechLMBridgeError(f"output {output} exists and is a file, not a directory; choose another --output")
    if not overwrite:
        raise SpeechLMBridgeError(
            f"output directory {output} already exists. Choose another --output or pass --overwrite "
            "to replace an earlier export."
        )

    if _is_within(Path.cwd(), output):
        raise SpeechLMBridgeError(
            f"--output {output} is the working directory or contains it; --overwrite would delete it. "
            "Choose a new directory for the export."
        )
    for path in inputs:
        if path is not None and _is_within(Path(path), output):
            raise SpeechLMBridgeError(
                f"--output {output} contains the input {path}; --overwrite would delete it. Choose a "
                "directory outside the checkpoint, config, backbone and ASR model."
            )
    if any(output.iterdir()) and not _is_export(output):
        raise SpeechLMBridgeError(
            f"--overwrite replaces only an earlier speechlm-bridge export, and {output} is not one "
            f"(no config.json with model_type {MODEL_TYPE!r}). Remove it yourself or choose another --output."
        )


def _is_within(path: Path, directory: Path) -> bool:
    # Both the spelled-out and the symlink-resolved forms count: an input reached through a link
    # inside `directory` is deleted with it.
    for candidate in {Path(os.path.abspath(path)), path.resolve()}:
        for container in {Path(os.path.abspath(directory)), directory.resolve()}:
            if candidate == container or container in candidate.parents:
                return True
    return False


def _is_export(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


@contextlib.contextmanager
def staged_output_dir(output: Path, *, overwrite: bool, inputs: Iterable[Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to `output`; on success it replaces `output`.

    On any error the temporary directory is removed and `output` is left as it was, so a failed
    export never leaves a half-written model behind. The rename stays on one filesystem.
    """
    check_output_dir(output, overwrite=overwrite, inputs=inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    _apply_default_permissions(staging)
    previous = None
    if output.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.previous-", dir=output.parent))
        previous.rmdir()
        output.rename(previous)
    staging.rename(output)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
        logger.info("replaced the previous contents of %s", output)


def _apply_default_permissions(directory: Path) -> None:
    # mkdtemp creates the directory as 0700 and some writers create files as 0600; give the
    # export the modes a plain mkdir/open would have under the current umask.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
