"""``data.decode: gpu``: the workers read bytes and draw the crop, the device decodes and crops — the same samples
as the CPU path (``JointTransform``) where the maths allows, run here on the CPU."""

from __future__ import annotations

import io
from pathlib import Path


import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.data.dataset import collate
from cfmae_cli.data.device_augment import DeviceAugment, resample_ids, resize_images, take_skipped
from cfmae_cli.data.maps import resample_map
from cfmae_cli.data.packed import pack_dataset
from cfmae_cli.data.raw import raw_item, raw_reader
from cfmae_cli.data.transforms import canonical_instance_ids, JointTransform
from cfmae_cli.train.setup import build_dataset
from tests.conftest import make_dataset, tiny_config, TINY_OVERRIDES

CPU = torch.device("cpu")


def _transform(size: int = 32, stride: int = 2) -> JointTransform:
    return JointTransform(size, stride, 16, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, (0.5,) * 3, (0.5,) * 3, normalise=False)


def test_device_resampling_matches_the_cpu_transform() -> None:
    """Same boxes and flips: id maps (full-size and half-size, canonical instance ids) exactly JointTransform's,
    RGB within one grey level (the CPU kernel rounds its uint8 weights to fixed point and its first pass to
    uint8; the device path rounds once), and mostly equal."""
    t, g = _transform(), torch.Generator().manual_seed(0)
    equal = total = 0
    for k in range(12):
        h, w = (int(v) for v in torch.randint(20, 120, (2,), generator=g))
        rgb = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        maps = {"instance": torch.randint(0, 40, (h, w), generator=g),
                "semantic": torch.randint(0, 6, (h // 2, w // 2), generator=g)}
        torch.manual_seed(k)
        image, out = t(rgb, maps)
        torch.manual_seed(k)
        top, left, ch, cw, flip = t.draw(h, w)
        box, fl, hw = torch.tensor([[top, left, ch, cw]], dtype=torch.float64), torch.tensor([int(flip)]), \
            torch.tensor([[h, w]])
        mine = resize_images(rgb[None], box, fl, 32)[0]
        assert (mine.int() - image.int()).abs().max() <= 1
        equal, total = equal + int((mine == image).sum()), total + mine.numel()
        sem = resample_ids([maps["semantic"]], box, hw, fl, 16)[0]
        ins = resample_ids([maps["instance"]], box, hw, fl, 16)[0]
        assert torch.equal(sem, out["semantic"].long())
        assert torch.equal(canonical_instance_ids(ins, 16), out["instance"].long())
    assert equal / total > 0.8  # (85 % on these noise images)


def test_id_maps_follow_resample_maps_cell_centre_rule() -> None:
    """A batch of maps of different sizes and fractional boxes: each equals resample_map's cell-centre rule."""
    g = torch.Generator().manual_seed(1)
    maps = [torch.randint(0, 255, (h, w), generator=g, dtype=torch.uint8) for h, w in ((17, 23), (40, 9), (64, 64))]
    box = torch.tensor([[1.0, 2.0, 10.0, 15.0], [0.0, 0.0, 40.0, 9.0], [13.0, 7.0, 37.0, 51.0]], dtype=torch.float64)
    hw = torch.tensor([[34, 46], [40, 9], [64, 64]])  # the first map is half its image's size: the box scales
    out = resample_ids(maps, box, hw, torch.tensor([0, 1, 0]), 12)
    for k, m in enumerate(maps):
        f = m.shape[0] / hw[k, 0].item(), m.shape[1] / hw[k, 1].item()
        b = box[k].tolist()
        want = resample_map(m.long(), (12, 12), (b[0] * f[0], b[1] * f[1], b[2] * f[0], b[3] * f[1]))
        assert torch.equal(out[k], want.flip(-1) if k == 1 else want), k


def _palette(ids: torch.Tensor) -> torch.Tensor:
    """The colour that encodes an id (0..47): red by column block, green by row block."""
    return torch.stack([(ids % 8) * 32, (ids // 8) * 40, torch.full_like(ids, 128)]).to(torch.uint8)


def _id_image(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A piecewise-constant image of 6 x 8 blocks whose colour encodes the block's id, and the id map."""
    ids = (torch.arange(h)[:, None] * 6 // h) * 8 + torch.arange(w)[None] * 8 // w
    return _palette(ids), ids


def _jpeg(rgb: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_maps_and_rgb_stay_aligned_after_crop_and_flip() -> None:
    """After the device crop + flip, each map cell's id is the id whose colour the RGB output shows under the
    cell's centre, exactly, at every cell away from a block's edge (where bilinear blends two colours), for
    boxes and flips the workers draw: a map flipped without its image, or shifted by a cell, fails."""
    t = _transform(48, 4)
    augment = DeviceAugment(48, 4, 16, ["semantic"])
    items = []
    for k, (h, w) in enumerate([(120, 160), (200, 90), (96, 96), (150, 250), (64, 200)]):
        rgb, ids = _id_image(h, w)  # as pixels (what a worker sends for a PNG): no JPEG blur of the colours
        with torch.random.fork_rng():
            torch.manual_seed(k + 3)
            draw = t.draw(h, w)
        items.append(raw_item(rgb, (h, w), draw, {"semantic": ids.to(torch.uint8)}, 0, f"img{k}.png"))
    assert any(item["flip"] for item in items) and not all(item["flip"] for item in items)
    batch = augment(collate(items), CPU)
    palette = _palette(torch.arange(48)).float()
    checked = 0
    for rgb, sem in zip(batch["rgb"], batch["semantic"]):
        # the cell centre of a 4-pixel cell lies between pixels 1 and 2 of it: both show its colour inside a block
        under = rgb[:, 1::4, 1::4].float(), rgb[:, 2::4, 2::4].float()
        interior = (under[0] == under[1]).all(0)
        nearest = ((under[1][:, None] - palette[:, :, None, None]) ** 2).sum(0).argmin(0)
        exact = (under[1] == palette[:, sem]).all(0)
        assert torch.equal(nearest[interior], sem[interior]) and bool(exact[interior].all())
        checked += int(interior.sum())
    assert checked > 0.5 * batch["semantic"].numel()


def test_workers_draw_the_cpu_paths_boxes(tmp_path: Path) -> None:
    """The raw reader under the sample's seeded generator draws the CPU path's crop: same (epoch, index) →
    the same box and flip, hence (decoded on the device) the same maps as the CPU reader's item."""
    data = make_dataset(tmp_path / "d", n_per_class=3, size=48)
    cfg = tiny_config()
    cpu, _ = build_dataset(cfg, data)
    raw = raw_reader(cpu)
    augment = DeviceAugment(32, 2, cfg.model.num_instance_ids, ["instance", "semantic"])
    boxes = set()
    for epoch in (0, 1):
        keys = [(epoch, i) for i in range(len(cpu))]
        a, b = collate([cpu[k] for k in keys]), augment(collate([raw[k] for k in keys]), CPU)
        boxes |= {tuple(x.tolist()) for x in collate([raw[k] for k in keys])["box"]}
        assert torch.equal(a["instance"].long(), b["instance"]) and torch.equal(a["semantic"].long(), b["semantic"])
        assert (a["rgb"].int() - b["rgb"].int()).abs().max() <= 1
        assert torch.equal(a["label"], b["label"])
    assert len(boxes) == 2 * len(cpu)  # the boxes are drawn, not fixed


def test_packed_raw_reader_matches_the_packed_cpu_reader(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", n_per_class=2, size=48)
    pack_dataset(data, tmp_path / "p", size=32, map_scale=2)
    cfg = tiny_config()
    cpu, _ = build_dataset(cfg, tmp_path / "p")
    raw = raw_reader(cpu)
    keys = [(2, i) for i in range(len(cpu))]
    batch = collate([raw[k] for k in keys])
    assert isinstance(batch["data"], list) and batch["semantic"].dtype == torch.uint8
    a, b = collate([cpu[k] for k in keys]), DeviceAugment(32, 2, 16, ["instance", "semantic"])(batch, CPU)
    assert torch.equal(a["semantic"].long(), b["semantic"]) and torch.equal(a["instance"].long(), b["instance"])
    assert (a["rgb"].int() - b["rgb"].int()).abs().max() <= 1


def test_id_maps_travel_as_uint8() -> None:
    t = _transform()
    torch.manual_seed(0)
    _, out = t(torch.zeros(3, 40, 40, dtype=torch.uint8), {"instance": torch.randint(0, 300, (40, 40)),
                                                           "semantic": torch.full((40, 40), 300)})
    assert out["instance"].dtype == torch.uint8  # canonical ids: < num_instance_ids or 255
    assert out["semantic"].dtype == torch.int16 and int(out["semantic"].max()) == 300  # past 255: not cut


def test_a_jpeg_that_fails_on_the_device_is_skipped_by_name() -> None:
    augment = DeviceAugment(16, 2, 16, [])
    good = _jpeg(_id_image(40, 40)[0])
    items = [{"data": torch.frombuffer(bytearray(x), dtype=torch.uint8), "hw": torch.tensor([40, 40]),
              "box": torch.tensor([0.0, 0.0, 40.0, 40.0], dtype=torch.float64), "flip": 0, "label": k,
              "file": f"f{k}.jpg"} for k, x in enumerate([good, good[:200], good])]
    out = augment(collate(items), CPU)
    assert out["size"] == 2 and out["label"].tolist() == [0, 2] and "f1.jpg" in augment.failed
    assert [s.path for s in take_skipped(augment)] == ["f1.jpg"] and take_skipped(augment) == []
    with pytest.raises(Exception, match="f1.jpg"):
        augment(collate(items[1:2]), CPU)


def test_pretraining_runs_with_device_decode(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", n_per_class=2, size=48)
    for png in sorted((data / "rgb").rglob("*.png")):  # JPEGs: the files the device decodes
        with Image.open(png) as im:
            im.convert("RGB").save(png.with_suffix(".jpg"), quality=95)
        png.unlink()
    broken = sorted((data / "rgb").rglob("*.jpg"))[0]
    whole = broken.read_bytes()
    broken.write_bytes(whole[:len(whole) // 2])  # its header reads in the worker; its decode fails on the device
    sets = [x for item in TINY_OVERRIDES + ["data.decode=gpu", "train.epochs=1", "train.plot_every=1",
                                             "data.max_bad_fraction=0.5"] for x in ("--set", item)]
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--out", str(tmp_path / "run"), *sets])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    # the file dropped on the device is in the run's ledger of bad files, as the loader's are
    assert str(broken) in (tmp_path / "run" / "bad_files.txt").read_text()
    bad = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--set", "data.decode=fpga"])
    assert bad.exit_code == 2 and "data.decode" in bad.output





def test_an_image_map_is_resampled_like_the_image() -> None:
    """Depth (float32 at its full precision) through the device path: the CPU path's antialiased bilinear crop,
    to float rounding (both run the same filter in floating point), flipped with the image."""
    t, g = _transform(), torch.Generator().manual_seed(2)
    for k in range(6):
        h, w = (int(v) for v in torch.randint(20, 120, (2,), generator=g))
        depth = torch.rand(1, h, w, generator=g)
        torch.manual_seed(k)
        _, out = t(torch.zeros(3, h, w, dtype=torch.uint8), {"depth": depth})
        torch.manual_seed(k)
        top, left, ch, cw, flip = t.draw(h, w)
        box = torch.tensor([[top, left, ch, cw]], dtype=torch.float64)
        mine = resize_images(depth[None], box, torch.tensor([int(flip)]), 32)[0]
        assert mine.dtype == torch.float32 and torch.allclose(mine, out["depth"], atol=1e-5)


def test_crops_are_cut_and_grouped_so_one_large_photo_does_not_pad_the_batch(monkeypatch) -> None:
    """Each image is cut to its crop box and padded only with crops of its size group: the padded float32 copy
    stays under PAD_BYTES (here set to hold 2 small crops) while the result equals each sample resized alone."""
    import cfmae_cli.data.device_augment as da

    g = torch.Generator().manual_seed(5)
    sizes = [(30, 40), (300, 200), (25, 25), (33, 31), (28, 45)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    box = torch.tensor([[2, 3, 20, 30], [40, 10, 250, 180], [0, 0, 25, 25], [5, 1, 20, 28], [3, 9, 22, 30]],
                       dtype=torch.float64)
    flip = torch.tensor([0, 1, 0, 1, 0])
    padded: list[int] = []
    pad = da._pad
    monkeypatch.setattr(da, "_pad", lambda xs: padded.append(pad(xs).numel() * 4) or pad(xs))
    monkeypatch.setattr(da, "PAD_BYTES", 2 * 3 * 40 * 40 * 4)
    out = da.resize_batch(images, box, box, flip, 16)
    alone = torch.cat([resize_images(x[None], box[k:k + 1], flip[k:k + 1], 16) for k, x in enumerate(images)])
    assert torch.equal(out, alone)
    assert max(padded) <= 3 * 250 * 180 * 4  # the large photo alone, and only its crop
    assert sorted(padded)[:-1] and max(sorted(padded)[:-1]) <= da.PAD_BYTES


def test_the_device_resampling_runs_in_float32_under_the_steps_autocast() -> None:
    """The task calls the augmentation inside the step's bf16 autocast (and with TF32 on for fp32 runs): the
    resampling must not follow them, or RGB moves by more than a grey level and depth loses its precision."""
    augment = DeviceAugment(32, 2, 16, ["depth"])
    g = torch.Generator().manual_seed(3)
    rgb = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=g)
    items = [{"data": rgb, "hw": torch.tensor([60, 80]), "box": torch.tensor([3.0, 5.0, 50.0, 70.0],
              dtype=torch.float64), "flip": 1, "label": 0, "file": "x.png", "depth": torch.rand(1, 60, 80,
                                                                                         generator=g)}]
    plain = augment(collate(items), CPU)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = augment(collate(items), CPU)
    finally:
        torch.set_float32_matmul_precision(before)
    assert mixed["depth"].dtype == torch.float32 and torch.equal(mixed["depth"], plain["depth"])
    assert torch.equal(mixed["rgb"], plain["rgb"])
