"""`speechlm-bridge render`: show or export the training samples of a JSONL file of dialogs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from speechlm_bridge.errors import SpeechLMBridgeError

if TYPE_CHECKING:
    from rich.console import Console

    from speechlm_bridge.prompts import ChatFormatter, TrainingSample

# Markers around loss spans when the console has no colors (output piped to a file or less).
_SPAN_OPEN = "⟦"
_SPAN_CLOSE = "⟧"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render",
        help="render training samples from the backbone's chat template, with their loss spans",
        description=(
            "Render each dialog of a JSONL file with the tokenizer's chat template into exact "
            "training samples. Without --json, print the text with the loss spans highlighted; "
            "with --json, print one JSON line per sample. Exits with status 1 if any dialog "
            "cannot be encoded exactly, after processing all of them."
        ),
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="tokenizer directory, or an exported speech-LLM directory",
    )
    parser.add_argument(
        "--messages",
        required=True,
        metavar="FILE",
        help=(
            "JSONL file with one dialog per line: a list of messages, or "
            '{"messages": [...], "kwargs": {...}} with template kwargs for that dialog; '
            "'-' reads standard input"
        ),
    )
    parser.add_argument(
        "--loss-on",
        choices=("last", "all"),
        default=None,
        help="assistant turns that carry loss (default: the prompt format's, 'last' when generic)",
    )
    parser.add_argument(
        "--enable-thinking",
        type=_parse_bool,
        default=None,
        metavar="true|false",
        help="pass enable_thinking to the chat template (default: leave it to the template)",
    )
    parser.add_argument(
        "--prompt-format",
        default=None,
        metavar="NAME",
        help=(
            "NeMo prompt_format name that sets the defaults (qwen, qwen3, nemotron-nano-v3, ...; "
            "default: config.json's prompt_format in DIR, else tokenizer_chat_template)"
        ),
    )
    parser.add_argument(
        "--audio-locator-tag",
        default=None,
        metavar="TAG",
        help=(
            "special token that marks an audio input, added to the tokenizer if missing "
            "(default: config.json's or the tokenizer's)"
        ),
    )
    parser.add_argument(
        "--template-kwargs",
        type=_parse_json_object,
        default=None,
        metavar="JSON",
        help='template kwargs for every dialog, e.g. \'{"date_string": "26 Jul 2024"}\'',
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help=(
            "print one JSON line per training sample (dialog_index, input_ids, loss_mask, "
            "context_ids, answer_ids, spans, audio_positions), or {dialog_index, error}"
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechlm_bridge.errors import PromptError
    from speechlm_bridge.prompts import ChatFormatter
    from speechlm_bridge.prompts.formatter import split_dialog_item

    template_kwargs = dict(args.template_kwargs or {})
    if args.enable_thinking is not None:
        template_kwargs["enable_thinking"] = args.enable_thinking
    formatter = ChatFormatter.from_pretrained(
        args.tokenizer,
        prompt_format=args.prompt_format,
        audio_locator_tag=args.audio_locator_tag,
        template_kwargs=template_kwargs,
        loss_on=args.loss_on,
    )
    writer = _JsonWriter(sys.stdout) if args.json else _RichWriter(formatter)

    failed = 0
    total = 0
    warned_tag = False
    for dialog_index, line in _read_lines(args.messages):
        total += 1
        if formatter.audio_locator_tag is None and not warned_tag and "<|audio" in line:
            warned_tag = True
            print(
                f"warning: {args.tokenizer} has no audio locator tag, so text such as <|audio|> is "
                "tokenized as plain text; pass --audio-locator-tag with the tag training used",
                file=sys.stderr,
            )
        try:
            item = _parse_line(dialog_index, line)
            messages, dialog_kwargs = split_dialog_item(item)
            samples = formatter.encode(messages, **dialog_kwargs)
        except PromptError as err:
            failed += 1
            writer.error(dialog_index, str(err))
            continue
        for number, sample in enumerate(samples, start=1):
            sample.dialog_index = dialog_index
            writer.sample(sample, number=number, count=len(samples))

    if total == 0:
        raise SpeechLMBridgeError(
            f"{args.messages} has no dialogs; write one JSON dialog per line (a list of messages or "
            '{"messages": [...], "kwargs": {...}})'
        )
    if failed:
        where = "the error lines of the JSON output" if args.json else "the errors above"
        print(
            f"error: {failed} of {total} dialog(s) could not be encoded exactly; see {where} "
            "(by dialog_index, the 0-based line number in the file)",
            file=sys.stderr,
        )
        return 1
    return 0


class _JsonWriter:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def sample(self, sample: TrainingSample, *, number: int, count: int) -> None:
        self._write(sample.to_dict())

    def error(self, dialog_index: int, message: str) -> None:
        self._write({"dialog_index": dialog_index, "error": message})

    def _write(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


class _RichWriter:
    """Decoded text of each sample, loss spans highlighted (or bracketed without colors)."""

    def __init__(self, formatter: ChatFormatter) -> None:
        from rich.console import Console

        self._tokenizer = formatter.tokenizer
        self._console: Console = Console(highlight=False, soft_wrap=True)

    def sample(self, sample: TrainingSample, *, number: int, count: int) -> None:
        from rich.text import Text

        spans = ", ".join(
            f"turn {span.turn_index} [{span.start}:{span.end}]" for span in sample.spans
        )
        loss_tokens = sum(sample.loss_mask)
        self._console.rule(
            f"dialog {sample.dialog_index}, sample {number}/{count}: "
            f"{len(sample.input_ids)} tokens, {loss_tokens} in loss spans ({spans})",
            align="left",
        )
        plain = self._console.color_system is None
        text = Text()
        position = 0
        for span in sample.spans:
            text.append(self._decode(sample.input_ids[position : span.start]))
            answer = self._decode(sample.input_ids[span.start : span.end])
            if plain:
                answer = f"{_SPAN_OPEN}{answer}{_SPAN_CLOSE}"
            text.append(answer, style="bold black on green")
            position = span.end
        self._console.print(text)

    def error(self, dialog_index: int, message: str) -> None:
        from rich.text import Text

        self._console.rule(f"dialog {dialog_index}: error", align="left", style="red")
        self._console.print(Text(message, style="red"))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield `(line_index, line)` for the non-blank lines of a file, or of stdin for '-'."""
    if path == "-":
        yield from _non_blank(sys.stdin)
        return
    file_path = Path(path)
    try:
        with file_path.open(encoding="utf-8") as stream:
            yield from _non_blank(stream)
    except FileNotFoundError as err:
        raise SpeechLMBridgeError(
            f"messages file {file_path} not found; pass a JSONL file with one dialog per line"
        ) from err
    except IsADirectoryError as err:
        raise SpeechLMBridgeError(
            f"--messages {file_path} is a directory; pass a JSONL file with one dialog per line"
        ) from err
    except UnicodeDecodeError as err:
        raise SpeechLMBridgeError(
            f"messages file {file_path} is not UTF-8 text ({err}); write the JSONL file as UTF-8"
        ) from err


def _non_blank(stream: TextIO) -> Iterator[tuple[int, str]]:
    for index, line in enumerate(stream):
        if line.strip():
            yield index, line


def _parse_line(dialog_index: int, line: str) -> Any:
    from speechlm_bridge.errors import PromptError

    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptError(
            f"line {dialog_index + 1} is not valid JSON ({err}); write one dialog per line as a "
            'JSON list of messages or {"messages": [...], "kwargs": {...}}'
        ) from err


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _parse_json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(parsed).__name__}")
    return parsed
