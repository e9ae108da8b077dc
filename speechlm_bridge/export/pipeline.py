"""`export`: one training checkpoint in, one self-contained Hugging Face directory out.

Steps, each logged:
  1. read the checkpoint's metadata: names, shapes and dtypes of the model weights (no NeMo, no
     model construction, no tensor values);
  2. find the model config (the experiment YAML, else the one the checkpoint embeds) and resolve
     the backbone and ASR locations to local paths;
  3. split the NeMo layout into LM and perception weights (LoRA merged, tying decided);
  4. convert perception to the Parakeet encoder, adapter and projector;
  5. stage the directory: tokenizer, config.json, generation, feature extractor and processor
     configs. Audit names and shapes against the model the config describes. Plan the shards and
     stream the weights into them, each tensor copied, or loaded, cast, written and freed;
  6. rename the staged directory into place.

Weights are lazy until step 5 writes them, so memory stays near the largest tensor (see
`safetensors_writer`). With `workers` > 1, or under torchrun, shards are written in parallel
(see `parallel`); the output is byte-identical either way.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speechlm_bridge.backbones import apply_legacy_renames, backbone_family_for, read_backbone_config
from speechlm_bridge.errors import CheckpointError, ConfigError, SpeechLMBridgeError
from speechlm_bridge.export.experiment import (
    TOKENIZER_FILES,
    ModelConfig,
    read_experiment_config,
    resolve_local_dir,
)
from speechlm_bridge.export.output_dir import check_output_dir, staged_output_dir
from speechlm_bridge.export.shard_size import parse_shard_size
from speechlm_bridge.export.perception_config import PerceptionExport, export_perception
from speechlm_bridge.export.support_files import (
    write_generation_config,
    write_model_config,
    write_processor_configs,
)
from speechlm_bridge.export.parallel import ExportGroup, write_shards
from speechlm_bridge.export.safetensors_writer import plan_shards, write_index
from speechlm_bridge.export.tokenizer import check_json_file, export_tokenizer
from speechlm_bridge.export.weights import (
    DTYPES,
    audit_state_dict,
    cast_floating,
    dominant_dtype,
    language_model_state_dict,
)

logger = logging.getLogger(__name__)

NEMO_BACKBONE_SUBDIR = "llm_backbone"


@dataclass
class ExportResult:
    """Summary of a finished export, printed by the CLI."""

    output_dir: Path
    checkpoint_format: str
    tensors: int
    parameters: int
    shards: int
    dtype: str
    tie_word_embeddings: bool
    audio_token_id: int
    backbone_family: str
    notes: list[str] = field(default_factory=list)


def export_checkpoint(
    checkpoint: str | Path,
    *,
    output: str | Path,
    config: str | Path | None = None,
    backbone: str | Path | None = None,
    asr: str | Path | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    workers: int = 1,
    progress: bool | None = None,
    check: bool = True,
) -> ExportResult:
    """Export a NeMo SALM training checkpoint to a Hugging Face directory at `output`.

    `dtype` is `auto` (keep the checkpoint's dtype) or one of `float32`, `bfloat16`, `float16`.
    `workers` processes write the safetensors shards. `progress` shows a bar per shard on stderr:
    True or False, or None for only when stderr is a terminal (so not in tests or CI logs).
    With `check`, the staged directory must pass `speechlm_bridge.check.check_export` before it
    is moved into place; an error there raises ExportCheckError and leaves no output.

    Under torchrun (`WORLD_SIZE` > 1), every rank calls this with the same arguments: rank 0
    plans and writes the configs, each rank writes its share of the shards into a staging
    directory next to `output` (so `output` must be on a filesystem all ranks share), and rank
    0 renames it into place. Every rank returns the same result.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}")
    group = ExportGroup.from_env()
    try:
        if group is not None and group.rank != 0:
            return _write_follower_shards(group, workers=workers, progress=progress)
        return _export(
            checkpoint, output=output, config=config, backbone=backbone, asr=asr, dtype=dtype,
            max_shard_size=max_shard_size, overwrite=overwrite, workers=workers, progress=progress, group=group,
            check=check,
        )
    except BaseException as err:
        if group is not None and group.rank == 0 and not group.shared:
            # The other ranks wait for the plan; tell them it will not come.
            group.share({"error": f"{type(err).__name__}: {err}"})
        raise
    finally:
        if group is not None:
            group.close()


def _export(
    checkpoint: str | Path,
    *,
    output: str | Path,
    config: str | Path | None,
    backbone: str | Path | None,
    asr: str | Path | None,
    dtype: str,
    max_shard_size: str | int,
    overwrite: bool,
    workers: int,
    progress: bool | None,
    group: ExportGroup | None,
    check: bool,
) -> ExportResult:
    from speechlm_bridge.checkpoints import read_checkpoint, split_salm_state_dict

    started = time.monotonic()
    output = Path(output)
    given_inputs = [Path(p) for p in (checkpoint, config, backbone, asr) if p is not None]
    check_output_dir(output, overwrite=overwrite, inputs=given_inputs)
    # Typos in paths fail now, not after a multi-GB checkpoint has been read.
    for option, value in (("--config", config), ("--backbone", backbone), ("--asr", asr)):
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{option} {value} does not exist; check the path")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    max_shard_size = parse_shard_size(max_shard_size)
    notes: list[str] = []

    # 1. Weights: metadata only, values stay on disk until step 5 writes them.
    logger.info("step 1/6: reading checkpoint %s", checkpoint)
    loaded = read_checkpoint(Path(checkpoint), lazy=True)

    # 2. Model config and local paths.
    logger.info("step 2/6: resolving the model config and local paths")
    model_config = _model_config(config, loaded)
    search_dirs = _unique_dirs([Path.cwd(), model_config.base_dir, _checkpoint_dir(loaded)])
    backbone_dir, tokenizer_dir = _resolve_backbone(model_config, backbone, loaded, search_dirs)
    backbone_config = read_backbone_config(backbone_dir)
    family = backbone_family_for(backbone_config, source=backbone_dir / "config.json")
    audio_locator_tag = model_config.require("audio_locator_tag")
    prompt_format = model_config.require("prompt_format")
    notes += _check_prompt_format(prompt_format, model_config)
    if model_config.get("encoder_chunk_size_seconds"):
        # NOTE: NeMo can split long audio into chunks before the encoder. The exported model
        # encodes each audio whole, so outputs differ for audio longer than one chunk.
        raise ConfigError(
            f"`model.encoder_chunk_size_seconds` is {model_config.get('encoder_chunk_size_seconds')} in "
            f"{model_config.source}; chunked audio encoding is not supported by the export yet. "
            "Set it to null if the model was trained and served on audio shorter than one chunk."
        )

    # 3. NeMo layout -> LM + perception.
    logger.info("step 3/6: splitting the NeMo SALM layout")
    # NemotronH checkpoints from the Hub name the decoder `backbone.`; NeMo keeps HF names.
    state_dict = apply_legacy_renames(loaded.state_dict, family, prefixes=("llm.base_model.model.", "llm."))
    salm = split_salm_state_dict(
        state_dict, lora_config=model_config.get("lora"), input_embeddings_key=family.input_embeddings_key
    )
    if model_config.get("lora") and not salm.lora_merged_modules:
        logger.warning(
            "%s has a `model.lora` section but the checkpoint has no LoRA adapters; exporting the "
            "weights as they are (check that config and checkpoint belong to the same run)",
            model_config.source,
        )
        notes.append("the config has `model.lora` but the checkpoint has no LoRA adapters")
    if not salm.tie_word_embeddings and backbone_config.get("tie_word_embeddings"):
        notes.append(
            "lm_head differs from embed_tokens (FSDP2 unties them during training); both were kept "
            "and the text config is marked untied"
        )

    # 4. Perception.
    logger.info("step 4/6: converting the audio encoder to transformers' Parakeet layout")
    perception = export_perception(
        model_config, salm.perception, asr_override=asr, search_dirs=search_dirs
    )

    # 5. Stage the directory.
    inputs = given_inputs + [backbone_dir, tokenizer_dir, perception.asr_path]
    with staged_output_dir(output, overwrite=overwrite, inputs=inputs) as staging:
        logger.info("step 5/6: writing tokenizer, weights and configs to %s", staging)
        tokenizer_export = export_tokenizer(tokenizer_dir, staging, audio_locator_tag=audio_locator_tag)

        text_config = dict(backbone_config)
        state_dict = language_model_state_dict(
            salm.llm,
            family=family,
            tie_word_embeddings=salm.tie_word_embeddings,
            text_config=text_config,
            audio_token_id=tokenizer_export.audio_token_id,
            config_source=backbone_dir / "config.json",
        )
        state_dict.update(perception.state_dict)

        target_dtype = dominant_dtype(state_dict) if dtype == "auto" else DTYPES[dtype]
        state_dict = cast_floating(state_dict, target_dtype)
        dtype_name = str(target_dtype).removeprefix("torch.")
        text_config["dtype"] = dtype_name
        text_config.pop("torch_dtype", None)

        model_config_obj = write_model_config(
            staging,
            text_config=text_config,
            perception=perception,
            audio_locator_tag=audio_locator_tag,
            audio_token_id=tokenizer_export.audio_token_id,
            prompt_format=prompt_format,
            backbone_family=family.name,
            dtype=dtype_name,
        )
        _audit(state_dict, model_config_obj)
        write_generation_config(staging, tokenizer=tokenizer_export.tokenizer, backbone_dir=backbone_dir)
        write_processor_configs(staging, perception=perception, audio_locator_tag=audio_locator_tag)

        shards = plan_shards(state_dict, max_shard_size=max_shard_size)
        result = ExportResult(
            output_dir=output,
            checkpoint_format=loaded.format,
            tensors=len(state_dict),
            parameters=sum(t.numel() for t in state_dict.values()),
            shards=len(shards),
            dtype=dtype_name,
            tie_word_embeddings=salm.tie_word_embeddings,
            audio_token_id=tokenizer_export.audio_token_id,
            backbone_family=family.name,
            notes=notes,
        )
        _write_weights(shards, staging, group=group, result=result, workers=workers, progress=progress)
        if check:
            _check_staged(staging, result)
        logger.info("step 6/6: moving the export into place at %s", output)

    logger.info(
        "export finished in %.1f s: %d tensors, %d parameters",
        time.monotonic() - started, result.tensors, result.parameters,
    )
    return result


class ExportCheckError(SpeechLMBridgeError):
    """The staged export failed `speechlm-bridge check`; nothing was written to the output."""


def _check_staged(staging: Path, result: ExportResult) -> None:
    """Run `check` on the staged directory: warnings become notes, errors stop the export."""
    from speechlm_bridge.check import check_export

    logger.info("step 5/6: checking the staged directory as `speechlm-bridge check` does")
    report = check_export(staging)
    for finding in report.warnings:
        logger.warning("check: %s (%s)", finding.message, finding.file or "export")
        result.notes.append(f"check warning {finding.code}: {finding.message}")
    if report.ok:
        return
    lines = [f"{f.code} in {f.file or 'the export'}: {f.message}" for f in report.errors[:5]]
    more = f" (and {len(report.errors) - 5} more)" if len(report.errors) > 5 else ""
    raise ExportCheckError(
        f"the converted directory fails `speechlm-bridge check` with {len(report.errors)} error(s){more}: "
        + "; ".join(lines)
        + ". Nothing was written to the output. The inputs convert into an export that transformers "
        "or vLLM would reject or run wrongly; fix them as the findings say, or report the case as a "
        "bug (--skip-check writes the export anyway, to inspect it)."
    )


def _write_weights(
    shards: list, staging: Path, *, group: ExportGroup | None, result: ExportResult, workers: int, progress: bool | None
) -> None:
    """Write the planned shards (this rank's share under torchrun) and then the index."""
    total = sum(shard.nbytes for shard in shards)
    _check_free_space(staging, total, output=result.output_dir)
    logger.info(
        "writing %.1f MB of weights as %d safetensors file(s) with %d worker(s)%s",
        total / 1e6, len(shards), workers, f" on each of {group.world_size} ranks" if group else "",
    )
    if group is None:
        write_shards(shards, staging, indices=list(range(len(shards))), workers=workers, progress=progress)
    else:
        group.share({"staging": str(staging), "shards": shards, "result": result})
        error = _try_write(shards, staging, group, workers=workers, progress=progress)
        failures = group.gather_errors(error)
        if failures:
            raise SpeechLMBridgeError("writing the safetensors shards failed on " + "; ".join(failures))
    write_index(shards, staging)


def _check_free_space(staging: Path, needed: int, *, output: Path) -> None:
    """Raise CheckpointError before copying when the output's filesystem cannot hold the weights."""
    free = shutil.disk_usage(staging).free
    if free < needed:
        raise CheckpointError(
            f"the weights need {needed / 1e6:.1f} MB, but the filesystem of {output} has "
            f"{free / 1e6:.1f} MB free. Free space there or choose another --output."
        )


def _write_follower_shards(group: ExportGroup, *, workers: int, progress: bool | None) -> ExportResult:
    """Rank r > 0 of a torchrun export: wait for rank 0's plan, write this rank's shards, report."""
    message = group.share(None)
    if "error" in message:
        raise SpeechLMBridgeError(f"rank 0 failed before the shards were planned ({message['error']})")
    staging = Path(message["staging"])
    error = None
    if not staging.is_dir():
        error = (
            f"the staging directory {staging} that rank 0 created does not exist on rank {group.rank}; "
            "--output must be on a filesystem that every rank shares"
        )
    else:
        error = _try_write(message["shards"], staging, group, workers=workers, progress=progress)
    failures = group.gather_errors(error)
    if failures:
        raise SpeechLMBridgeError("writing the safetensors shards failed on " + "; ".join(failures))
    return message["result"]


def _try_write(shards: list, staging: Path, group: ExportGroup, *, workers: int, progress: bool | None) -> str | None:
    # Every rank must reach the gather that follows, so a failure is returned, not raised.
    try:
        write_shards(shards, staging, indices=group.indices(len(shards)), workers=workers, progress=progress)
    except Exception as err:  # noqa: BLE001 (reported to rank 0, which raises it)
        logger.error("rank %d failed writing shards: %s", group.rank, err)
        return f"{type(err).__name__}: {err}"
    return None


def _model_config(config: str | Path | None, loaded: Any) -> ModelConfig:
    if config is not None:
        return read_experiment_config(config)
    if loaded.config:
        return ModelConfig(values=dict(loaded.config), source=f"the config stored in {loaded.path}", base_dir=None)
    raise ConfigError(
        f"{loaded.path} ({loaded.format}) does not store the model config; pass the experiment YAML "
        "that training saved with --config (e.g. <log_dir>/exp_config.yaml)."
    )


def _check_prompt_format(prompt_format: str, model_config: ModelConfig) -> list[str]:
    """Reject an unknown `prompt_format`; return a note for NeMo formats without a chat template."""
    from speechlm_bridge.prompts.formats import NON_CHAT_PROMPT_FORMATS, resolve_prompt_format

    try:
        resolve_prompt_format(prompt_format)
    except ConfigError as err:
        if str(prompt_format).strip().lower() in NON_CHAT_PROMPT_FORMATS:
            logger.warning("%s", err)
            return [
                f"prompt_format {prompt_format!r} has no chat template: pass rendered prompts to the "
                "processor as text, not messages"
            ]
        raise ConfigError(f"`model.prompt_format` in {model_config.source}: {err}") from err
    return []


def _unique_dirs(directories: list[Path | None]) -> list[Path]:
    """Drop missing and repeated directories (the config may sit in the working directory)."""
    unique: list[Path] = []
    for directory in directories:
        if directory is not None and directory.resolve() not in [d.resolve() for d in unique]:
            unique.append(directory)
    return unique


def _checkpoint_dir(loaded: Any) -> Path:
    path = Path(loaded.path)
    return path if path.is_dir() else path.parent


def _resolve_backbone(
    model_config: ModelConfig, override: str | Path | None, loaded: Any, search_dirs: list[Path]
) -> tuple[Path, Path]:
    """Return (directory with the backbone config.json, directory with its tokenizer).

    Order: --backbone; then, for NeMo's to_hf output, its llm_backbone/ config; then
    `model.pretrained_llm` (and `model.tokenizer_path`) when they are local. NeMo's to_hf output
    also carries the tokenizer, used when the config names no local tokenizer.
    """
    if override is not None:
        backbone_dir = resolve_local_dir(
            None, key="model.pretrained_llm", override=override, option="--backbone", base_dirs=[],
            must_contain=("config.json",),
        )
        return backbone_dir, _require_tokenizer_files(backbone_dir)

    nemo_dir = Path(loaded.path) if loaded.format == "nemo-to-hf" else None
    local_llm = _try_resolve(model_config.get("pretrained_llm"), "model.pretrained_llm", search_dirs)
    if nemo_dir is not None:
        backbone_dir = nemo_dir / NEMO_BACKBONE_SUBDIR
    elif local_llm is not None:
        backbone_dir = local_llm
    else:
        model_config.require("pretrained_llm")
        # Raises the error that names the key and the --backbone option.
        backbone_dir = resolve_local_dir(
            model_config.get("pretrained_llm"), key="model.pretrained_llm", override=None,
            option="--backbone", base_dirs=search_dirs[1:], must_contain=("config.json",),
            source=model_config.source,
        )

    # NeMo's to_hf output is one model: its own tokenizer comes before whatever pretrained_llm
    # happens to resolve to from the working directory.
    candidates = [_try_resolve(model_config.get("tokenizer_path"), "model.tokenizer_path", search_dirs)]
    candidates += [nemo_dir, local_llm] if nemo_dir is not None else [local_llm]
    for candidate in candidates:
        if candidate is not None and _has_tokenizer_files(candidate):
            if _tokenizer_files_intact(candidate) or candidate == candidates[-1]:
                return backbone_dir, candidate
    return backbone_dir, _require_tokenizer_files(backbone_dir)


def _try_resolve(value: str | None, key: str, search_dirs: list[Path]) -> Path | None:
    if not value:
        return None
    try:
        return resolve_local_dir(value, key=key, override=None, option="--backbone", base_dirs=search_dirs[1:])
    except ConfigError:
        return None


def _has_tokenizer_files(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).exists() for name in TOKENIZER_FILES)


def _tokenizer_files_intact(directory: Path) -> bool:
    """Return False when a JSON tokenizer file does not parse, e.g. a symlink a copy turned into text."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            try:
                check_json_file(path)
            except ConfigError as err:
                logger.warning("%s Looking for the tokenizer elsewhere.", err)
                return False
    return True


def _require_tokenizer_files(directory: Path) -> Path:
    if not _has_tokenizer_files(directory):
        raise ConfigError(
            f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); the export needs "
            "the backbone's tokenizer and chat template. Pass --backbone with a directory that has both."
        )
    return directory


def _audit(state_dict: dict[str, torch.Tensor], config) -> None:
    from speechlm_bridge.modeling.modeling import SpeechLMBridgeForConditionalGeneration

    with torch.device("meta"):
        model = SpeechLMBridgeForConditionalGeneration(config)
    audit_state_dict(state_dict, model)
