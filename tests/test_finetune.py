"""Fine-tuning: layer-wise decay, the run folder and its metrics, linear probe, multi-granular input, weights
from MAE files or of another size, broken files, mixing, splits, and exact resume."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import timm
import torch
import yaml
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.config import EncoderArch, load_config
from cfmae_cli.data.splits import find_splits
from cfmae_cli.errors import DataError
from cfmae_cli.eval.classification import Mixer
from cfmae_cli.eval.classifier import ViTClassifier, load_classifier
from cfmae_cli.eval.config import AugConfig, FinetuneConfig, FtOptimConfig
from cfmae_cli.eval.task import layer_decay_groups
from tests.conftest import make_dataset
from tests.test_export import _mae_state, _ours
from tests.test_resume import start, wait_for_step
from tests.test_distributed import cli

runner = CliRunner()
FT_OVERRIDES = ["data.img_size=32", "data.num_workers=0", "optim.effective_batch=4", "train.batch_size=4",
                "optim.warmup_epochs=1", "train.epochs=2", "train.log_every=1", "train.save_every=1"]
TINY_ARCH = "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 4.0, map_stride: 2, " \
            "map_embed_dim: 8, num_instance_ids: 16}"


def ft_sets(*extra: str) -> list[str]:
    return [x for item in FT_OVERRIDES + list(extra) for x in ("--set", item)]


def splits(root: Path) -> Path:
    """train/ and val/ in the dataset layout (2 classes: 6 + 2 images each)."""
    make_dataset(root / "train", n_per_class=6, seed=0)
    make_dataset(root / "val", n_per_class=2, seed=1)
    return root


def image_folder(root: Path) -> Path:
    """The same images as a plain ImageFolder: ROOT/{train,val}/<class>/<image>."""
    layout = splits(root / "layout")
    for split in ("train", "val"):
        shutil.copytree(layout / split / "rgb", root / "imagenet" / split)
    return root / "imagenet"


def finetune(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["finetune", *args])
    return result.exit_code, " ".join(result.output.split())


def epochs(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]


def test_layer_decay_scales_follow_the_depth() -> None:
    depth, decay = 3, 0.5
    arch = EncoderArch(patch_size=8, embed_dim=32, depth=depth, num_heads=2, map_stride=2, map_embed_dim=8)
    model = ViTClassifier(arch, 32, 5, ["rgb", "semantic"], 3)
    groups = layer_decay_groups(model, FtOptimConfig(layer_decay=decay, weight_decay=0.05))
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale, wd = {}, {}
    for group in groups:
        for p in group["params"]:
            assert name_of[id(p)] not in scale, "a parameter in two groups"
            scale[name_of[id(p)]], wd[name_of[id(p)]] = group["lr_scale"], group["weight_decay"]
    assert set(scale) == {n for n, p in model.named_parameters() if p.requires_grad}

    def layer(name: str) -> int:
        if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed", "adapters.")):
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        assert name.startswith(("fc_norm", "head")), name
        return depth + 1

    for name, value in scale.items():
        assert value == pytest.approx(decay ** (depth + 1 - layer(name))), name
    assert scale["head.weight"] == 1.0 and scale["encoder.patch_embed.proj.weight"] == pytest.approx(decay ** 4)
    assert wd["head.weight"] == 0.05 and wd["encoder.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["head.bias"] == wd["fc_norm.weight"] == wd["encoder.cls_token"] == wd["encoder.pos_embed"] == 0.0


def mae_interpolated(table: torch.Tensor, grid: int) -> torch.Tensor:
    """MAE's ``interpolate_pos_embed``, written out: the global-token row kept, the patch rows as a square image
    resized bicubically (align_corners=False)."""
    side = int((table.shape[1] - 1) ** 0.5)
    square = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    square = torch.nn.functional.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], square.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("kind", ["classification", "segmentation", "detection"])
def test_the_position_table_is_fine_tuned_from_the_checkpoints(kind: str) -> None:
    """MAE's protocol: the pre-trained table, resized bicubically to the fine-tuning grid, is a trained
    parameter in layer 0 of the layer-wise decay (no weight decay) — for all three kinds of transfer."""
    from cfmae_cli.eval.classifier import load_encoder_weights
    from cfmae_cli.eval.detection import ViTMaskRCNN
    from cfmae_cli.eval.segmentation import ViTSegmenter

    arch = EncoderArch(patch_size=8, embed_dim=32, depth=2, num_heads=2, map_stride=2, map_embed_dim=8)
    torch.manual_seed(0)
    table = torch.randn(1, 1 + 4 * 4, 32)  # a learned-looking table of a 32 px pre-training (4 x 4 patches)
    state = {"encoder.pos_embed": table, "encoder.patch_embed.proj.weight": torch.randn(32, 3, 8, 8),
             "encoder.blocks.0.norm1.weight": torch.ones(32)}
    if kind == "classification":
        model, prefix = ViTClassifier(arch, 48, 5, ["rgb"]), "encoder."
    elif kind == "segmentation":
        model, prefix = ViTSegmenter(arch, 48, 5, [0, 0, 1, 1], channels=16), "encoder."
    else:
        cfg = load_config("ft-det-demo", ["data.img_size=48", "data.max_size=48", "model.fpn_channels=16"],
                          FinetuneConfig)
        model, prefix = ViTMaskRCNN(arch, cfg, 3), "backbone.encoder."
    target = model.backbone if kind == "detection" else model
    load_encoder_weights(target, state, "pretrained.pt")
    assert torch.allclose(target.encoder.pos_embed, mae_interpolated(table, 6), atol=1e-6)  # 48 px: 6 x 6
    groups = layer_decay_groups(model, FtOptimConfig(layer_decay=0.5, weight_decay=0.05))
    (group,) = [g for g in groups if any(p is target.encoder.pos_embed for p in g["params"])]
    assert group["lr_scale"] == pytest.approx(0.5 ** 3) and group["weight_decay"] == 0.0  # layer 0 of depth 2
    assert target.encoder.pos_embed.requires_grad and prefix + "pos_embed" in model.no_weight_decay()


def test_finetune_on_an_image_folder(tmp_path: Path) -> None:
    data = image_folder(tmp_path)
    _, ckpt = _ours(tmp_path)
    out = tmp_path / "run"
    code, text = finetune("--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), *ft_sets())
    assert code == 0, text
    assert "best top-1" in text and f"Run folder: {out}" in text
    records = epochs(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["val_images"] == 4 and 0 <= r["top1"] <= 100 and r["top5"] == 100.0  # 2 classes: top-5 is all
        assert r["val_loss"] > 0
    best = max(records, key=lambda r: (r["top1"], -r["epoch"]))
    assert records[-1]["best_top1"] == best["top1"] and records[-1]["best_epoch"] == best["epoch"]
    assert torch.load(out / "checkpoints/best.pt", weights_only=True)["epoch"] == best["epoch"]
    last = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert last["task"] == "finetune" and last["classes"] == ["a", "b"]
    lrs = {round(g["lr"] / g["lr_scale"], 12) for g in last["optimizer"]["param_groups"]}
    assert len(lrs) == 1 and len(last["optimizer"]["param_groups"]) > 2  # one schedule, scaled per layer
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["task"] == "finetune" and cfg["model"]["init"] == str(ckpt.resolve())
    assert cfg["model"]["encoder"]["embed_dim"] == 32 and cfg["model"]["encoder"]["depth"] == 2
    assert (out / "plots" / "loss.png").is_file()
    assert_exports_to_timm(out / "checkpoints/best.pt", tmp_path / "export")


def assert_exports_to_timm(ckpt: Path, folder: Path) -> None:
    """`cfmae export` of a classifier: timm's model gives our logits (strict keys, the head included)."""
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(folder)])
    assert result.exit_code == 0, result.output
    config = json.loads((folder / "config.json").read_text())
    classes = config["num_classes"]
    theirs = timm.create_model(config["architecture"], pretrained=True, num_classes=classes,
                               pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                           num_classes=classes), **config["model_args"]).eval()
    ours, _, names = load_classifier(ckpt)
    assert config["label_names"] == names
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (ours({"rgb": x}) - theirs(x)).abs().max() < 1e-5


def test_linear_probe_keeps_the_encoder(tmp_path: Path) -> None:
    data = splits(tmp_path / "data")
    source, ckpt = _ours(tmp_path)
    out = tmp_path / "run"
    code, text = finetune("--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--mode", "linear",
                          *ft_sets())
    assert code == 0, text
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    for key, value in source.state_dict().items():
        if key.startswith("encoder.") and key != "encoder.pos_embed":
            assert torch.equal(state[key], value), key
    assert "head.0.running_mean" in state  # the norm without affine parameters before the linear layer
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["mode"] == "linear" and cfg["optim"]["name"] == "lars" and cfg["aug"]["mixup"] == 0.0
    assert_exports_to_timm(out, tmp_path / "export")  # the BatchNorm folded into the linear head


def test_multi_granular_input_uses_the_pretrained_adapters(tmp_path: Path) -> None:
    data = splits(tmp_path / "data")
    source, ckpt = _ours(tmp_path)
    out = tmp_path / "run"
    code, text = finetune("--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--modalities",
                          "rgb,instance,semantic", *ft_sets("optim.lr=1e-12", "train.epochs=1"))
    assert code == 0, text
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    for key in ("adapters.semantic.embed.weight", "adapters.instance.proj.weight"):
        assert torch.allclose(state[key], source.state_dict()[key], atol=1e-6), key
    assert epochs(out)[0]["val_images"] == 4
    result = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "export")])
    assert result.exit_code == 2 and "takes RGB only" in " ".join(result.output.split())
    # RGB-only folders cannot feed maps: the message says what to do
    code, text = finetune("--checkpoint", str(ckpt), "--data", str(image_folder(tmp_path / "imf")), "--out",
                          str(tmp_path / "r2"), "--modalities", "rgb,instance,semantic", *ft_sets())
    assert code == 2 and "dataset layout" in text and "cfmae label" in text


def test_weights_from_an_mae_file(tmp_path: Path) -> None:
    data = image_folder(tmp_path)
    source, _ = _ours(tmp_path)
    mae = tmp_path / "mae.pth"
    torch.save({"model": _mae_state(source)}, mae)
    out = tmp_path / "run"
    code, text = finetune("--checkpoint", str(mae), "--data", str(data), "--out", str(out),
                          *ft_sets("optim.lr=1e-12", "train.epochs=1", f"model.encoder={TINY_ARCH}"))
    assert code == 0, text
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    for key in ("encoder.blocks.1.mlp.fc2.weight", "encoder.patch_embed.proj.weight", "encoder.cls_token"):
        assert torch.allclose(state[key], source.state_dict()[key], atol=1e-6), key
    assert "(mae format)" in (out / "log.txt").read_text()


def test_another_size_and_broken_files_are_refused(tmp_path: Path) -> None:
    data = image_folder(tmp_path)
    (tmp_path / "wide").mkdir()
    _, wide = _ours(tmp_path / "wide", "model.embed_dim=48", "model.num_heads=2")
    code, text = finetune("--checkpoint", str(wide), "--data", str(data), "--out", str(tmp_path / "r1"),
                          *ft_sets(f"model.encoder={TINY_ARCH}"))
    assert code == 2 and "embed_dim 32 in the config, 48 in the checkpoint" in text
    assert not (tmp_path / "r1").exists()
    # without model.encoder the checkpoint's own size is fine-tuned
    code, text = finetune("--checkpoint", str(wide), "--data", str(data), "--out", str(tmp_path / "r2"),
                          *ft_sets("train.epochs=1"))
    assert code == 0, text
    assert yaml.safe_load((tmp_path / "r2/config.yaml").read_text())["model"]["encoder"]["embed_dim"] == 48
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x02garbage")
    code, text = finetune("--checkpoint", str(broken), "--data", str(data), "--out", str(tmp_path / "r3"),
                          *ft_sets())
    assert code == 2 and f"{broken}: the file is damaged" in text and not (tmp_path / "r3").exists()
    code, text = finetune("--checkpoint", str(tmp_path / "nope.pt"), "--data", str(data), *ft_sets())
    assert code == 2 and "nope.pt: no such file" in text
    code, text = finetune("--checkpoint", "random", "--data", str(data / "train"), "--out", str(tmp_path / "r4"),
                          *ft_sets("data.val_fraction=null"))
    assert code == 2 and "no train/ and val/ folders" in text and "data.val_fraction" in text


def test_a_finetune_preset_is_refused_by_pretrain() -> None:
    result = runner.invoke(app, ["pretrain", "--preset", "ft-demo"])
    assert result.exit_code == 2 and "cfmae finetune" in " ".join(result.output.split())


def test_cutmix_pastes_the_same_box_into_the_maps() -> None:
    mixer = Mixer(AugConfig(mixup=0.0, cutmix=1.0, label_smoothing=0.0), num_classes=4, map_stride=2)
    rgb = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    sem = torch.arange(4).view(4, 1, 1).expand(4, 8, 8).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        mixed, target = mixer({"rgb": rgb, "semantic": sem}, labels, seed)
        again, _ = mixer({"rgb": rgb, "semantic": sem}, labels, seed)
        assert torch.equal(mixed["rgb"], again["rgb"])  # the seed decides
        pasted = mixed["rgb"][:, 0] != rgb[:, 0]  # (4, 16, 16): the box, taken from the flipped batch
        lam = 1 - pasted[0].float().mean().item()
        assert torch.allclose(target, lam * torch.eye(4) + (1 - lam) * torch.eye(4).flip(0), atol=1e-6)
        map_pasted = mixed["semantic"] != sem
        assert torch.equal(mixed["semantic"][map_pasted], sem.flip(0)[map_pasted])
        rows, cols = pasted[0].any(1).nonzero(), pasted[0].any(0).nonzero()
        if len(rows):  # the map box is the image box at stride 2
            box = torch.zeros(8, 8, dtype=torch.bool)
            box[rows.min() // 2: (rows.max() + 1) // 2, cols.min() // 2: (cols.max() + 1) // 2] = True
            assert torch.equal(map_pasted[0], box)
    assert rgb[:, 0].unique().tolist() == [0.0, 1.0, 2.0, 3.0]  # the inputs are not changed in place


def test_split_by_fraction_is_stable_and_checked(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "flat", n_per_class=20)
    train, val, classes, _ = find_splits(root, 0.25, [])
    again = find_splits(root, 0.25, [])
    assert [s.rgb for s in val] == [s.rgb for s in again[1]] and classes == ["a", "b"]
    assert not {s.rgb for s in train} & {s.rgb for s in val} and len(train) + len(val) == 40
    assert 4 <= len(val) <= 16
    odd = splits(tmp_path / "odd")
    shutil.rmtree(odd / "val" / "rgb" / "b")
    make_dataset(odd / "val", n_per_class=1, classes=("a", "c"))
    with pytest.raises(DataError, match=r"only in train: \['b'\]; only in val: \['c'\]"):
        find_splits(odd, None, [])


@pytest.mark.slow
def test_sigterm_then_resume_equals_an_unbroken_finetune(tmp_path: Path) -> None:
    data = image_folder(tmp_path)
    _, ckpt = _ours(tmp_path)
    args = ["finetune", "--checkpoint", str(ckpt), "--data", str(data), *ft_sets("train.epochs=4")]  # 3 steps an epoch
    code, text = finetune(*args[1:], "--out", str(tmp_path / "unbroken"))  # in this process, as the resume
    assert code == 0, text
    proc = start([*args, "--out", str(tmp_path / "stopped")], tmp_path)
    wait_for_step(tmp_path / "stopped", 7, proc)  # in epoch 3, after two evaluations
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    code, text = finetune("--resume", str(tmp_path / "stopped"))
    assert code == 0, text

    def records(run: str) -> list[dict]:
        return [r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    a, b = records("stopped"), records("unbroken")
    assert [(r["type"], r["step"]) for r in a] == [(r["type"], r["step"]) for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "lr", "top1", "val_loss"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (y["step"], key)
    wa = torch.load(tmp_path / "stopped/checkpoints/last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "unbroken/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wb)


def test_randaugment_posterize_at_full_magnitude_gives_black() -> None:
    """timm asks Pillow for 0 bits at the largest magnitude; Pillow >= 12 refuses that, we give black."""
    from PIL import Image
    from timm.data import create_transform

    from cfmae_cli.eval.data import pillow_safe

    transform = pillow_safe(create_transform(32, is_training=True, auto_augment="rand-m10-mstd0-inc1"))
    op = next(op for t in transform.transforms for op in getattr(t, "ops", []) if "Posterize" in op.name)
    op.prob, op.magnitude = 1.0, 10
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert out.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.slow
def test_two_cpu_processes_share_the_training_and_the_evaluation(tmp_path: Path) -> None:
    data = image_folder(tmp_path)
    _, ckpt = _ours(tmp_path)
    cli("finetune", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ddp"), "--gpus", "0",
        "--procs", "2", *ft_sets("train.batch_size=2"), cwd=tmp_path)
    records = epochs(tmp_path / "ddp")
    assert [r["val_images"] for r in records] == [4, 4]  # each val image once, over both ranks
    assert (tmp_path / "ddp/checkpoints/best.pt").is_file()


def test_finetune_presets_hold_table_8() -> None:
    from cfmae_cli.config import load_config
    from cfmae_cli.eval.config import FinetuneConfig

    b400 = load_config("ft-vitb-400e", schema=FinetuneConfig)
    b1600 = load_config("ft-vitb-1600e", schema=FinetuneConfig)
    assert (b400.optim.base_lr, b400.optim.layer_decay, b1600.optim.base_lr, b1600.optim.layer_decay) == \
        (1e-3, 0.7, 5e-4, 0.65)
    assert (b400.optim.betas, b400.optim.weight_decay, b400.optim.effective_batch, b400.train.epochs,
            b400.optim.warmup_epochs) == ((0.9, 0.999), 0.05, 2048, 100, 5)
    assert (b400.aug.auto_augment, b400.aug.label_smoothing, b400.aug.mixup, b400.aug.cutmix,
            b400.model.drop_path, b400.model.global_pool, b400.data.img_size) == \
        ("rand-m9-mstd0.5-inc1", 0.1, 0.8, 1.0, 0.1, "avg", 224)
    probe = load_config("ft-vitb-1600e", schema=FinetuneConfig, mode="linear")
    assert (probe.mode, probe.optim.name, probe.optim.base_lr, probe.optim.layer_decay, probe.aug.mixup,
            probe.model.global_pool, probe.train.epochs) == ("linear", "lars", 0.1, 1.0, 0.0, "token", 90)
    result = runner.invoke(app, ["presets", "ft-vitb-400e", "--gpus", "8"])
    assert result.exit_code == 0, result.output
    assert "task: finetune" in result.output and "lr 8.0e-03 at effective batch 2048" in result.output
