"""`speechlm-bridge demo`: the whole export path on a tiny random model, offline."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train-shaped checkpoint -> export -> transformers, on a tiny random model",
        description=(
            "Write a tiny SALM-layout checkpoint with random weights as a 2-rank torch.distributed "
            "checkpoint (gloo on CPU), export it, load the export with transformers and transcribe "
            "a bundled audio clip. No network; under a minute on 2 cores."
        ),
    )
    parser.add_argument(
        "--workdir",
        default="speechlm-bridge-demo",
        help=(
            "directory for the demo's files; an empty one or an earlier demo's is replaced, any "
            "other existing one is left alone (default: ./speechlm-bridge-demo)"
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechlm_bridge.demo.run import run_demo

    run_demo(args.workdir)
    return 0
