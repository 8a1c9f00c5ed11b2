"""Presets, overrides, validation messages, derived values."""

from __future__ import annotations

from pathlib import Path

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


def test_a_run_written_before_the_blend_resumes_with_the_score_mix(tmp_path: Path) -> None:
    """A checkpoint whose config predates ``masking.mix`` (and ``model.train_pos_embed`` for fine-tuning) ran
    with the literal score mix (a fixed position table): resuming it keeps that, and is not refused."""
    from cfmae_cli.api.resuming import resumed_config
    from cfmae_cli.eval.config import FinetuneConfig
    from cfmae_cli.checkpoints import save_checkpoint
    from cfmae_cli.model.cfmae import CFMAE

    state = CFMAE.from_config(load_config("demo"), 3).state_dict()  # (a resume checks the config against its tensors)
    old = load_config("demo").model_dump(mode="json")
    del old["masking"]["mix"]
    save_checkpoint(tmp_path / "pre/checkpoints/last.pt", {"model": state, "config": old})
    assert resumed_config(tmp_path / "pre", None, []).masking.mix == "score"
    assert load_config("demo").masking.mix == "quota"
    ft = load_config("ft-demo", schema=FinetuneConfig).model_dump(mode="json")
    del ft["model"]["train_pos_embed"]
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    save_checkpoint(tmp_path / "ft/checkpoints/last.pt", {"model": encoder, "config": ft})
    assert resumed_config(tmp_path / "ft", None, [], FinetuneConfig).model.train_pos_embed is False


# Each row of the paper's Tables 5 and 6 that is a preset: what it changes from vitb-400e, and nothing else.
RANDOM = {"masking.order": ["random"], "masking.breakpoints": []}
ABLATIONS = {
    "vitb-400e-multimae": {**RANDOM, "data.modalities": ["rgb", "depth", "semantic"], "model.decoder.cascade": False,
                           "model.decoder.kind": "multimae", "model.decoder.order": ["rgb", "depth", "semantic"]},
    "vitb-400e-parallel-rd": {**RANDOM, "model.decoder.cascade": False},
    "vitb-400e-rd": RANDOM,
    "vitb-400e-ig": {"masking.order": ["instance"], "masking.breakpoints": []},
    "vitb-400e-sg": {"masking.order": ["semantic"], "masking.breakpoints": []},
    "vitb-400e-order-ig-sg-rd": {"masking.order": ["instance", "semantic", "random"]},
    "vitb-400e-order-rd-ig-sg": {"masking.order": ["random", "instance", "semantic"]},
    "vitb-400e-parallel": {"model.decoder.cascade": False},
    "vitb-400e-no-ca": {"model.decoder.cross_attention": False},
    "vitb-400e-decoder-r-i-s": {"model.decoder.order": ["rgb", "instance", "semantic"]},
    "vitb-400e-r": {**RANDOM, "data.modalities": ["rgb"], "masking.num_visible": 49},
    "vitb-400e-r-s": {**RANDOM, "data.modalities": ["rgb", "semantic"]},
    "vitb-400e-r-i": {**RANDOM, "data.modalities": ["rgb", "instance"]},
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_presets_change_only_their_row(name: str) -> None:
    """The preset differs from vitb-400e in exactly its row's keys, and the tiny version of it trains a step:
    a masked forward and backward give a finite loss over its modalities."""
    import torch

    from cfmae_cli.config import config_diff
    from cfmae_cli.masking import MaskGenerator, schedule
    from cfmae_cli.model import CFMAE
    from tests.conftest import TINY_OVERRIDES

    base, cfg = load_config("vitb-400e").model_dump(mode="json"), load_config(name).model_dump(mode="json")
    assert sorted(config_diff(base, cfg)) == sorted(ABLATIONS[name])
    for key, value in ABLATIONS[name].items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    tiny = load_config(name, [o for o in TINY_OVERRIDES if not o.startswith("masking.")] + ["masking.num_visible=8"])
    torch.manual_seed(0)
    model = CFMAE.from_config(tiny, 3)
    batch = {"rgb": torch.randn(2, 3, 32, 32), "instance": torch.randint(0, 4, (2, 16, 16)),
             "semantic": torch.randint(0, 3, (2, 16, 16)), "depth": torch.rand(2, 1, 32, 32)}
    masks = MaskGenerator(tiny.masking, tiny.data.modalities, model.grid, 3, tiny.model.num_instance_ids)
    made = masks(*schedule(0.3, tiny.masking.order, tiny.masking.breakpoints), 2, torch.device("cpu"),
                 instance=batch["instance"] if "instance" in tiny.data.modalities else None,
                 semantic=batch["semantic"] if "semantic" in tiny.data.modalities else None, seed=0)
    out = model({m: batch[m] for m in tiny.data.modalities}, made.mask, made.ids_keep)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and set(out["losses"]) == set(tiny.data.modalities)
