"""`speechlm-bridge export`: a training checkpoint to a self-contained Hugging Face directory."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a training checkpoint to a Hugging Face directory",
        description=(
            "Export a NeMo SALM training checkpoint (Lightning .ckpt, state-dict .pt, .safetensors, "
            "a torch.distributed checkpoint directory, or a NeMo save_pretrained / to_hf directory) "
            "into one directory that transformers loads offline. Nothing is downloaded: the backbone "
            "and ASR locations named in the config must be local, or be given with --backbone / --asr."
        ),
    )
    parser.add_argument("checkpoint", help="checkpoint file or directory")
    parser.add_argument(
        "--config",
        help=(
            "experiment YAML saved by training (its model: section is read); optional when the "
            "checkpoint stores its config (Lightning .ckpt, NeMo directories)"
        ),
    )
    parser.add_argument("--output", required=True, help="directory to write; must not exist unless --overwrite")
    parser.add_argument(
        "--backbone",
        help="local backbone directory (config.json + tokenizer); overrides model.pretrained_llm",
    )
    parser.add_argument(
        "--asr",
        help=(
            "local NeMo ASR model (.nemo) whose preprocessor and encoder config the training used; "
            "overrides model.pretrained_asr, needed only when the config lacks perception.encoder"
        ),
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the exported floating-point weights; auto keeps the checkpoint's (default: auto)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        type=_shard_size,
        help="largest safetensors shard, at least 1MB, e.g. 5GB, 500MB or 2GiB (default: 5GB)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help=(
            "processes that write safetensors shards in parallel, each writing whole files; under "
            "torchrun this many per rank (default: 1)"
        ),
    )
    parser.add_argument(
        "--skip-check",
        action="store_true",
        help=(
            "move the export into place even when `speechlm-bridge check` finds errors in it "
            "(by default those stop the export and nothing is written)"
        ),
    )
    parser.add_argument(
        "--quiet", action="store_true", help="hide the per-shard progress bars (shown when stderr is a terminal)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=(
            "replace --output if it is an earlier export or empty; other directories, and ones that "
            "contain an input or the working directory, are never deleted"
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechlm_bridge.export.pipeline import export_checkpoint

    try:
        result = export_checkpoint(
            args.checkpoint,
            output=args.output,
            config=args.config,
            backbone=args.backbone,
            asr=args.asr,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            workers=args.workers,
            # None: bars only when stderr is a terminal.
            progress=False if args.quiet else None,
            check=not args.skip_check,
        )
    except Exception:
        raise
    except BaseException:
        # Ctrl-C or SIGTERM. The staging directory is gone by now, so report what is left.
        print(f"export stopped: {args.output} is unchanged and no partial export was left; run the command again",
              file=sys.stderr)
        raise
    print(
        f"exported {result.checkpoint_format} checkpoint to {result.output_dir}: {result.tensors} tensors, "
        f"{result.parameters:,} parameters in {result.shards} safetensors file(s), {result.dtype}, "
        f"backbone family {result.backbone_family}, audio token id {result.audio_token_id}, "
        f"{'tied' if result.tie_word_embeddings else 'untied'} embeddings"
    )
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _shard_size(value: str) -> int:
    from speechlm_bridge.errors import ConfigError
    from speechlm_bridge.export.shard_size import parse_shard_size

    try:
        return parse_shard_size(value)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"invalid count {value!r}; give a positive integer")
    return number
