"""Samples per second of the template-exact formatter against a hand-written one and plain
apply_chat_template, measured in the same run on the same dialogs.

    python bench/bench_prompts.py [--dialogs 2000] [--repeats 3] [--backbone qwen3] [--workers 2]

Methods (all produce one sample per dialog, loss on the last assistant turn):
- `ChatFormatter.encode`: two renders and two tokenizations per trained turn, plus checks.
- `ChatFormatter.encode_batch`: the same, with one batched tokenizer call.
- hand-written ChatML: per-turn string templates tokenized turn by turn, the way
  hand-written trainers do; it also reports how often its context differs from serving.
- `apply_chat_template(tokenize=True)`: one render and one tokenization, no loss mask.
- `apply_chat_template(return_assistant_tokens_mask=True)`: the transformers mask, which is
  all zeros for templates without {% generation %} tags; the share of empty masks is reported.

With `--workers N` every method also runs in N spawned worker processes, each with its own
tokenizer and formatter and a 1/N share of the dialogs (Rust tokenizer threads off, so each
worker uses one core); the table then has a column for it.

Prints a Markdown table. Needs the backbone fixtures (SPEECHLM_BRIDGE_FIXTURES, default
../shared/fixtures next to the project).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
AUDIO_TAG = "<|audio|>"
WORDS = (
    "the quick brown fox jumps over lazy dog speech model audio token answer question "
    "transcribe translate summary hello world zażółć gęślą jaźń 日本語 café naïve"
).split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogs", type=int, default=2000, help="dialogs per run (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the best counts")
    parser.add_argument("--backbone", default="qwen3", choices=("qwen3", "qwen2.5"))
    parser.add_argument("--workers", type=int, default=0, help="also measure with this many processes")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import AutoTokenizer

    from speechlm_bridge.prompts import ChatFormatter

    fixtures = Path(
        os.environ.get("SPEECHLM_BRIDGE_FIXTURES", PROJECT_ROOT.parent / "shared" / "fixtures")
    )
    tokenizer = AutoTokenizer.from_pretrained(str(fixtures / "backbones" / args.backbone))
    tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TAG]})
    formatter = ChatFormatter(tokenizer, audio_locator_tag=AUDIO_TAG)
    dialogs = make_dialogs(args.dialogs, seed=0)

    methods = build_methods(tokenizer, formatter, dialogs)

    rates = measure(methods, repeats=args.repeats)
    parallel_rates = (
        measure_workers(list(methods), args, fixtures=fixtures) if args.workers > 1 else {}
    )

    # Correctness next to speed: how often the fast baselines differ from the exact samples.
    context_drift = 0
    answer_drift = 0
    for dialog in dialogs:
        context, answer, _ = handwritten_chatml(tokenizer, dialog)
        exact = formatter.encode(dialog)[0]
        context_drift += context != exact.context_ids
        answer_drift += answer != exact.answer_ids
    empty_masks = sum(
        not any(
            tokenizer.apply_chat_template(d, return_assistant_tokens_mask=True)["assistant_masks"]
        )
        for d in dialogs
    )

    print(
        f"backbone: {args.backbone}; {len(dialogs)} dialogs "
        "(3/4 single-turn with audio, 1/4 three-turn)"
    )
    print(
        f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    print()
    if parallel_rates:
        print(f"| method | samples/s | relative to ChatFormatter.encode | samples/s, {args.workers} workers |")
        print("|---|---:|---:|---:|")
    else:
        print("| method | samples/s | relative to ChatFormatter.encode |")
        print("|---|---:|---:|")
    base = rates["ChatFormatter.encode"]
    for name, rate in rates.items():
        extra = f" {parallel_rates[name]:,.0f} |" if parallel_rates else ""
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |{extra}")
    print()
    print(
        f"hand-written ChatML differs from the template-exact sample: context in {context_drift}, "
        f"answer in {answer_drift} of {len(dialogs)} dialogs"
    )
    print(f"apply_chat_template assistant mask all zeros: {empty_masks} of {len(dialogs)} dialogs")
    return 0


def make_dialogs(count: int, *, seed: int) -> list[list[dict[str, Any]]]:
    """Three in four are one-turn transcription dialogs with audio, one in four has three turns."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    dialogs = []
    for index in range(count):
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a speech assistant."}
        ]
        turns = 1 if index % 4 else 3
        for _ in range(turns):
            messages.append({"role": "user", "content": f"Transcribe the following: {AUDIO_TAG}"})
            messages.append({"role": "assistant", "content": sentence(4, 30)})
        dialogs.append(messages)
    return dialogs


def handwritten_chatml(
    tokenizer: Any, messages: list[dict[str, Any]]
) -> tuple[list[int], list[int], list[bool]]:
    """A typical hand-written ChatML formatter: turn templates filled and tokenized one by one.

    Returns the context ids of the last assistant turn, its answer ids and the loss mask.
    """
    ids: list[int] = []
    mask: list[bool] = []
    context: list[int] = []
    answer: list[int] = []
    for message in messages:
        if message["role"] == "assistant":
            header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
            answer = tokenizer.encode(message["content"] + "<|im_end|>", add_special_tokens=False)
            newline = tokenizer.encode("\n", add_special_tokens=False)
            context = ids + header
            ids = context + answer + newline
            mask += [False] * len(header) + [True] * len(answer) + [False] * len(newline)
        else:
            turn = f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
            turn_ids = tokenizer.encode(turn, add_special_tokens=False)
            ids += turn_ids
            mask += [False] * len(turn_ids)
    return context, answer, mask


def build_methods(tokenizer: Any, formatter: Any, dialogs: list) -> dict[str, Callable[[], int]]:
    """The measured methods, each a callable that encodes `dialogs` and returns the sample count."""
    return {
        "ChatFormatter.encode": lambda: sum(len(formatter.encode(d)) for d in dialogs),
        "ChatFormatter.encode_batch": lambda: len(formatter.encode_batch(dialogs)),
        "hand-written ChatML (per-turn tokenize)": lambda: sum(
            1 for d in dialogs if handwritten_chatml(tokenizer, d)
        ),
        "apply_chat_template(tokenize=True), no mask": lambda: sum(
            1 for d in dialogs if tokenizer.apply_chat_template(d, tokenize=True, return_dict=False)
        ),
        "apply_chat_template(return_assistant_tokens_mask=True)": lambda: sum(
            1
            for d in dialogs
            if tokenizer.apply_chat_template(d, return_assistant_tokens_mask=True)[
                "assistant_masks"
            ]
            is not None
        ),
    }


def measure_workers(names: list[str], args: argparse.Namespace, *, fixtures: Path) -> dict[str, float]:
    """Return the best samples/s of each method with `args.workers` processes sharing the dialogs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    shares = [(index, args.workers) for index in range(args.workers)]
    context = multiprocessing.get_context("spawn")
    init_args = (str(fixtures / "backbones" / args.backbone), args.dialogs)
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker, initargs=init_args) as pool:
        for name in names:  # warm-up, and every worker has built its formatter
            sum(pool.map(_run_share, [name] * args.workers, shares))
        best = dict.fromkeys(names, 0.0)
        for _ in range(args.repeats):
            for name in names:
                start = time.perf_counter()
                samples = sum(pool.map(_run_share, [name] * args.workers, shares))
                best[name] = max(best[name], samples / (time.perf_counter() - start))
    return best


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, dialog_count: int) -> None:
    # One thread per worker: N workers on N cores, not N times the Rust tokenizer's thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    sys.path.insert(0, str(PROJECT_ROOT))
    from transformers import AutoTokenizer

    from speechlm_bridge.prompts import ChatFormatter

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TAG]})
    _WORKER["tokenizer"] = tokenizer
    _WORKER["formatter"] = ChatFormatter(tokenizer, audio_locator_tag=AUDIO_TAG)
    _WORKER["dialogs"] = make_dialogs(dialog_count, seed=0)


def _run_share(name: str, share: tuple[int, int]) -> int:
    index, count = share
    dialogs = _WORKER["dialogs"][index::count]
    return build_methods(_WORKER["tokenizer"], _WORKER["formatter"], dialogs)[name]()


def measure(methods: dict[str, Callable[[], int]], *, repeats: int) -> dict[str, float]:
    """Return the best samples/s of each method over `repeats` rounds, after one warm-up round.

    The methods take turns within a round, so a load spike from another process slows all of
    them rather than one.
    """
    for run in methods.values():
        run()
    best = dict.fromkeys(methods, 0.0)
    for _ in range(repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            samples = run()
            elapsed = time.perf_counter() - start
            best[name] = max(best[name], samples / elapsed)
    return best


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))
    sys.exit(main())
