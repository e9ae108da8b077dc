"""vLLM plugin: serve `speechlm-bridge export` directories with `vllm serve` and `vllm.LLM`.

vLLM discovers the plugin through the `vllm.general_plugins` entry point and calls `register()`
in every process it starts. Registration names the model class by its import path, so vLLM
imports the model code only when it loads a model of this architecture.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "SpeechLMBridgeForConditionalGeneration"
_MODEL_CLASS_PATH = "speechlm_bridge.vllm_plugin.model:SpeechLMBridgeForConditionalGeneration"


def register() -> None:
    """Register the config with transformers and the model class with vLLM's model registry.

    Safe to call more than once: vLLM loads general plugins in each engine process, and a user may
    also call it by hand.
    """
    from vllm import ModelRegistry

    # AutoConfig / AutoProcessor must resolve `model_type: speechlm_bridge` in every process
    # that reads the export, the API server included.
    from speechlm_bridge.modeling.registration import register_auto_classes

    register_auto_classes()
    if ARCHITECTURE in ModelRegistry.get_supported_archs():
        return
    ModelRegistry.register_model(ARCHITECTURE, _MODEL_CLASS_PATH)
    logger.debug("registered %s with vLLM", ARCHITECTURE)
