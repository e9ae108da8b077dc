"""speechlm-bridge: template-exact prompts and offline Hugging Face exports for speech LLMs.

Importing the package registers its model, config, feature extractor and processor with
transformers' auto classes, so `AutoModelForMultimodalLM.from_pretrained(export_dir)` works
without `trust_remote_code`.
"""

from speechlm_bridge.modeling.registration import register_auto_classes

__version__ = "0.1.0"

register_auto_classes()
