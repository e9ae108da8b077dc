"""The `speechlm-bridge` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys

from speechlm_bridge import __version__
from speechlm_bridge.errors import SpeechLMBridgeError

logger = logging.getLogger(__name__)

# Each module defines `register(subparsers)`; a subcommand imports its heavy dependencies
# (torch, transformers) only when it runs, so `--help` stays fast.
_SUBCOMMAND_MODULES = (
    "speechlm_bridge.cli.check",
    "speechlm_bridge.cli.demo",
    "speechlm_bridge.cli.export",
    "speechlm_bridge.cli.render",
    "speechlm_bridge.cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechlm-bridge",
        description=(
            "Render speech-LLM training samples from the backbone's own chat template, export "
            "training checkpoints to self-contained Hugging Face directories, check exports, and "
            "serve them with vLLM."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    # Accept -v after the subcommand too; SUPPRESS keeps a top-level -v from being reset.
    for subparser in subparsers.choices.values():
        subparser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own steps at INFO, other libraries only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("speechlm_bridge").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # A terminated export must clean up its staging directory like an interrupted one does.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status = args.func(args)
    except SpeechLMBridgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # The reader went away (`render --json | head`): stop quietly, as Unix filters do, and
        # keep Python from reporting the pipe again while it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(status or 0)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `finally` and context managers run."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
