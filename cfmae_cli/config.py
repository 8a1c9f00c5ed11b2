"""Configuration, the one door: what the rest of cfmae imports about configs, gathered from the modules that hold it.

- :mod:`cfmae_cli.config_schema`: the pre-training config's sections as strict Pydantic models, their defaults (the
  paper's ViT-B pre-training setting) and the numbers that follow from a config;
- :mod:`cfmae_cli.config_loading`: presets (``cfmae_cli/presets/NAME.yaml``, a ``base`` to start from),
  ``--set a.b=c`` overrides (read as YAML), validation errors in one message;
- :mod:`cfmae_cli.config_stored`: a checkpoint's or an export's config: the keys it predates, what may change on
  resume, its sizes and its tensors checked before anything is built;
- :mod:`cfmae_cli.config_sizes`: the bounds of an architecture and its parameters against this machine's memory.
"""

from __future__ import annotations

from cfmae_cli.config_loading import (PRESET_DIR, config_from_dict, deep_merge, dump_config, list_presets, load_config,
                                      parse_override, preset_task)
from cfmae_cli.config_schema import (IMAGENET_MEAN, IMAGENET_STD, AlignConfig, Config, DataConfig, DecoderConfig,
                                     EncoderArch, ImageDataConfig, LrSchedule, MaskingConfig, Modality, ModelConfig,
                                     MonitorConfig, OptimBase, OptimConfig, RunConfig, Strategy, TrainConfig, _Strict,
                                     batch_plan, check_inputs, decoder_summary, derived)
from cfmae_cli.config_sizes import (BYTES_PER_PARAMETER, MAX_CLASSES, MAX_DEPTH, MAX_GRID, MAX_MLP_RATIO, MAX_PATCH,
                                    MAX_PIXELS, MAX_WIDTH, block_parameters, encoder_parameters, finetune_parameters,
                                    grid_problem, machine_memory, memory_problem, pretrain_parameters)
from cfmae_cli.config_stored import (RESUMABLE_CHANGES, check_checkpoint_sizes, check_config_sizes, check_export_sizes,
                                     check_tensors_agree, check_weights_file, checkpoint_claims, config_diff,
                                     export_claims, stored_config, with_legacy_defaults)
from cfmae_cli.errors import ConfigError

__all__ = [
    # config_schema
    "Modality", "Strategy", "IMAGENET_MEAN", "IMAGENET_STD", "_Strict", "ImageDataConfig", "DataConfig",
    "check_inputs", "DecoderConfig", "AlignConfig", "ModelConfig", "EncoderArch", "MaskingConfig", "LrSchedule",
    "OptimBase", "OptimConfig", "RunConfig", "MonitorConfig", "TrainConfig", "Config", "batch_plan", "derived",
    "decoder_summary",
    # config_loading
    "PRESET_DIR", "list_presets", "preset_task", "deep_merge", "parse_override", "load_config", "config_from_dict",
    "dump_config",
    # config_stored
    "RESUMABLE_CHANGES", "config_diff", "with_legacy_defaults", "stored_config", "check_config_sizes",
    "check_checkpoint_sizes", "check_export_sizes", "checkpoint_claims", "export_claims", "check_tensors_agree",
    "check_weights_file",
    # config_sizes
    "MAX_WIDTH", "MAX_DEPTH", "MAX_MLP_RATIO", "MAX_PATCH", "MAX_PIXELS", "MAX_GRID", "MAX_CLASSES",
    "BYTES_PER_PARAMETER", "machine_memory", "block_parameters", "encoder_parameters", "pretrain_parameters",
    "finetune_parameters", "memory_problem", "grid_problem",
    # errors
    "ConfigError",
]
