"""Registration of the speechlm-bridge classes with transformers' auto classes."""

from __future__ import annotations

_registered = False


def register_auto_classes() -> None:
    """Make `AutoConfig`, the auto model classes, `AutoFeatureExtractor` and `AutoProcessor`
    resolve `model_type: speechlm_bridge`. Safe to call more than once."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoFeatureExtractor,
        AutoModel,
        AutoModelForMultimodalLM,
        AutoModelForSpeechSeq2Seq,
        AutoProcessor,
    )

    from speechlm_bridge.modeling.configuration import MODEL_TYPE, SpeechLMBridgeConfig
    from speechlm_bridge.modeling.feature_extraction import SpeechLMBridgeFeatureExtractor
    from speechlm_bridge.modeling.modeling import SpeechLMBridgeForConditionalGeneration
    from speechlm_bridge.modeling.processing import SpeechLMBridgeProcessor

    AutoConfig.register(MODEL_TYPE, SpeechLMBridgeConfig, exist_ok=True)
    for auto_class in (AutoModel, AutoModelForMultimodalLM, AutoModelForSpeechSeq2Seq):
        auto_class.register(SpeechLMBridgeConfig, SpeechLMBridgeForConditionalGeneration, exist_ok=True)
    AutoFeatureExtractor.register(SpeechLMBridgeConfig, SpeechLMBridgeFeatureExtractor, exist_ok=True)
    AutoProcessor.register(SpeechLMBridgeConfig, SpeechLMBridgeProcessor, exist_ok=True)
    _registered = True
