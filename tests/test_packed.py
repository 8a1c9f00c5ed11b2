"""`cfmae pack`: the packed copy gives the folder's items (image and maps still aligned after the joint crop),
trains, and skips what it cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.data.dataset import MultiGranularDataset
from cfmae_cli.data.layout import list_samples, save_map, save_rgb, write_manifest
from cfmae_cli.data.packed import PackedDataset, read_packed_manifest
from cfmae_cli.data.transforms import JointTransform
from tests.conftest import make_dataset
from tests.test_distributed import sets

runner = CliRunner()


def coded_dataset(root: Path, n: int = 6) -> Path:
    """Landscape images whose red channel is 60 x the id of the instance and semantic maps (vertical bands)."""
    for i in range(n):
        h, w = 72, 96
        ids = np.zeros((h, w), np.uint8)
        for band in range(4):
            ids[:, band * w // 4:(band + 1) * w // 4] = (band + i) % 4
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[..., 0] = ids * 60
        save_rgb(root / "rgb" / "c" / f"{i}.png", rgb)
        save_map(root / "instance" / "c" / f"{i}.png", ids)
        save_map(root / "semantic" / "c" / f"{i}.png", ids)
    write_manifest(root, ["a", "b", "c", "d"], {"instance": "coded", "semantic": "coded"}, {"images": n})
    return root


def agreement(ds, epochs: int = 8) -> float:
    """Share of map cells whose id is the one coded in the red channel of the pixel at the cell's centre."""
    agree = []
    for epoch in range(epochs):
        for i in range(len(ds)):
            item = ds[(epoch, i)]
            red = item["rgb"][0, 1::2, 1::2].float()
            agree.append((torch.round(red / 60).long() == item["semantic"]).float().mean())
    return float(torch.stack(agree).mean())


def test_packed_items_keep_image_and_maps_aligned(tmp_path: Path) -> None:
    src = coded_dataset(tmp_path / "src")
    for scale in ("1", "2"):
        result = runner.invoke(app, ["pack", str(src), "--out", str(tmp_path / f"packed{scale}"), "--size", "64",
                                     "--map-scale", scale, "--workers", "1"])
        assert result.exit_code == 0, result.output
    manifest = read_packed_manifest(tmp_path / "packed2")
    assert (manifest["images"], manifest["size"], manifest["map_size"]) == (6, 64, 32)
    t = JointTransform(32, 2, 16, (0.3, 1.0), (0.75, 1.33), 0.5, (0.5,) * 3, (0.5,) * 3, normalize=False)
    full, half = (PackedDataset(tmp_path / f"packed{s}", t, ["instance", "semantic"]) for s in ("1", "2"))
    item = half[(0, 0)]
    assert item["rgb"].dtype == torch.uint8 and item["rgb"].shape == (3, 32, 32)
    assert item["semantic"].shape == item["instance"].shape == (16, 16)
    assert torch.equal(half[(2, 3)]["rgb"], half[(2, 3)]["rgb"])  # (epoch, index) decides the augmentation
    samples, _ = list_samples(src)
    folder = agreement(MultiGranularDataset(samples, t, ["instance", "semantic"], 4))
    # maps stored at the image's size agree with the image as well as the original files do; at half its
    # size (the default) a band edge can move by one stored pixel
    assert agreement(full) >= folder - 0.02 and folder > 0.9
    assert agreement(half) > 0.85


def test_pretraining_reads_a_packed_folder_and_bad_files_are_skipped(tmp_path: Path) -> None:
    src = make_dataset(tmp_path / "src", n_per_class=4)
    (src / "rgb" / "a" / "a_01.png").write_bytes(b"not an image")
    out = tmp_path / "packed"
    result = runner.invoke(app, ["pack", str(src), "--out", str(out), "--size", "48", "--workers", "2",
                                 "--shard-size", "3"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "cfmae-packed.json").read_text())
    assert manifest["images"] == 7 and sum(manifest["shards"]) == 7 and len(manifest["shards"]) == 3
    assert [s["file"].endswith("a_01.png") for s in manifest["skipped"]] == [True]
    result = runner.invoke(app, ["pack", str(src), "--out", str(out)])
    assert result.exit_code == 2 and "not empty" in result.output
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", str(out), "--out", str(run), "--epochs", "1",
                                 *sets("optim.effective_batch=2", "train.batch_size=2")])
    assert result.exit_code == 0, result.output
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["semantic_classes"] == ["sky", "grass", "thing"]


def test_packed_maps_stay_on_the_packed_image() -> None:
    """Through the whole packed path (the stored square at 64 px with its maps at 32, then the training crop),
    a bar's centre in the image and in the maps agree to within 0.1 map cell on average, over images of odd
    sizes and bar positions (so that the stored square's edges and the bars fall between map cells)."""
    from PIL import Image

    from cfmae_cli.data.packed import _square, _square_map
    from tests.test_data import bar_images, joint, mean_misalignment

    rng = np.random.default_rng(0)
    t = JointTransform(32, 2, 16, (0.3, 1.0), (0.75, 1.33), 0.0, (0.0,) * 3, (1.0,) * 3, normalize=False)
    torch.manual_seed(0)
    pairs = []
    for _ in range(60):
        h, w = int(rng.integers(61, 90)), int(rng.integers(91, 130))
        x0, y0 = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
        rgb, inst, sem = bar_images(h, w, (x0, x0 + int(rng.integers(9, 25))), (y0, y0 + int(rng.integers(9, 25))))
        image = _square(Image.fromarray(rgb.permute(1, 2, 0).numpy()), 64, Image.Resampling.BICUBIC)
        stored = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        maps = [torch.from_numpy(_square_map(m.numpy(), 64, 32)) for m in (inst, sem)]
        pairs += [joint(t, stored, *maps) for _ in range(5)]
    dx, dy = mean_misalignment(pairs, 16)
    assert abs(dx) < 0.1 and abs(dy) < 0.1, (dx, dy)
