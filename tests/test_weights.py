"""The one door for weights (model/weights.py): every layout a user may hand us loads through it, and a file of
another size or an unknown kind stops with one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.config import EncoderArch
from cfmae_cli.errors import CfmaeError
from cfmae_cli.eval.classifier import ViTClassifier, load_encoder_weights
from cfmae_cli.model.weights import read_weights
from tests.test_export import _mae_state, _multimae_state, _ours
from tests.test_robustness import tiny_classifier

runner = CliRunner()
ARCH = EncoderArch(patch_size=8, embed_dim=32, depth=2, num_heads=2, map_stride=2, map_embed_dim=8)


def timm_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def layouts(tmp_path: Path) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Every layout, written as the tool that makes it writes it, with the encoder tensors it must give."""
    source, ours = _ours(tmp_path)
    mae = tmp_path / "mae.pth"
    torch.save({"model": _mae_state(source)}, mae)
    multimae = tmp_path / "multimae.pth"
    torch.save({"model": _multimae_state()}, multimae)
    timm_pth, timm_st = tmp_path / "timm.pth", tmp_path / "timm.safetensors"
    state = timm_state(tmp_path)
    torch.save(state, timm_pth)
    save_file(state, str(timm_st))
    result = runner.invoke(app, ["export", str(ours), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    finetuned = tiny_classifier(tmp_path, ["a", "b"])
    enc = {k.removeprefix("encoder."): v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    ft = {k.removeprefix("encoder."): v for k, v in torch.load(finetuned, weights_only=True)["model"].items()
          if k.startswith("encoder.")}
    return {"cfmae-pretrain": (ours, enc), "mae": (mae, enc), "multimae": (multimae, None),
            "timm": (timm_pth, state), "timm-safetensors": (timm_st, state),
            "exported": (tmp_path / "exported", enc), "cfmae-finetune": (finetuned, ft)}


def test_every_layout_loads_through_the_one_door(tmp_path: Path) -> None:
    for name, (path, expected) in layouts(tmp_path).items():
        weights = read_weights(path)
        assert weights.format == name.removesuffix("-safetensors"), name
        arch, _ = weights.encoder_arch()
        model = ViTClassifier(arch.model_copy(update={"num_heads": 2}), 32, 5, ["rgb"])
        load_encoder_weights(model, weights.state, weights.source)
        got = model.encoder.state_dict()
        if expected is None:  # MultiMAE's own names (test_export checks its features and positions)
            mm = _multimae_state()
            expected = {f"blocks.{k.removeprefix('encoder.')}": v for k, v in mm.items() if k.startswith("encoder.")}
            expected.update({"cls_token": mm["global_tokens"][:, :1],
                             "patch_embed.proj.weight": mm["input_adapters.rgb.proj.weight"]})
        for key in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "cls_token", "patch_embed.proj.weight"):
            assert torch.equal(got[key], expected[key]), (name, key)


def test_a_file_of_another_size_or_kind_gets_one_clear_message(tmp_path: Path) -> None:
    (tmp_path / "wide").mkdir()
    _, wide = _ours(tmp_path / "wide", "model.embed_dim=48", "model.num_heads=2")
    model = ViTClassifier(ARCH, 32, 5, ["rgb"])
    weights = read_weights(wide)
    with pytest.raises(CfmaeError, match=r"do not match this model's shapes \(encoder\..*48.*32.*leave model.encoder"):
        load_encoder_weights(model, weights.state, weights.source)
    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=3).state_dict(), resnet)
    with pytest.raises(CfmaeError, match=rf"{resnet}: unknown weights format"):
        read_weights(resnet)
    for command in (["finetune", "--checkpoint", str(resnet)], ["export", str(resnet), "--out", str(tmp_path / "x")],
                    ["pretrain", "--init", str(resnet), "--out", str(tmp_path / "y")]):
        result = runner.invoke(app, command)
        lines = [line for line in result.output.splitlines() if line.startswith("error")]
        assert result.exit_code == 2 and len(lines) == 1 and "unknown weights format" in lines[0], command
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
