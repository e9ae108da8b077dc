"""Write an output directory all at once: build it beside the target, then rename it into place."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from speechlm_bridge.errors import SpeechLMBridgeError

logger = logging.getLogger(__name__)


def check_output_dir(output: Path, *, overwrite: bool) -> None:
    """Fail early, before any work, when `output` exists and may not be replaced."""
    if output.exists() and not overwrite:
        raise SpeechLMBridgeError(
            f"output directory {output} already exists. Choose another --output or pass --overwrite "
            "to replace it."
        )
    if output.exists() and not output.is_dir():
        raise SpeechLMBridgeError(f"output {output} exists and is not a directory; remove it or choose another --output")


@contextlib.contextmanager
def staged_output_dir(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory next to `output`; on success it replaces `output`.

    On any error the temporary directory is removed and `output` is left as it was, so a failed
    export never leaves a half-written model behind. The rename stays on one filesystem.
    """
    check_output_dir(output, overwrite=overwrite)
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
