"""ImageNet-A / -R / -Sketch / -C: the 200-column restriction, the mCE arithmetic, the Score, the model sources
and the messages for a wrong layout — on tiny folder trees made from real photographs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata
from torch import Tensor, nn
from typer.testing import CliRunner

from cfmae_cli.checkpoints import save_checkpoint
from cfmae_cli.cli import app
from cfmae_cli.config import EncoderArch
from cfmae_cli.eval.classifier import ViTClassifier
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.eval.models import EvalModel
from cfmae_cli.eval.robustness import (CORRUPTIONS, SEVERITIES, alexnet_errors, evaluate_suite, find_splits,
                                       imagenet_synsets, subset_columns)
from cfmae_cli.train import distributed

runner = CliRunner()
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 32
SYNSETS = imagenet_synsets()
PHOTOS = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]


def code_colour(k: int) -> tuple[int, int, int]:
    return (k // 8) * 2, (k % 8) * 32, 128


class CodeModel(nn.Module):
    """1000-way logits known in advance: +10 at the class coded in the colour of the image centre, plus a
    small ramp that makes every other choice deterministic (a lower index wins)."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        rgb = x[:, :, h // 2, w // 2] * torch.tensor(STD)[None] + torch.tensor(MEAN)[None]
        r, g = (rgb[:, 0] * 255).round(), (rgb[:, 1] * 255).round()
        k = (r / 2).round().long() * 8 + (g / 32).round().long()
        logits = -1e-3 * torch.arange(1000.0).expand(x.shape[0], -1).clone()
        logits[torch.arange(x.shape[0]), k] += 10
        return logits


def write_image(path: Path, predicted: int, photo: int = 0, size: int = 40) -> None:
    """A real photograph with its centre painted in the colour that makes CodeModel predict ``predicted``."""
    image = np.asarray(Image.fromarray(PHOTOS[photo % len(PHOTOS)]).convert("RGB").resize((size, size))).copy()
    a, b = size // 4, 3 * size // 4
    image[a:b, a:b] = code_colour(predicted)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def model() -> EvalModel:
    net = CodeModel()
    return EvalModel(net, net, SIZE, 0.875, "bicubic", MEAN, STD, "code model")


def run(root: Path, datasets: list[str]) -> dict:
    m = model()
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
    results, _ = evaluate_suite(m.forward, find_splits(root, datasets), m.resize_transform(), m.as_is_transform(),
                                batch_size=5, workers=0, info=info)
    return results


OUTSIDE_A = next(i for i in range(1000) if i not in set(subset_columns("a")))


def make_a(root: Path) -> float:
    """IN-A with four images; returns the expected top-1 (%)."""
    cols = subset_columns("a")
    first, c0, c1, c2 = cols[0], cols[5], cols[6], cols[7]
    folder = root / "imagenet-a"
    write_image(folder / SYNSETS[c0] / "0.png", c0, 0)           # right
    write_image(folder / SYNSETS[c1] / "1.png", c2, 1)           # another IN-A class: wrong
    write_image(folder / SYNSETS[c2] / "2.png", OUTSIDE_A, 2)    # outside the 200: the ramp picks cols[0]: wrong
    write_image(folder / SYNSETS[first] / "3.png", OUTSIDE_A, 3)  # … which is right for the first class
    return 50.0


def make_r(root: Path) -> float:
    cols = subset_columns("r")
    folder = root / "imagenet-r"
    write_image(folder / SYNSETS[cols[3]] / "0.jpg", cols[3])
    write_image(folder / SYNSETS[cols[3]] / "1.png", 999 if 999 not in cols else 998)  # → cols[0] ≠ cols[3]
    write_image(folder / SYNSETS[cols[0]] / "2.png", 500 if 500 not in cols else 501)  # → cols[0]: right
    return 200 / 3


def make_sketch(root: Path) -> tuple[float, float]:
    folder = root / "sketch"  # the official archive's folder name
    write_image(folder / SYNSETS[10] / "0.png", 10)
    write_image(folder / SYNSETS[11] / "1.png", 12)   # wrong, also at top-5 (12, then 0, 1, 2, 3)
    write_image(folder / SYNSETS[0] / "2.png", 700)   # wrong at top-1, right at top-5 (0 is second)
    write_image(folder / SYNSETS[20] / "3.png", 20)
    return 50.0, 75.0


def make_c(root: Path, extra: bool = True) -> dict[str, list[float]]:
    """IN-C: 2 images per split with 0, 1 or 2 wrong; returns the top-1 error of each corruption and severity."""
    errors: dict[str, list[float]] = {}
    names = list(CORRUPTIONS) + (["spatter"] if extra else [])
    for ci, corruption in enumerate(names):
        for s in SEVERITIES:
            wrong = (ci + s) % 3
            for j in range(2):
                label = 100 + ci
                write_image(root / "imagenet-c" / corruption / str(s) / SYNSETS[label] / f"{j}.png",
                            label + 1 if j < wrong else label, ci + j, size=SIZE)
            errors.setdefault(corruption, []).append(wrong / 2)
    return errors


def test_imagenet_a_and_r_take_the_200_columns(tmp_path: Path) -> None:
    expected_a, expected_r = make_a(tmp_path), make_r(tmp_path)
    results = run(tmp_path, ["a", "r"])["datasets"]
    assert results["imagenet-a"]["top1"] == pytest.approx(expected_a)
    assert results["imagenet-r"]["top1"] == pytest.approx(expected_r)
    assert results["imagenet-a"]["images"] == 4


def test_mce_against_a_hand_computation(tmp_path: Path) -> None:
    errors = make_c(tmp_path)
    for s, wrong in ((1, 1), (2, 2)):  # saturate at severities 1 and 2 only: errors 0.5 and 1.0
        for j in range(2):
            write_image(tmp_path / "imagenet-c" / "saturate" / str(s) / SYNSETS[7] / f"{j}.png",
                        8 if j < wrong else 7, j, size=SIZE)
    alex = json.loads((Path(__file__).resolve().parents[1] / "cfmae_cli/eval/imagenet-c-alexnet-errors.json")
                      .read_text())["rows"]
    by_name = {r["corruption"]: r for r in alex}
    ce = {c: 100 * sum(errors[c]) / (5 * by_name[name]["average"]) for c, name in CORRUPTIONS.items()}
    results = run(tmp_path, ["c"])["datasets"]["imagenet-c"]
    for c in CORRUPTIONS:
        assert results["ce"][c] == pytest.approx(ce[c], rel=1e-4), c  # the table's averages are rounded
    assert results["mCE"] == pytest.approx(sum(ce.values()) / 15, rel=1e-4)
    assert set(results["extra_ce"]) == {"spatter", "saturate"}  # reported apart, not in the mCE
    alexnet = alexnet_errors()
    assert results["extra_ce"]["spatter"] == pytest.approx(100 * sum(errors["spatter"]) / sum(alexnet["spatter"]))
    # an extra corruption with some severities only: AlexNet's errors at those severities
    assert results["extra_ce"]["saturate"] == pytest.approx(100 * 1.5 / sum(alexnet["saturate"][:2]))
    assert results["images"] == 16 * 5 * 2 + 4


def test_score_needs_all_four(tmp_path: Path) -> None:
    a, r = make_a(tmp_path), make_r(tmp_path)
    top1, top5 = make_sketch(tmp_path)
    make_c(tmp_path, extra=False)
    results = run(tmp_path, ["a", "r", "sketch", "c"])
    sketch = results["datasets"]["imagenet-sketch"]
    assert (sketch["top1"], sketch["top5"]) == pytest.approx((top1, top5))
    mce = results["datasets"]["imagenet-c"]["mCE"]
    assert results["score"] == pytest.approx((a + r + top1 + 100 - mce) / 4)
    partial = run(tmp_path, ["a", "sketch"])
    assert partial["score"] is None and partial["score_missing"] == ["imagenet-r", "imagenet-c"]


def tiny_classifier(tmp_path: Path, classes: list[str], favourite: list[int] = ()) -> Path:
    """A fine-tuning checkpoint of a tiny ViT; with ``favourite``, its head prefers those classes in that order
    whatever the image (a zero head weight and a bias)."""
    arch = EncoderArch(patch_size=8, embed_dim=32, depth=1, num_heads=2, map_stride=2, map_embed_dim=8)
    cfg = FinetuneConfig.model_validate({"data": {"img_size": SIZE}, "model": {"encoder": arch.model_dump(),
                                                                               "init": "random"}})
    torch.manual_seed(0)
    net = ViTClassifier(arch, SIZE, len(classes), ["rgb"], head_init_std=0.02)
    if favourite:
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.zero_()
            net.head.bias[list(favourite)] = torch.arange(len(favourite), 0, -1, dtype=torch.float32)
    path = tmp_path / "ft.pt"
    save_checkpoint(path, {"model": net.state_dict(), "config": cfg.model_dump(mode="json"), "task": "finetune",
                           "classes": classes})
    return path


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["eval-robustness", *args])
    return result.exit_code, " ".join(result.output.split())


def test_cli_writes_the_table_and_files_and_an_export_gives_the_same(tmp_path: Path) -> None:
    make_a(tmp_path / "ood")
    make_sketch(tmp_path / "ood")
    ckpt = tiny_classifier(tmp_path, SYNSETS)
    code, text = cli("--checkpoint", str(ckpt), "--root", str(tmp_path / "ood"), "--datasets", "a,sketch",
                     "--out", str(tmp_path / "run"), "--workers", "0", "--batch-size", "3")
    assert code == 0, text
    assert "Score: not computed" in text and "imagenet-r, imagenet-c" in text and "resize 36 (bicubic), centre crop 32" in text
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["datasets"]["imagenet-a"]["images"] == 4 and results["datasets"]["imagenet-sketch"]["images"] == 4
    csv = (tmp_path / "run/results.csv").read_text().splitlines()
    assert csv[0] == "dataset,metric,value" and csv[1].startswith("imagenet-a,top-1,")
    assert runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "timm")]).exit_code == 0
    code, text = cli("--checkpoint", str(tmp_path / "timm"), "--root", str(tmp_path / "ood"), "--datasets",
                     "a,sketch", "--out", str(tmp_path / "run2"), "--workers", "0")
    assert code == 0, text
    again = json.loads((tmp_path / "run2/results.json").read_text())
    for name in ("imagenet-a", "imagenet-sketch"):
        assert again["datasets"][name] == pytest.approx(results["datasets"][name])


def test_a_timm_model_with_local_weights(tmp_path: Path) -> None:
    make_sketch(tmp_path / "ood")
    net = timm.create_model("resnet18", num_classes=1000)
    weights = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), weights)
    code, text = cli("--model", "resnet18", "--checkpoint", str(weights), "--root", str(tmp_path / "ood"),
                     "--datasets", "sketch", "--img-size", "32", "--out", str(tmp_path / "run"), "--workers", "0")
    assert code == 0, text
    assert "timm resnet18" in text
    code, text = cli("--model", "resnet18", "--root", str(tmp_path / "ood"), "--datasets", "sketch")
    assert code == 2 and "local file" in text


def test_clear_messages_for_wrong_folders_and_models(tmp_path: Path) -> None:
    root = tmp_path / "ood"
    make_a(root)
    ckpt = tiny_classifier(tmp_path, SYNSETS)
    code, text = cli("--checkpoint", str(ckpt), "--root", str(root), "--datasets", "a,r")
    assert code == 2 and "no imagenet-r folder" in text and "imagenet-r/<wnid>/<image>" in text
    (root / "imagenet-a" / "cats").mkdir()
    code, text = cli("--checkpoint", str(ckpt), "--root", str(root), "--datasets", "a")
    assert code == 2 and "are not imagenet-a wnids (e.g. 'cats')" in text
    (root / "imagenet-c" / "fog" / "1").mkdir(parents=True)
    code, text = cli("--checkpoint", str(ckpt), "--root", str(root), "--datasets", "c")
    assert code == 2 and "15 corruptions x 5 severities" in text
    code, text = cli("--checkpoint", str(ckpt), "--root", str(root), "--datasets", "a,x")
    assert code == 2 and "subset of a, r, sketch, c" in text
    pre = tmp_path / "pre.pt"
    save_checkpoint(pre, {"model": {}, "config": {}, "task": "pretrain"})
    code, text = cli("--checkpoint", str(pre), "--root", str(root), "--datasets", "sketch", "--out",
                     str(tmp_path / "never"))
    assert code == 2 and "not a classifier" in text and "cfmae finetune" in text
    assert not (tmp_path / "never").exists()  # nothing is written before the checks pass
    (tmp_path / "other").mkdir()
    small = tiny_classifier(tmp_path / "other", ["cat", "dog"])
    code, text = cli("--checkpoint", str(small), "--root", str(root), "--datasets", "sketch")
    assert code == 2 and "a classifier of 2 classes" in text and "ImageNet-1k classifier" in text
    (tmp_path / "renamed").mkdir()
    renamed = tiny_classifier(tmp_path / "renamed", [f"class{i}" for i in range(1000)])
    code, text = cli("--checkpoint", str(renamed), "--root", str(root), "--datasets", "sketch")
    assert code == 2 and "not the 1000 ImageNet-1k wnids" in text


@pytest.mark.slow
def test_two_processes_count_every_image_once(tmp_path: Path) -> None:
    from tests.test_distributed import cli as subprocess_cli

    make_a(tmp_path / "ood")
    make_sketch(tmp_path / "ood")
    ckpt = tiny_classifier(tmp_path, SYNSETS, favourite=[10, subset_columns("a")[5], 12, 0])
    args = ["eval-robustness", "--checkpoint", str(ckpt), "--root", str(tmp_path / "ood"), "--datasets", "a,sketch",
            "--workers", "0", "--batch-size", "2", "--gpus", "0"]
    code, text = cli(*args[1:], "--out", str(tmp_path / "one"))  # in this process: only the two need their own
    assert code == 0, text
    subprocess_cli(*args, "--procs", "2", "--out", str(tmp_path / "two"), cwd=tmp_path)
    one = json.loads((tmp_path / "one/results.json").read_text())["datasets"]
    two = json.loads((tmp_path / "two/results.json").read_text())["datasets"]
    # sketch: always class 10 (one image of 4); IN-A: 10 is not an IN-A class, so its best column is c0 (1 of 4)
    assert one["imagenet-sketch"]["top1"] == one["imagenet-a"]["top1"] == 25.0
    for name in one:
        assert two[name] == pytest.approx(one[name])
