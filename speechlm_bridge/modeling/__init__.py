"""The transformers side of an export: config, model, feature extractor and processor classes."""

from speechlm_bridge.modeling.configuration import MODEL_TYPE, SpeechLMBridgeConfig
from speechlm_bridge.modeling.feature_extraction import SpeechLMBridgeFeatureExtractor
from speechlm_bridge.modeling.modeling import (
    SpeechLMBridgeForConditionalGeneration,
    SpeechLMBridgePreTrainedModel,
)
from speechlm_bridge.modeling.processing import SpeechLMBridgeProcessor
from speechlm_bridge.modeling.registration import register_auto_classes

__all__ = [
    "MODEL_TYPE",
    "SpeechLMBridgeConfig",
    "SpeechLMBridgeFeatureExtractor",
    "SpeechLMBridgeForConditionalGeneration",
    "SpeechLMBridgePreTrainedModel",
    "SpeechLMBridgeProcessor",
    "register_auto_classes",
]
