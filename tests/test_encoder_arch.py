"""The encoder's architecture is declared once (``EncoderArch``; pre-training's model section inherits it) and gives
timm's ``VisionTransformer`` arguments in one place; the optimizer's shared fields likewise (``OptimBase``)."""

from __future__ import annotations

import pytest
import torch

from cfmae_cli.config import (Config, ConfigError, EncoderArch, ModelConfig, OptimBase, OptimConfig, config_from_dict,
                              load_config)
from cfmae_cli.eval.config import FinetuneConfig, FtOptimConfig
from cfmae_cli.model.convert import timm_config
from cfmae_cli.model.encoder import build_encoder


def test_the_model_section_is_the_encoder_architecture_plus_pre_trainings_keys() -> None:
    model = load_config("demo").model
    arch = EncoderArch.of(model)
    assert type(arch) is EncoderArch and arch.model_dump() == {k: getattr(model, k) for k in EncoderArch.model_fields}
    assert set(EncoderArch.model_fields) < set(ModelConfig.model_fields)
    # the keys stay flat: model.embed_dim, not model.encoder.embed_dim
    assert "encoder" not in model.model_dump() and model.model_dump()["embed_dim"] == arch.embed_dim
    assert load_config("demo", ["model.embed_dim=64", "model.num_heads=4"]).model.embed_dim == 64


def test_a_model_section_keeps_its_own_checks_and_messages() -> None:
    with pytest.raises(ConfigError, match=r"model\.embed_dim: 100 is not divisible by num_heads=3"):
        load_config("demo", ["model.embed_dim=100", "model.num_heads=3"])
    with pytest.raises(ConfigError, match=r"model\.patch_size: 8 is not divisible by map_stride=3"):
        load_config("demo", ["model.map_stride=3"])
    # an architecture beyond this machine's memory is named by the whole model's check, as before
    with pytest.raises(ConfigError, match=r"model: the model \(model\.embed_dim 16384, model\.depth 256"):
        load_config("demo", ["model.embed_dim=16384", "model.num_heads=16", "model.depth=256"])
    with pytest.raises(ConfigError, match=r"the encoder \(embed_dim 16384, depth 256"):
        config_from_dict({"embed_dim": 16384, "depth": 256, "num_heads": 16}, "a test", EncoderArch)


def test_timm_arguments_come_from_one_method() -> None:
    arch = EncoderArch(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0)
    args = arch.timm_kwargs(64, global_pool="avg")
    assert list(args) == ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "global_pool"]
    assert args == {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 3.0,
                    "global_pool": "avg"}
    enc = build_encoder(arch, 64)
    assert enc.grid == 8 and len(enc.blocks) == 2 and enc.blocks[0].mlp.fc1.out_features == 96
    assert enc.patch_embed.proj.weight.shape == (32, 3, 8, 8)
    named = build_encoder("vit_tiny_patch16", 32)  # a standard size by name
    assert named.embed_dim == 192 and len(named.blocks) == 12 and named.blocks[0].mlp.fc1.out_features == 768
    # an export's model_args are the same method's, for the run's image size
    cfg = load_config("demo")
    exported = timm_config(cfg, "a test")
    assert exported["model_args"] == cfg.model.timm_kwargs(cfg.data.img_size)
    assert exported["model_args"]["img_size"] == cfg.data.img_size and exported["num_features"] == cfg.model.embed_dim


def test_the_same_seed_builds_the_same_encoder_from_either_section() -> None:
    model = load_config("demo").model
    torch.manual_seed(0)
    a = build_encoder(EncoderArch.of(model), 64).state_dict()
    torch.manual_seed(0)
    b = build_encoder(model, 64).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_optimizer_schema_is_shared_with_each_commands_defaults() -> None:
    pre, ft = OptimConfig(), FtOptimConfig()
    assert isinstance(pre, OptimBase) and isinstance(ft, OptimBase)
    assert (pre.base_lr, pre.betas, pre.warmup_epochs, pre.min_lr) == (1e-4, (0.9, 0.95), 40, 0.0)
    assert (ft.base_lr, ft.betas, ft.warmup_epochs, ft.min_lr) == (1e-3, (0.9, 0.999), 5, 1e-6)
    assert (pre.weight_decay, pre.effective_batch, pre.lr, pre.clip_grad) == (0.05, 2048, None, None)
    assert (ft.weight_decay, ft.effective_batch, ft.lr, ft.clip_grad) == (0.05, 2048, None, None)
    assert FtOptimConfig.model_fields["base_lr"].description == OptimConfig.model_fields["base_lr"].description
    # the lr's decay: pre-training's is cosine and has no key for it; fine-tuning's keys say
    assert pre.lr_decay() == ("cosine", ()) and ft.lr_decay() == ("cosine", ())
    assert FtOptimConfig(schedule="step", milestones=[8, 11]).lr_decay() == ("step", (8.0, 11.0))
    assert "schedule" not in Config().optim.model_dump() and "milestones" not in Config().optim.model_dump()
    with pytest.raises(ConfigError, match=r"optim\.schedule: unknown key"):
        load_config("demo", ["optim.schedule=step"])
    assert load_config("ft-demo", ["optim.schedule=step", "optim.milestones=[2]"], FinetuneConfig
                       ).optim.lr_decay() == ("step", (2.0,))
