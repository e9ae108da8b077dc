"""A tiny causal-LM backbone for the demo: a Qwen3 config and a byte-level BPE tokenizer trained here.

Nothing is downloaded. The tokenizer is trained in well under a second on a few sentences, with
ChatML special tokens and a ChatML chat template of its own, so the demo exercises the same
template-driven code paths as a real backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

# ChatML, the format Qwen backbones use; written for this demo backbone only.
DEMO_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_TRAINING_TEXT = (
    "Transcribe the following audio clip into text.",
    "Hello from speech LLM bridge.",
    "You are a helpful assistant that writes down what was said.",
    "The quick brown fox jumps over the lazy dog.",
    "Speech models read audio frames and write words.",
)


def write_demo_backbone(directory: Path, *, vocab_size: int = 512, hidden_size: int = 64) -> dict:
    """Write config.json, tokenizer.json and tokenizer_config.json of a tiny Qwen3 backbone.

    head_dim is 64 because vLLM's CPU attention rejects smaller heads. Returns the config dict.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))

    token_ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": DEMO_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

    # The embedding table keeps spare rows past the tokenizer, as real backbones do (Qwen3 has
    # 151936 rows for 151669 tokens). The audio locator tag takes the first spare one.
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": tokenizer.get_vocab_size() + 16,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        "dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_TRAINING_TEXT) * 4, trainer=trainer)
    return tokenizer
