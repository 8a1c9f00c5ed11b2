"""Presets, overrides, validation messages, derived values."""

from __future__ import annotations

import pytest
import yaml

from cfmae_cli.config import Config, derived, dump_config, list_presets, load_config
from cfmae_cli.errors import ConfigError


def test_presets_resolve_and_vitb_matches_table7() -> None:
    assert {"demo", "vitb-400e", "vitb-1600e"} <= set(list_presets())
    cfg = load_config("vitb-400e")
    info = derived(cfg, world_size=1)
    assert info["lr"] == pytest.approx(8e-4) and info["effective_batch"] == 2048
    assert info["num_visible"] == 98 and info["tokens_total"] == 588 and info["accumulation_steps"] == 8
    assert derived(cfg, world_size=8)["accumulation_steps"] == 1
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_epochs == 40
    assert cfg.model.decoder.dim == 256 and cfg.model.decoder.num_heads == 8
    assert info["decoder_order"] == ["semantic", "instance", "rgb"]
    long = load_config("vitb-1600e")
    assert long.train.epochs == 1600 and long.optim == cfg.optim  # inherits the rest from vitb-400e


def test_set_overrides_and_yaml_values() -> None:
    cfg = load_config("demo", ["optim.base_lr=3e-4", "data.modalities=[rgb,semantic]",
                               "model.decoder.cascade=false", "masking.order=[instance]", "masking.breakpoints=[]"])
    assert cfg.optim.base_lr == pytest.approx(3e-4)
    assert cfg.data.modalities == ["rgb", "semantic"] and cfg.model.decoder.cascade is False


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"optim\.base_lrr: unknown key; did you mean 'optim\.base_lr'"):
        load_config("demo", ["optim.base_lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"trian: unknown key; did you mean 'train'"):
        load_config("demo", ["trian.epochs=3"])


def test_wrong_type_and_range_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: Input should be greater than or equal to 1"):
        load_config("demo", ["train.epochs=0"])
    with pytest.raises(ConfigError, match=r"optim\.base_lr: Input should be a valid number"):
        load_config("demo", ["optim.base_lr=fast"])
    with pytest.raises(ConfigError, match=r"masking\.num_visible: 500 exceeds the 64 tokens"):
        load_config("demo", ["masking.num_visible=500"])
    with pytest.raises(ConfigError, match="unknown preset 'vitb-40e'. Did you mean 'vitb-400e'"):
        load_config("vitb-40e")


def test_batch_that_does_not_divide_is_refused() -> None:
    cfg = load_config("vitb-400e", ["train.batch_size=300"])
    with pytest.raises(ConfigError, match=r"optim\.effective_batch: 2048 is not a multiple"):
        derived(cfg)


def test_dump_roundtrips(tmp_path) -> None:
    cfg = load_config("demo", ["train.seed=7"])
    again = Config.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    path = tmp_path / "mine.yaml"
    path.write_text("base: demo\ntrain:\n  epochs: 3\n")
    assert load_config(str(path)).train.epochs == 3
