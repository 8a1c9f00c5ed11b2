"""Export to timm, and weights from MAE / MultiMAE / other-size / broken files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.model import CFMAE
from cfmae_cli.model.convert import detect_format, to_cfmae
from cfmae_cli.train.checkpoint import save_checkpoint
from tests.conftest import TINY_OVERRIDES, tiny_config

runner = CliRunner()


def _ours(tmp_path: Path, *extra: str) -> tuple[CFMAE, Path]:
    torch.manual_seed(0)
    cfg = tiny_config(*extra)
    model = CFMAE(cfg, 3)
    with torch.no_grad():  # non-trivial norms and tokens so that a wrong mapping shows
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.model_dump(mode="json"),
                           "semantic_classes": ["a", "b", "c"]})
    return model, path


def test_exported_encoder_gives_the_same_features_in_timm(tmp_path: Path) -> None:
    model, path = _ours(tmp_path)
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    timm_model = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                                   **config["model_args"]).eval()  # strict key matching
    x = torch.randn(2, 3, 32, 32)
    ours = model.encoder(model.encoder.patch_embed(x) + model.encoder.patch_pos)
    with torch.no_grad():
        theirs = timm_model.forward_features(x)
    assert (ours - theirs).abs().max() < 1e-5


def _mae_state(model: CFMAE) -> dict[str, torch.Tensor]:
    enc = {k: v for k, v in model.encoder.state_dict().items()}
    return {**enc, "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32)}


def _multimae_state(model: CFMAE) -> dict[str, torch.Tensor]:
    enc = model.encoder.state_dict()
    out = {"global_tokens": enc["cls_token"], "input_adapters.rgb.proj.weight": enc["patch_embed.proj.weight"],
           "input_adapters.rgb.proj.bias": enc["patch_embed.proj.bias"]}
    out.update({"encoder." + k.removeprefix("blocks."): v for k, v in enc.items() if k.startswith("blocks.")})
    return out


@pytest.mark.parametrize("layout", ["mae", "multimae"])
def test_init_from_mae_and_multimae_files(layout: str, tiny_data: Path, tmp_path: Path) -> None:
    source, _ = _ours(tmp_path)
    state = _mae_state(source) if layout == "mae" else _multimae_state(source)
    assert detect_format(state) == layout
    file = tmp_path / f"{layout}.pth"
    torch.save({"model": state}, file)
    converted = to_cfmae(state)
    assert torch.equal(converted["encoder.blocks.1.mlp.fc2.weight"], source.encoder.blocks[1].mlp.fc2.weight)
    out = tmp_path / "run"
    sets = [x for item in TINY_OVERRIDES + ["optim.base_lr=1e-12", "optim.warmup_epochs=0"] for x in ("--set", item)]
    result = runner.invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out), "--epochs", "1",
                                 "--init", str(file), *sets])
    assert result.exit_code == 0, result.output
    trained = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    for key in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "encoder.cls_token"):
        assert torch.allclose(trained[key], source.state_dict()[key], atol=1e-6), key


def test_init_from_another_size_or_a_bad_file(tiny_data: Path, tmp_path: Path) -> None:
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]

    def init(file: Path, out: str) -> str:
        result = runner.invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(tmp_path / out), "--epochs",
                                     "1", "--init", str(file), *sets])
        return f"{result.exit_code}|{' '.join(result.output.split())}"

    (tmp_path / "big").mkdir()
    _, bigger = _ours(tmp_path / "big", "data.img_size=48")  # another image size: positions are ours
    assert init(bigger, "r1").startswith("0|")
    (tmp_path / "wide").mkdir()
    _, wide = _ours(tmp_path / "wide", "model.embed_dim=48", "model.num_heads=2")
    out = init(wide, "r2")
    assert out.startswith("2|") and "do not match this model's shapes" in out and "encoder." in out
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x02garbage")
    out = init(broken, "r3")
    assert out.startswith("2|") and f"{broken}: not a readable checkpoint" in out
    pickled = tmp_path / "args.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, pickled)
    out = init(pickled, "r4")
    assert out.startswith("2|") and "re-save the state dict" in out
