"""Feature alignment to a frozen teacher (issue #19, ``model.align``): the teacher's features land on the patches
they come from, the loss falls and only the student learns, an alignment of weight 0 leaves every other loss of
every step as it was, bench prices the teacher, and bad teachers are refused with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.config import AlignConfig
from cfmae_cli.masking import visible_indices
from cfmae_cli.model import CFMAE
from cfmae_cli.model.align import Teacher, align_loss, pooled_encoder_tokens
from tests.conftest import TINY_OVERRIDES, make_dataset, tiny_config

runner = CliRunner()
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_teacher(folder: Path, img_size: int = 32, patch_size: int = 8, embed_dim: int = 24, depth: int = 1,
                 seed: int = 0) -> Path:
    """A random-weight timm ViT saved as an exported folder (timm's hub format: config.json + model.safetensors)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    args = {"img_size": img_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "model_args": args, "num_classes": 0,
        "pretrained_cfg": {"input_size": [3, img_size, img_size], "mean": [0.5] * 3, "std": [0.5] * 3}}))
    return folder


def align_sets(teacher: Path, *extra: str) -> list[str]:
    out = []
    for item in [*TINY_OVERRIDES, "model.align.enabled=true", f"model.align.teacher={teacher}", *extra]:
        out += ["--set", item]
    return out


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.mark.parametrize("teacher_patch", [8, 4])
def test_teacher_features_land_on_the_patches_they_come_from(tmp_path: Path, teacher_patch: int) -> None:
    """A change in the top-right patch of the image changes the teacher's features at our top-right patch, not
    at the bottom-left one (a transposed layout) nor spread half a cell off; with a finer teacher grid (patch 4,
    8 x 8) resized to ours (4 x 4) as well. A block-free ViT keeps each token local."""
    folder = tiny_teacher(tmp_path / "t", patch_size=teacher_patch, depth=0)
    teacher = Teacher(AlignConfig(enabled=True, teacher=str(folder)), torch.device("cpu"), mean=MEAN, std=STD)
    assert teacher.side == 32 // teacher_patch
    plain = torch.zeros(1, 3, 32, 32)
    marked = plain.clone()
    marked[:, :, 0:8, 24:32] = 2.0  # the top-right patch of our 4 x 4 grid
    diff = (teacher(marked, 4) - teacher(plain, 4)).norm(dim=-1)[0]  # (16,) row-major
    assert int(diff.argmax()) == 3
    assert diff[12] < 1e-4 * diff[3]  # the bottom-left patch: untouched
    if teacher_patch == 8:
        assert (diff[torch.arange(16) != 3] < 1e-5).all()  # same grid: exactly that patch


def test_the_loss_is_what_it_says() -> None:
    torch.manual_seed(0)
    target = torch.randn(2, 5, 7)
    assert align_loss(3.0 * target, target, None, "cosine") < 1e-6  # cosine ignores scale
    assert align_loss(-target, target, None, "cosine") == pytest.approx(2.0, abs=1e-6)
    normed = torch.nn.functional.layer_norm(target, (7,), eps=1e-6)
    assert align_loss(normed, target, None, "smooth_l1") < 1e-7  # smooth L1 to per-patch normalised features
    select = torch.zeros(2, 5, dtype=torch.bool)
    select[:, :2] = True
    noisy = target.clone()
    noisy[:, 2:] = torch.randn(2, 3, 7)  # only unselected patches differ: no loss
    assert align_loss(noisy, target, select, "cosine") < 1e-6
    encoded = torch.randn(1, 4, 3)  # global token + 3 visible: positions 1 (rgb), 1 + 4 (other modality), 2
    pooled, seen = pooled_encoder_tokens(encoded, torch.tensor([[1, 5, 2]]), 4)
    assert seen.tolist() == [[False, True, True, False]]
    assert torch.allclose(pooled[0, 1], (encoded[0, 1] + encoded[0, 2]) / 2) and torch.allclose(pooled[0, 2],
                                                                                                encoded[0, 3])


@pytest.mark.parametrize("stage", ["decoder", "encoder"])
def test_only_the_student_learns(tmp_path: Path, stage: str) -> None:
    cfg = tiny_config("model.align.enabled=true", f"model.align.teacher={tiny_teacher(tmp_path / 't')}",
                      f"model.align.stage={stage}")
    teacher = Teacher(cfg.model.align, torch.device("cpu"), mean=cfg.data.mean, std=cfg.data.std)
    model = CFMAE.from_config(cfg, 3, align_dim=teacher.dim)
    assert not any(n.startswith("teacher") for n in model.state_dict())  # not saved, not optimised
    batch = {"rgb": torch.randn(2, 3, 32, 32), "instance": torch.randint(0, 16, (2, 16, 16)),
             "semantic": torch.randint(0, 3, (2, 16, 16))}
    mask = torch.ones(2, 3, 16, dtype=torch.bool)
    mask[:, 0, :8] = False
    batch["teacher"] = teacher(batch["rgb"], model.grid)
    out = model(batch, mask, visible_indices(mask))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.align_head.parameters())
    total = float(sum(out["losses"].values()).detach() + out["align"].detach())  # λ_F = 1
    assert float(out["loss"].detach()) == pytest.approx(total, rel=1e-6)


def test_alignment_trains_and_of_weight_zero_leaves_every_step_as_without(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_per_class=4)
    teacher = tiny_teacher(tmp_path / "t")
    common = ["pretrain", "--data", str(data), "--epochs", "8"]
    fast = ["optim.base_lr=0.1", "train.plot_every=1000"]
    off = runner.invoke(app, [*common, "--out", str(tmp_path / "off"),
                              *[x for s in [*TINY_OVERRIDES, *fast] for x in ("--set", s)]])
    assert off.exit_code == 0, off.output
    zero = runner.invoke(app, [*common, "--out", str(tmp_path / "zero"), *align_sets(teacher, *fast,
                                                                                       "model.align.weight=0")])
    assert zero.exit_code == 0, zero.output
    on = runner.invoke(app, [*common, "--out", str(tmp_path / "on"), *align_sets(teacher, *fast)])
    assert on.exit_code == 0, on.output
    a, b = records(tmp_path / "off", "step"), records(tmp_path / "zero", "step")
    assert len(a) == len(b) == 16
    for x, y in zip(a, b):
        for key in ("loss", "loss_rgb", "loss_instance", "loss_semantic"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-6), (x["step"], key)
    assert "loss_align" not in a[0] and "loss_align" in b[0]
    epochs = records(tmp_path / "on", "epoch")
    assert epochs[-1]["loss_align"] < 0.8 * epochs[0]["loss_align"]  # the student learns the teacher's features
    assert "alignment: teacher vit_tiny_patch16_224" in (tmp_path / "on" / "log.txt").read_text()
    off_state = torch.load(tmp_path / "off/checkpoints/last.pt", weights_only=True)["model"]
    on_state = torch.load(tmp_path / "on/checkpoints/last.pt", weights_only=True)["model"]
    assert not any(k.startswith("align_head.") for k in off_state)
    assert set(on_state) - set(off_state) == {k for k in on_state if k.startswith("align_head.")}
    # a checkpoint with the projection still serves reconstruct and export (the teacher is not needed)
    photo = data / "rgb" / "a" / "a_00.png"
    out = runner.invoke(app, ["reconstruct", str(photo), "-c", str(tmp_path / "on"), "--out", str(tmp_path / "r.png")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["export", str(tmp_path / "on"), "--out", str(tmp_path / "x")])
    assert out.exit_code == 0, out.output


def test_a_run_saved_before_alignment_existed_resumes(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", n_per_class=4)
    sets = [x for s in [*TINY_OVERRIDES, "train.plot_every=1000"] for x in ("--set", s)]
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "1",
                                 *sets])
    assert result.exit_code == 0, result.output
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["model"]["align"]  # as a checkpoint written before the key
    torch.save(ckpt, path)
    result = runner.invoke(app, ["pretrain", "--resume", str(tmp_path / "r")])  # its config is read as it ran
    assert result.exit_code == 0 and "complete" in result.output, result.output


def test_bench_prices_the_teacher(tmp_path: Path) -> None:
    teacher = tiny_teacher(tmp_path / "t")
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--preset", "demo", "--compare", "demo", "--what", "step",
                                 "--steps", "1", "--warmup", "0", "--out", str(out),
                                 "--set", "model.align.enabled=true", "--set", f"model.align.teacher={teacher}"])
    assert result.exit_code == 0, result.output
    assert "ms teacher" in result.output and "GFLOP / image: teacher" in result.output
    report = json.loads(out.read_text())
    on, off = report["presets"]["demo with --set"], report["presets"]["demo"]
    assert on["step"]["phases_ms"]["teacher"] > 0 and "teacher" not in off["step"]["phases_ms"]
    # a 1-block ViT at width 24 on 16 tokens: 2 FLOP per MAC of its patch embedding, qkv, proj and MLP
    macs = 16 * 3 * 8 * 8 * 24 + 17 * (4 * 24 * 24 + 2 * 24 * 96) + 2 * 17 * 17 * 24
    assert on["flops_gflop_per_image"]["teacher"] == pytest.approx(2 * macs / 1e9, rel=0.02)
    assert on["flops_gflop_per_image"]["step"] > off["flops_gflop_per_image"]["step"]


@pytest.mark.parametrize("case", ["unknown name", "another model's file", "no weights", "not an export"])
def test_bad_teachers_are_refused(tmp_path: Path, case: str) -> None:
    import timm
    from safetensors.torch import save_file

    data = make_dataset(tmp_path / "data", n_per_class=2)
    resnet = tmp_path / "resnet.safetensors"
    if case in ("unknown name", "another model's file"):
        save_file(timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict(), str(resnet))
    (tmp_path / "folder").mkdir()
    sets = {"unknown name": ["model.align.teacher=vit_no_such_model", f"model.align.weights={resnet}"],
            "another model's file": ["model.align.teacher=vit_tiny_patch16_224", f"model.align.weights={resnet}"],
            "no weights": ["model.align.teacher=vit_tiny_patch16_224"],
            "not an export": [f"model.align.teacher={tmp_path / 'folder'}"]}[case]
    message = {"unknown name": "timm cannot build vit_no_such_model",
               "another model's file": "not weights of timm's vit_tiny_patch16_224",
               "no weights": "give its local weights file with model.align.weights",
               "not an export": "a folder, but not an export"}[case]
    args = [x for s in [*TINY_OVERRIDES, "model.align.enabled=true", *sets] for x in ("--set", s)]
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()  # set-up failed: nothing left behind
