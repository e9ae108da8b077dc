"""Convert NeMo SALM's audio perception (config and ``perception.*`` weights) to speechlm-bridge's.

NeMo's ``AudioPerceptionModule`` is ``preprocessor`` (AudioToMelSpectrogramPreprocessor) ->
``encoder`` (FastConformer ``ConformerEncoder``) -> ``modality_adapter`` -> ``proj`` (Linear). The
exported model computes the same with

* ``SpeechLMBridgeFeatureExtractor`` for the preprocessor (its filterbank and window buffers are
  checked here, not exported),
* transformers' ``ParakeetEncoder`` at ``audio_encoder.*``,
* ``ConformerAudioAdapter`` at ``audio_adapter.*`` for a ConformerEncoder adapter, nothing for
  IdentityConnector,
* a Linear at ``audio_projector.*``.

Every NeMo setting that would make ``ParakeetEncoder`` compute something else is rejected with a
``ConfigError`` that names the key, and unknown keys are rejected too, because a new NeMo option may
change the numerics. Dropouts become 0: the exported modules are for inference, and
``ParakeetEncoder`` places dropout differently from NeMo, so training-time dropout is not reproduced.

Keys of ``convert_perception_state_dict``, for a 2-layer encoder (``{i}`` = layer index)::

    NeMo (under perception.)                        exported
    encoder.pre_encode.conv.{0,2,3,5,6}.*           audio_encoder.subsampling.layers.{0,2,3,5,6}.*
    encoder.pre_encode.out.*                        audio_encoder.subsampling.linear.*
    encoder.layers.{i}.self_attn.linear_{q,k,v}.*   audio_encoder.layers.{i}.self_attn.{q,k,v}_proj.*
    encoder.layers.{i}.self_attn.linear_out.*       audio_encoder.layers.{i}.self_attn.o_proj.*
    encoder.layers.{i}.self_attn.linear_pos.weight  audio_encoder.layers.{i}.self_attn.relative_k_proj.weight
    encoder.layers.{i}.self_attn.pos_bias_{u,v}     audio_encoder.layers.{i}.self_attn.bias_{u,v}
    encoder.layers.{i}.conv.batch_norm.*            audio_encoder.layers.{i}.conv.norm.*
    encoder.layers.{i}.<other>                      audio_encoder.layers.{i}.<other>   (same names)
    modality_adapter.pre_encode.*                   audio_adapter.input_proj.*
    modality_adapter.layers.{i}.*                   audio_adapter.layers.{i}.*         (as encoder layers)
    proj.*                                          audio_projector.*
    preprocessor.featurizer.{fb,window}             checked, not exported
    *.num_batches_tracked, *._extra_state           dropped
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import ParakeetEncoder, ParakeetEncoderConfig

from speechlm_bridge.checkpoints.lazy import load_tensor
from speechlm_bridge.errors import CheckpointError, ConfigError
from speechlm_bridge.modeling.feature_extraction import (
    FILTER_DTYPES,
    LOG_ZERO_GUARD_TYPES,
    WINDOW_FUNCTIONS,
    compute_mel_filters,
    compute_window,
)
from speechlm_bridge.modeling.perception import build_audio_adapter, build_audio_projector

__all__ = [
    "FEATURIZER_BUFFER_KEYS",
    "adapter_config_from_nemo",
    "convert_perception_state_dict",
    "feature_extractor_config_from_nemo",
    "parakeet_encoder_config_from_nemo",
    "perception_configs_from_nemo",
    "projector_config_from_nemo",
]

logger = logging.getLogger(__name__)

FEATURIZER_BUFFER_KEYS = ("preprocessor.featurizer.fb", "preprocessor.featurizer.window")

_PREPROCESSOR_TARGETS = (
    "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
    "nemo.collections.asr.modules.audio_preprocessing.AudioToMelSpectrogramPreprocessor",
)
_CONFORMER_TARGETS = (
    "nemo.collections.asr.modules.ConformerEncoder",
    "nemo.collections.asr.modules.conformer_encoder.ConformerEncoder",
)
_IDENTITY_ADAPTER_TARGETS = ("nemo.collections.speechlm2.modules.perception.IdentityConnector",)
_SUPPORTED_ADAPTERS = _IDENTITY_ADAPTER_TARGETS + _CONFORMER_TARGETS

# AudioToMelSpectrogramPreprocessor arguments (nemo-toolkit 3.0) that the feature extractor reads,
# and those with no effect on inference features. `nfilt` is FilterbankFeatures' name for `features`.
_PREPROCESSOR_KEYS_USED = {
    "_target_", "sample_rate", "window_size", "window_stride", "n_window_size", "n_window_stride", "window",
    "normalize", "n_fft", "preemph", "features", "nfilt", "lowfreq", "highfreq", "log", "log_zero_guard_type",
    "log_zero_guard_value", "frame_splicing", "exact_pad", "mag_power", "use_torchaudio", "mel_norm",
}  # fmt: skip
_PREPROCESSOR_KEYS_WITHOUT_EFFECT = {
    # Dither and narrow-band augmentation run only in training. pad_to and pad_value only append
    # frames that every encoder layer masks. NeMo forces the deprecated stft_* options off.
    "dither", "rng", "nb_augmentation_prob", "nb_max_freq", "pad_to", "pad_value", "stft_exact_pad", "stft_conv",
}  # fmt: skip

# ConformerEncoder arguments (nemo-toolkit 3.0). The second set cannot change an inference forward
# pass of a `rel_pos` encoder with full context: training-only regularization, memory chunking,
# kernel choices for the same math, and options of other attention models.
_CONFORMER_KEYS_USED = {
    "_target_", "feat_in", "n_layers", "d_model", "feat_out", "causal_downsampling", "subsampling",
    "subsampling_factor", "subsampling_conv_channels", "reduction", "reduction_position", "reduction_factor",
    "ff_expansion_factor", "self_attention_model", "n_heads", "att_context_size", "att_context_probs",
    "att_chunk_context_size", "att_context_style", "xscaling", "untie_biases", "pos_emb_max_len",
    "conv_kernel_size", "conv_norm_type", "conv_context_size", "conv_context_style", "use_bias",
}  # fmt: skip
_CONFORMER_KEYS_WITHOUT_EFFECT = {
    "dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att", "stochastic_depth_drop_prob",
    "stochastic_depth_mode", "stochastic_depth_start_layer", "subsampling_conv_chunking_factor",
    "global_tokens", "global_tokens_spacing", "global_attn_separate", "use_pytorch_sdpa",
    "use_pytorch_sdpa_backends", "sync_max_audio_length", "rope_base", "rotary_fraction", "use_triton",
}  # fmt: skip

# AudioPerceptionModule's own keys. `spec_augment` runs only in training.
_PERCEPTION_KEYS = {"target", "_target_", "output_dim", "modality_adapter", "preprocessor", "encoder", "spec_augment", "rote"}
# AudioTranscriptionPerceptionModule nests a whole ASR model under perception.asr instead.
_PERCEPTION_TARGETS = ("nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",)


def perception_configs_from_nemo(
    perception_cfg: Mapping[str, Any], *, state_dict: Mapping[str, torch.Tensor] | None
) -> dict[str, dict[str, Any] | None]:
    """Convert NeMo's ``model.perception`` config to all four speechlm-bridge audio configs.

    ``state_dict`` contains the ``perception.*`` tensors without the ``perception.`` prefix. Only
    the featurizer buffers are read from it, and ``None`` skips their check.

    Returns ``{"feature_extractor": ..., "audio_encoder": ..., "audio_adapter": ... or None,
    "audio_projector": ...}``.
    """
    _reject_unknown_keys(perception_cfg, _PERCEPTION_KEYS, set(), path="perception")
    target = perception_cfg.get("target", perception_cfg.get("_target_"))
    if target is not None and target not in _PERCEPTION_TARGETS:
        raise ConfigError(
            f"perception.target={target!r} is not supported; the exporter converts {list(_PERCEPTION_TARGETS)}."
        )
    for key in ("preprocessor", "encoder", "modality_adapter"):
        if perception_cfg.get(key) is None:
            raise ConfigError(
                f"perception.{key} is missing from the NeMo config. A Lightning checkpoint's "
                "hyper_parameters lack perception.preprocessor and perception.encoder; take them from the "
                "model_config.yaml inside the pretrained_asr .nemo file."
            )
    if perception_cfg.get("rote") is not None:
        raise ConfigError(
            "perception.rote (rotary time embedding on the encoder output) is set; exporting it is not "
            "supported. Only checkpoints trained without perception.rote can be exported."
        )

    encoder_cfg = perception_cfg["encoder"]
    adapter_cfg = perception_cfg["modality_adapter"]
    encoder_config = parakeet_encoder_config_from_nemo(encoder_cfg)
    adapter_config = adapter_config_from_nemo(adapter_cfg)
    if adapter_config is not None and adapter_config["input_size"] != encoder_config["hidden_size"]:
        raise ConfigError(
            f"perception.modality_adapter.feat_in={adapter_config['input_size']} does not match "
            f"perception.encoder.d_model={encoder_config['hidden_size']}."
        )
    return {
        "feature_extractor": feature_extractor_config_from_nemo(perception_cfg["preprocessor"], buffers=state_dict),
        "audio_encoder": encoder_config,
        "audio_adapter": adapter_config,
        "audio_projector": projector_config_from_nemo(perception_cfg),
    }


def feature_extractor_config_from_nemo(
    preprocessor_cfg: Mapping[str, Any], *, buffers: Mapping[str, torch.Tensor] | None
) -> dict[str, Any]:
    """Convert ``perception.preprocessor`` to ``SpeechLMBridgeFeatureExtractor`` kwargs.

    ``buffers`` maps ``preprocessor.featurizer.fb`` and ``preprocessor.featurizer.window`` to the
    checkpoint's buffers (other keys are ignored). Their dtype decides ``mel_filters_dtype`` and
    ``window_dtype``: the filterbank and window recomputed from the config must equal the buffers
    after rounding to float32 or to the buffer's dtype, otherwise the checkpoint used a custom
    filterbank and a ``ConfigError`` is raised. ``buffers=None`` assumes float32.
    """
    path = "perception.preprocessor"
    _reject_unknown_keys(preprocessor_cfg, _PREPROCESSOR_KEYS_USED, _PREPROCESSOR_KEYS_WITHOUT_EFFECT, path=path)
    _require_target(preprocessor_cfg, _PREPROCESSOR_TARGETS, path=path)
    cfg = dict(preprocessor_cfg)

    # 1. settings the feature extractor cannot reproduce
    _require_value(cfg, "normalize", "per_feature", path=path, default="per_feature")
    _require_value(cfg, "log", True, path=path, default=True)
    _require_value(cfg, "frame_splicing", 1, path=path, default=1)
    _require_value(cfg, "exact_pad", False, path=path, default=False)
    _require_value(cfg, "use_torchaudio", False, path=path, default=False)
    window_function = cfg.get("window", "hann")
    if window_function not in WINDOW_FUNCTIONS:
        raise ConfigError(
            f"{path}.window={window_function!r} is not supported; use one of {sorted(WINDOW_FUNCTIONS)}."
        )
    log_zero_guard_type = cfg.get("log_zero_guard_type", "add")
    if log_zero_guard_type not in LOG_ZERO_GUARD_TYPES:
        raise ConfigError(
            f"{path}.log_zero_guard_type={log_zero_guard_type!r} is not supported; use one of "
            f"{list(LOG_ZERO_GUARD_TYPES)}."
        )
    log_zero_guard_value = cfg.get("log_zero_guard_value", 2**-24)
    if log_zero_guard_value not in ("tiny", "eps") and (
        isinstance(log_zero_guard_value, bool) or not isinstance(log_zero_guard_value, (int, float))
    ):
        raise ConfigError(
            f"{path}.log_zero_guard_value={log_zero_guard_value!r} is not supported; use a number, 'tiny' or 'eps'."
        )
    dither = cfg.get("dither", 1e-5)
    if dither:
        logger.info("%s.dither=%s applies only in training; the exported feature extractor does not dither", path, dither)

    # 2. STFT geometry, resolved the way AudioToMelSpectrogramPreprocessor does it
    sampling_rate = int(cfg.get("sample_rate", 16000))
    win_length = _samples_from_seconds_or_count(cfg, "window_size", "n_window_size", 0.02, sampling_rate, path=path)
    hop_length = _samples_from_seconds_or_count(cfg, "window_stride", "n_window_stride", 0.01, sampling_rate, path=path)
    n_fft = cfg.get("n_fft") or 2 ** math.ceil(math.log2(win_length))
    feature_size = _mel_bins(cfg, path=path)
    mel_max_frequency = cfg.get("highfreq") or sampling_rate / 2

    kwargs: dict[str, Any] = {
        "feature_size": feature_size,
        "sampling_rate": sampling_rate,
        "hop_length": hop_length,
        "n_fft": int(n_fft),
        "win_length": win_length,
        "preemphasis": cfg.get("preemph", 0.97),
        "padding_value": 0.0,
        "window_function": window_function,
        "mel_min_frequency": float(cfg.get("lowfreq", 0) or 0),
        "mel_max_frequency": float(mel_max_frequency),
        "mel_norm": cfg.get("mel_norm", "slaney"),
        "mag_power": float(cfg.get("mag_power", 2.0)),
        "log_zero_guard_type": log_zero_guard_type,
        "log_zero_guard_value": log_zero_guard_value,
        "normalize": "per_feature",
        "mel_filters_dtype": "float32",
        "window_dtype": "float32",
        "return_attention_mask": True,
    }

    # 3. the dtype the checkpoint's filterbank and window were rounded to
    if buffers is None:
        logger.warning(
            "no featurizer buffers given; assuming the checkpoint used a float32 filterbank and window"
        )
        return kwargs
    references = _featurizer_references(kwargs)
    for key, field in (("preprocessor.featurizer.fb", "mel_filters_dtype"), ("preprocessor.featurizer.window", "window_dtype")):
        if key not in buffers:
            logger.warning("%s is not in the checkpoint; assuming %s=float32", key, field)
            continue
        kwargs[field] = _buffer_dtype(load_tensor(buffers[key]), references[key], key=f"perception.{key}")
    return kwargs


def parakeet_encoder_config_from_nemo(encoder_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Convert ``perception.encoder`` (a FastConformer ``ConformerEncoder``) to ``ParakeetEncoderConfig`` kwargs."""
    path = "perception.encoder"
    config = _conformer_block_config(encoder_cfg, path=path)
    cfg = dict(encoder_cfg)
    d_model = config["hidden_size"]

    # ParakeetEncoder always subsamples with dw_striding convolutions (kernel 3, stride 2).
    subsampling = cfg.get("subsampling", "striding")
    subsampling_factor = cfg.get("subsampling_factor", 4)
    if subsampling != "dw_striding":
        raise ConfigError(
            f"{path}.subsampling={subsampling!r} is not supported; ParakeetEncoder implements only 'dw_striding'."
        )
    if not isinstance(subsampling_factor, int) or subsampling_factor < 2 or subsampling_factor & (subsampling_factor - 1):
        raise ConfigError(
            f"{path}.subsampling_factor={subsampling_factor!r} is not supported; use a power of two >= 2."
        )
    _require_value(cfg, "causal_downsampling", False, path=path, default=False)
    conv_channels = cfg.get("subsampling_conv_channels", -1)
    if conv_channels == -1:
        conv_channels = d_model

    # NeMo sizes its subsampling Linear from the conv output length of the mel axis, ceil(n / 2) per
    # convolution; ParakeetEncoder uses num_mel_bins // subsampling_factor. They agree when the
    # division is exact.
    num_mel_bins = config.pop("input_size")
    nemo_freq_bins = num_mel_bins
    for _ in range(subsampling_factor.bit_length() - 1):
        nemo_freq_bins = (nemo_freq_bins + 1) // 2
    if nemo_freq_bins != num_mel_bins // subsampling_factor:
        raise ConfigError(
            f"{path}.feat_in={num_mel_bins} is not divisible by subsampling_factor={subsampling_factor}; "
            f"NeMo keeps {nemo_freq_bins} frequency bins after subsampling, ParakeetEncoder "
            f"{num_mel_bins // subsampling_factor}, so the weights do not fit."
        )

    config.update(
        num_mel_bins=num_mel_bins,
        subsampling_factor=subsampling_factor,
        subsampling_conv_channels=int(conv_channels),
        subsampling_conv_kernel_size=3,
        subsampling_conv_stride=2,
    )
    return config


def adapter_config_from_nemo(modality_adapter_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Convert ``perception.modality_adapter`` to an audio adapter config, ``None`` for IdentityConnector.

    Supported: ``IdentityConnector`` and a ``ConformerEncoder`` with ``subsampling_factor: 1``
    (its pre-encode is then a Linear). See ``speechlm_bridge.modeling.perception`` for the format.
    """
    path = "perception.modality_adapter"
    target = modality_adapter_cfg.get("_target_")
    if target in _IDENTITY_ADAPTER_TARGETS:
        return None
    if target not in _CONFORMER_TARGETS:
        raise ConfigError(
            f"{path}._target_={target!r} is not supported; the exporter converts "
            f"{list(_SUPPORTED_ADAPTERS)}. MultiLayerProjectionConnector and QformerConnector adapters "
            "cannot be exported yet."
        )

    config = _conformer_block_config(modality_adapter_cfg, path=path)
    subsampling = modality_adapter_cfg.get("subsampling", "striding")
    subsampling_factor = modality_adapter_cfg.get("subsampling_factor", 4) or 1
    if subsampling and subsampling_factor > 1:
        raise ConfigError(
            f"{path}.subsampling_factor={subsampling_factor} is not supported for an adapter; only "
            "subsampling_factor: 1 (a Linear pre-encode that keeps the frame count) can be exported."
        )
    input_size = config.pop("input_size")
    return {"adapter_type": "conformer", "input_size": input_size, "conformer_config": config}


def projector_config_from_nemo(perception_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Convert the config of ``perception.proj``: ``Linear(adapter or encoder d_model, output_dim)``."""
    adapter_cfg = perception_cfg.get("modality_adapter") or {}
    encoder_cfg = perception_cfg.get("encoder") or {}
    if "output_dim" in adapter_cfg:
        raise ConfigError(
            "perception.modality_adapter.output_dim is set, so NeMo has no perception.proj and feeds the "
            "adapter output to the LLM directly; exporting that layout is not supported."
        )
    input_size = adapter_cfg.get("d_model", encoder_cfg.get("d_model"))
    if input_size is None:
        raise ConfigError("perception.modality_adapter.d_model and perception.encoder.d_model are both missing.")
    if adapter_cfg.get("_target_") in _IDENTITY_ADAPTER_TARGETS and encoder_cfg.get("d_model") not in (None, input_size):
        raise ConfigError(
            f"perception.modality_adapter.d_model={input_size} does not match "
            f"perception.encoder.d_model={encoder_cfg['d_model']}, but an IdentityConnector passes the "
            "encoder output through unchanged."
        )
    output_size = perception_cfg.get("output_dim")
    if output_size is None:
        raise ConfigError("perception.output_dim (the LLM hidden size) is missing.")
    return {"projector_type": "linear", "input_size": int(input_size), "output_size": int(output_size), "bias": True}


def convert_perception_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    encoder_cfg: Mapping[str, Any],
    adapter_cfg: Mapping[str, Any],
    projector_cfg: Mapping[str, Any] | None = None,
    feature_extractor_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename NeMo's perception weights to ``audio_encoder.*``, ``audio_adapter.*`` and ``audio_projector.*``.

    ``state_dict`` has NeMo names without the ``perception.`` prefix. ``encoder_cfg`` and
    ``adapter_cfg`` are NeMo's ``perception.encoder`` and ``perception.modality_adapter``.
    ``projector_cfg`` is the output of :func:`projector_config_from_nemo`; without it the projector
    shape is taken from ``proj.weight``. Tensors keep their dtype and are not copied. Values may be
    lazy ``TensorRef``s: only the featurizer buffers and shared position biases are loaded.

    The featurizer buffers are consumed: with ``feature_extractor_kwargs`` they must match what that
    feature extractor computes, else a ``CheckpointError`` is raised. Batch-norm
    ``num_batches_tracked`` and ``_extra_state`` entries are dropped.

    Raises ``CheckpointError`` unless every input key is used by exactly one rule and every
    parameter and persistent buffer of the target modules (except ``num_batches_tracked``) is
    filled with a tensor of the right shape.
    """
    encoder_config = parakeet_encoder_config_from_nemo(encoder_cfg)
    adapter_config = adapter_config_from_nemo(adapter_cfg)
    rules = _conversion_rules(encoder_cfg, adapter_cfg)

    # 1. rename through the table; a shared bias is written to every layer
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unmatched: list[str] = []
    for key in sorted(state_dict):
        tensor = state_dict[key]
        rule, match = _match_rule(rules, key)
        if rule is None:
            unmatched.append(key)
            continue
        for target in rule.targets(match):
            if target in converted and rule.broadcast_layers:
                if converted[target] is tensor or torch.equal(load_tensor(converted[target]), load_tensor(tensor)):
                    continue
                raise CheckpointError(
                    f"perception.{key} and perception.{sources[target]} differ, but untie_biases is false, "
                    "so every layer must share one pos_bias_u and one pos_bias_v."
                )
            if target in converted:
                raise CheckpointError(f"perception.{key} and perception.{sources[target]} both map to {target}.")
            converted[target] = tensor
            sources[target] = key
    if unmatched:
        raise CheckpointError(
            f"the NeMo perception weights contain unknown keys {unmatched}. "
            "They come from a module the exported model would not have, so it cannot reproduce the audio embeddings."
        )

    # 2. consumed featurizer buffers
    if feature_extractor_kwargs is not None:
        _check_featurizer_buffers(state_dict, feature_extractor_kwargs)
    else:
        logger.debug("featurizer buffers dropped without a check: no feature extractor config given")

    # 3. audit against the modules the exported model builds
    if projector_cfg is None:
        if "proj.weight" not in state_dict:
            raise CheckpointError("perception.proj.weight is missing from the NeMo perception weights.")
        out_features, in_features = state_dict["proj.weight"].shape
        projector_cfg = {
            "projector_type": "linear",
            "input_size": in_features,
            "output_size": out_features,
            "bias": "proj.bias" in state_dict,
        }
    _audit(converted, _expected_tensors(encoder_config, adapter_config, projector_cfg))
    logger.info("converted %d NeMo perception tensors to %d exported tensors", len(state_dict), len(converted))
    return converted


# --- config helpers ---------------------------------------------------------------------------------------


def _conformer_block_config(cfg: Mapping[str, Any], *, path: str) -> dict[str, Any]:
    """Validate the ConformerEncoder settings shared by encoder and adapter; return block kwargs."""
    _reject_unknown_keys(cfg, _CONFORMER_KEYS_USED, _CONFORMER_KEYS_WITHOUT_EFFECT, path=path)
    _require_target(cfg, _CONFORMER_TARGETS, path=path)
    for key in ("feat_in", "n_layers", "d_model"):
        if cfg.get(key) is None:
            raise ConfigError(f"{path}.{key} is missing.")
    d_model = int(cfg["d_model"])
    n_heads = int(cfg.get("n_heads", 4))
    if d_model % n_heads:
        raise ConfigError(f"{path}.d_model={d_model} is not divisible by {path}.n_heads={n_heads}.")

    feat_out = cfg.get("feat_out", -1)
    if feat_out is not None and feat_out > 0 and feat_out != d_model:
        raise ConfigError(
            f"{path}.feat_out={feat_out} adds an output projection that ParakeetEncoder does not have; "
            "only feat_out: -1 (or equal to d_model) is supported."
        )
    _require_value(cfg, "self_attention_model", "rel_pos", path=path, default="rel_pos")
    att_context_size = cfg.get("att_context_size")
    if att_context_size not in (None, [], [-1, -1], [[-1, -1]]):
        raise ConfigError(
            f"{path}.att_context_size={att_context_size!r} limits attention context; ParakeetEncoder "
            "attends to the full sequence, so only [-1, -1] is supported."
        )
    _require_value(cfg, "att_context_style", "regular", path=path, default="regular")
    _require_value(cfg, "att_chunk_context_size", None, path=path, default=None)
    reduction = cfg.get("reduction")
    reduction_factor = cfg.get("reduction_factor", 1)
    if reduction and reduction_factor > 1:
        raise ConfigError(
            f"{path}.reduction={reduction!r} with reduction_factor={reduction_factor} subsamples inside the "
            "encoder; ParakeetEncoder has no reduction layer."
        )

    conv_kernel_size = int(cfg.get("conv_kernel_size", 31))
    if conv_kernel_size % 2 == 0:
        raise ConfigError(f"{path}.conv_kernel_size={conv_kernel_size} must be odd for a symmetric convolution.")
    _require_value(cfg, "conv_norm_type", "batch_norm", path=path, default="batch_norm")
    _require_value(cfg, "conv_context_style", "regular", path=path, default="regular")
    conv_context_size = cfg.get("conv_context_size")
    symmetric = [(conv_kernel_size - 1) // 2] * 2
    if conv_context_size is not None and list(conv_context_size) != symmetric:
        raise ConfigError(
            f"{path}.conv_context_size={conv_context_size!r} is not supported; ParakeetEncoder pads the "
            f"convolution symmetrically, which is null or {symmetric}."
        )

    ff_expansion_factor = cfg.get("ff_expansion_factor", 4)
    intermediate_size = d_model * ff_expansion_factor
    if intermediate_size != int(intermediate_size):
        raise ConfigError(f"{path}.ff_expansion_factor={ff_expansion_factor} gives a fractional feed-forward size.")
    use_bias = bool(cfg.get("use_bias", True))
    return {
        "input_size": int(cfg["feat_in"]),
        "hidden_size": d_model,
        "num_hidden_layers": int(cfg["n_layers"]),
        "num_attention_heads": n_heads,
        "intermediate_size": int(intermediate_size),
        "hidden_act": "silu",
        "attention_bias": use_bias,
        "convolution_bias": use_bias,
        "conv_kernel_size": conv_kernel_size,
        "scale_input": bool(cfg.get("xscaling", True)),
        "max_position_embeddings": int(cfg.get("pos_emb_max_len", 5000)),
        "dropout": 0.0,
        "dropout_positions": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "layerdrop": 0.0,
    }


def _samples_from_seconds_or_count(
    cfg: Mapping[str, Any], seconds_key: str, samples_key: str, default_seconds: float, sampling_rate: int, *, path: str
) -> int:
    seconds = cfg.get(seconds_key)
    samples = cfg.get(samples_key)
    if seconds and samples:
        raise ConfigError(f"{path} sets both {seconds_key} and {samples_key}; NeMo accepts only one of them.")
    if samples:
        return int(samples)
    # int() truncates, as NeMo does: 0.025 s * 16000 is 400.00000000000006 samples.
    return int((seconds or default_seconds) * sampling_rate)


def _mel_bins(cfg: Mapping[str, Any], *, path: str) -> int:
    features = cfg.get("features")
    nfilt = cfg.get("nfilt")
    if features is not None and nfilt is not None and features != nfilt:
        raise ConfigError(f"{path}.features={features} and {path}.nfilt={nfilt} disagree.")
    if features is not None:
        return int(features)
    if nfilt is not None:
        return int(nfilt)
    return 64


def _featurizer_references(kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Float32 filterbank and window as NeMo builds them, in the buffer layouts."""
    mel_filters = compute_mel_filters(
        sampling_rate=kwargs["sampling_rate"],
        n_fft=kwargs["n_fft"],
        feature_size=kwargs["feature_size"],
        mel_min_frequency=kwargs["mel_min_frequency"],
        mel_max_frequency=kwargs["mel_max_frequency"],
        mel_norm=kwargs["mel_norm"],
    )
    window = compute_window(kwargs["window_function"], win_length=kwargs["win_length"])
    return {"preprocessor.featurizer.fb": mel_filters.unsqueeze(0), "preprocessor.featurizer.window": window}


def _buffer_dtype(buffer: torch.Tensor, reference: torch.Tensor, *, key: str) -> str:
    """Return the name of the dtype that rounds ``reference`` (float32) to ``buffer``."""
    if tuple(buffer.shape) != tuple(reference.shape):
        raise ConfigError(
            f"{key} has shape {tuple(buffer.shape)}, but the preprocessor config gives {tuple(reference.shape)}; "
            "the config does not describe this checkpoint."
        )
    actual = buffer.detach().to(torch.float32)
    candidates = [name for name, dtype in FILTER_DTYPES.items() if dtype == buffer.dtype]
    if "float32" not in candidates:
        candidates.append("float32")
    for name in candidates:
        if _close_after_rounding(reference, actual, FILTER_DTYPES[name], key=key):
            return name
    max_diff = (reference - actual).abs().max().item()
    raise ConfigError(
        f"{key} ({buffer.dtype}) matches neither the {'/'.join(candidates)} rounding of the values the "
        f"preprocessor config gives (max abs difference {max_diff:.3g}). The checkpoint was trained with a "
        "custom filterbank or window, which the exported feature extractor cannot reproduce."
    )


def _close_after_rounding(reference: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype, *, key: str) -> bool:
    rounded = reference.to(dtype).to(torch.float32)
    if torch.equal(rounded, actual):
        return True
    # A different librosa version can move a float32 filter value by an ulp, which may flip one
    # rounding. Differences of one ulp of the dtype are accepted with a warning.
    eps = torch.finfo(dtype).eps
    if torch.allclose(rounded, actual, rtol=eps, atol=0.0):
        differing = int((rounded != actual).sum())
        logger.warning(
            "%s differs from the recomputed %s values in %d of %d elements by at most one ulp; "
            "using the recomputed values",
            key, str(dtype).removeprefix("torch."), differing, actual.numel(),
        )  # fmt: skip
        return True
    return False


def _check_featurizer_buffers(state_dict: Mapping[str, torch.Tensor], kwargs: Mapping[str, Any]) -> None:
    references = _featurizer_references(kwargs)
    for key, field in zip(FEATURIZER_BUFFER_KEYS, ("mel_filters_dtype", "window_dtype")):
        if key not in state_dict:
            continue
        actual = load_tensor(state_dict[key]).detach().to(torch.float32)
        if actual.shape != references[key].shape or not _close_after_rounding(
            references[key], actual, FILTER_DTYPES[kwargs[field]], key=f"perception.{key}"
        ):
            raise CheckpointError(
                f"perception.{key} does not match the feature extractor config ({field}={kwargs[field]!r}); "
                "build the config with feature_extractor_config_from_nemo from the same checkpoint."
            )


def _require_target(cfg: Mapping[str, Any], targets: tuple[str, ...], *, path: str) -> None:
    target = cfg.get("_target_")
    if target not in targets:
        raise ConfigError(f"{path}._target_={target!r} is not supported; expected one of {list(targets)}.")


def _require_value(cfg: Mapping[str, Any], key: str, expected: Any, *, path: str, default: Any) -> None:
    value = cfg.get(key, default)
    if value != expected:
        raise ConfigError(f"{path}.{key}={value!r} is not supported; only {expected!r} can be exported.")


def _reject_unknown_keys(cfg: Mapping[str, Any], used: set[str], without_effect: set[str], *, path: str) -> None:
    unknown = sorted(set(cfg) - used - without_effect)
    if unknown:
        raise ConfigError(
            f"{path} has unknown keys {unknown}. They may change the model's output, "
            "so the export cannot promise equal audio embeddings; remove them from the config if they are "
            "training-only settings."
        )


# --- weight renaming --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One row of the renaming table: a NeMo key pattern and its exported name (None: not exported)."""

    pattern: re.Pattern[str]
    template: str | None
    # For a bias shared by all layers (untie_biases: false): the template has a {layer} field and
    # the tensor is written to this many layers.
    broadcast_layers: int = 0

    def targets(self, match: re.Match[str]) -> list[str]:
        if self.template is None:
            return []
        name = match.expand(self.template)
        if self.broadcast_layers:
            return [name.format(layer=layer) for layer in range(self.broadcast_layers)]
        return [name]


_CONFORMER_LAYER_TABLE = (
    (r"layers\.(\d+)\.self_attn\.linear_([qkv])\.(weight|bias)", r"layers.\1.self_attn.\2_proj.\3"),
    (r"layers\.(\d+)\.self_attn\.linear_out\.(weight|bias)", r"layers.\1.self_attn.o_proj.\2"),
    (r"layers\.(\d+)\.self_attn\.linear_pos\.weight", r"layers.\1.self_attn.relative_k_proj.weight"),
    (r"layers\.(\d+)\.conv\.batch_norm\.(weight|bias|running_mean|running_var)", r"layers.\1.conv.norm.\2"),
    (r"layers\.(\d+)\.conv\.(pointwise_conv1|depthwise_conv|pointwise_conv2)\.(weight|bias)", r"layers.\1.conv.\2.\3"),
    (r"layers\.(\d+)\.(feed_forward[12])\.(linear[12])\.(weight|bias)", r"layers.\1.\2.\3.\4"),
    (
        r"layers\.(\d+)\.(norm_feed_forward1|norm_self_att|norm_conv|norm_feed_forward2|norm_out)\.(weight|bias)",
        r"layers.\1.\2.\3",
    ),
)
_POS_BIAS = r"layers\.(\d+)\.self_attn\.pos_bias_([uv])"
_DROPPED = (r".+\.num_batches_tracked", r".+\._extra_state")


def _conversion_rules(encoder_cfg: Mapping[str, Any], adapter_cfg: Mapping[str, Any]) -> list[_Rule]:
    rules = [_Rule(re.compile(pattern), None) for pattern in _DROPPED]
    rules += [_Rule(re.compile(re.escape(key)), None) for key in FEATURIZER_BUFFER_KEYS]
    rules.append(_Rule(re.compile(r"proj\.(weight|bias)"), r"audio_projector.\1"))

    rules += [
        _Rule(re.compile(r"encoder\.pre_encode\.conv\.(\d+)\.(weight|bias)"), r"audio_encoder.subsampling.layers.\1.\2"),
        _Rule(re.compile(r"encoder\.pre_encode\.out\.(weight|bias)"), r"audio_encoder.subsampling.linear.\1"),
    ]
    rules += _conformer_layer_rules("encoder", "audio_encoder", encoder_cfg)

    if adapter_cfg.get("_target_") in _CONFORMER_TARGETS:
        rules.append(_Rule(re.compile(r"modality_adapter\.pre_encode\.(weight|bias)"), r"audio_adapter.input_proj.\1"))
        rules += _conformer_layer_rules("modality_adapter", "audio_adapter", adapter_cfg)
    return rules


def _conformer_layer_rules(source: str, target: str, cfg: Mapping[str, Any]) -> list[_Rule]:
    rules = [
        _Rule(re.compile(rf"{re.escape(source)}\.{pattern}"), f"{target}.{template}")
        for pattern, template in _CONFORMER_LAYER_TABLE
    ]
    pos_bias = re.compile(rf"{re.escape(source)}\.{_POS_BIAS}")
    if cfg.get("untie_biases", True):
        rules.append(_Rule(pos_bias, rf"{target}.layers.\1.self_attn.bias_\2"))
    else:
        # NeMo registers one Parameter in every layer; a safetensors export may keep only one alias.
        rules.append(
            _Rule(pos_bias, rf"{target}.layers.{{layer}}.self_attn.bias_\2", broadcast_layers=int(cfg["n_layers"]))
        )
    return rules


def _match_rule(rules: list[_Rule], key: str) -> tuple[_Rule | None, re.Match[str] | None]:
    found = [(rule, match) for rule in rules if (match := rule.pattern.fullmatch(key))]
    if len(found) > 1:
        raise RuntimeError(f"conversion table rows overlap on {key}: {[rule.pattern.pattern for rule, _ in found]}")
    return found[0] if found else (None, None)


def _expected_tensors(
    encoder_config: Mapping[str, Any], adapter_config: Mapping[str, Any] | None, projector_config: Mapping[str, Any]
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor the exported audio modules load, built on the meta device."""
    with torch.device("meta"):
        modules: dict[str, nn.Module | None] = {
            "audio_encoder": ParakeetEncoder(ParakeetEncoderConfig(**encoder_config)),
            "audio_adapter": build_audio_adapter(adapter_config),
            "audio_projector": build_audio_projector(projector_config),
        }
    expected = {}
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                expected[f"{prefix}.{name}"] = tuple(tensor.shape)
    return expected


def _audit(converted: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = sorted(
        f"{name}: {tuple(converted[name].shape)} instead of {expected[name]}"
        for name in set(expected) & set(converted)
        if tuple(converted[name].shape) != expected[name]
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            "the NeMo perception weights do not fit the exported audio modules built from the config. "
            f"Missing: {missing}. Unexpected: {unexpected}. Wrong shape: {wrong_shape}."
        )
