"""Checkpoint readers: the model weights of a speech-LLM training checkpoint, in any of its formats.

`read_checkpoint` detects the format from the path (Lightning `.ckpt`, state-dict `.pt`,
safetensors, torch.distributed.checkpoint directory, NeMo `save_pretrained`/`to_hf` directory) and
returns the weights without NeMo installed and without building the model.
`split_salm_state_dict` turns NeMo SALM's key layout into the causal LM's Hugging Face names plus
the perception weights, merging LoRA and resolving tied embeddings. `read_nemo_archive` reads the
config and weights of a `.nemo` ASR model.
"""

from speechlm_bridge.checkpoints.nemo_archive import NemoArchive, read_nemo_archive
from speechlm_bridge.checkpoints.nemo_salm import SalmWeights, split_salm_state_dict
from speechlm_bridge.checkpoints.reader import FORMATS, LoadedCheckpoint, read_checkpoint

__all__ = [
    "FORMATS",
    "LoadedCheckpoint",
    "NemoArchive",
    "SalmWeights",
    "read_checkpoint",
    "read_nemo_archive",
    "split_salm_state_dict",
]
