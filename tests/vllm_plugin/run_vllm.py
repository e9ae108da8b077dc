"""Run chat requests through `vllm.LLM` in a process of its own and write the results as JSON.

Usage: python run_vllm.py REQUESTS_JSON RESULTS_JSON

REQUESTS_JSON: {"export": DIR, "hf_overrides": {...} or null, "requests": [{"messages": [...], "chat_template_kwargs": {...},
"max_tokens": N}, ...]}. Each result has `prompt_token_ids`, `token_ids` and `logprobs` (of
each generated token), or `error` when vLLM refused the request.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    llm = LLM(
        model=spec["export"],
        dtype="float32",
        max_model_len=2048,
        limit_mm_per_prompt={"audio": 2},
        seed=0,
        hf_overrides=spec.get("hf_overrides"),
    )
    results = []
    for request in spec["requests"]:
        params = SamplingParams(max_tokens=request["max_tokens"], temperature=0.0, logprobs=0)
        try:
            output = llm.chat(
                request["messages"],
                params,
                chat_template_kwargs=request.get("chat_template_kwargs") or {},
                use_tqdm=False,
            )[0]
        except Exception as err:  # noqa: BLE001 - the test asserts on the message
            results.append({"error": f"{type(err).__name__}: {err}"})
            continue
        completion = output.outputs[0]
        results.append(
            {
                "prompt_token_ids": list(output.prompt_token_ids),
                "token_ids": list(completion.token_ids),
                "logprobs": [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)],
            }
        )
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
