"""Dataset layout, joint augmentation, canonical instance ids, and bad-file handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfmae_cli.data.dataset import MultiGranularDataset, Skipped, collate
from cfmae_cli.data.layout import list_samples, read_manifest, save_map, save_rgb
from cfmae_cli.data.maps import resample_map
from cfmae_cli.data.transforms import JointTransform, canonical_instance_ids
from cfmae_cli.errors import DataError
from tests.conftest import make_dataset


def joint(t: JointTransform, rgb: torch.Tensor, inst: torch.Tensor, sem: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transform of an image and its instance and semantic maps, as (image, instance, semantic)."""
    img, maps = t(rgb, {"instance": inst, "semantic": sem})
    return img, maps["instance"], maps["semantic"]


def test_canonical_ids_rank_by_area_and_cut_at_k() -> None:
    ids = torch.tensor([[0, 9, 9, 9],
                        [4, 4, 0, 7],
                        [4, 4, 0, 0],
                        [2, 0, 0, 0]])
    out = canonical_instance_ids(ids, num_ids=3)
    assert out.tolist() == [[0, 2, 2, 2], [1, 1, 0, 255], [1, 1, 0, 0], [255, 0, 0, 0]]
    assert canonical_instance_ids(torch.zeros(3, 3, dtype=torch.long), 16).eq(0).all()


def test_joint_transform_keeps_rgb_and_maps_aligned() -> None:
    """The map is coded into the image (red channel = 20·id): after crop + flip both must agree."""
    h, w = 120, 160
    inst = torch.zeros(h, w, dtype=torch.long)
    inst[:, : w // 2] = 1
    inst[: h // 3, w // 2:] = 2
    rgb = torch.zeros(3, h, w, dtype=torch.uint8)
    rgb[0] = (inst * 100).to(torch.uint8)
    t = JointTransform(64, 4, 16, (0.2, 1.0), (0.75, 1.33), 0.5, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    for _ in range(20):
        img, ins, sem = joint(t, rgb, inst.clone(), inst.clone())
        assert img.shape == (3, 64, 64) and ins.shape == (16, 16) and sem is not None
        red = img[0, 2::4, 2::4]  # pixel in the middle of every map cell
        raw = torch.round(red * 255 / 100).long()
        interior = (raw == sem)  # semantic map keeps raw ids: compare directly away from edges
        assert interior.float().mean() > 0.9


def test_uint8_from_the_loader_normalised_on_the_device_is_the_same_image() -> None:
    from cfmae_cli.data.transforms import normalise_on_device

    rgb = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    args = (32, 4, 16, (0.2, 1.0), (0.75, 1.33), 0.5, mean, std)
    torch.manual_seed(3)
    floats = JointTransform(*args)(rgb, {})[0]
    torch.manual_seed(3)
    raw = JointTransform(*args, normalise=False)(rgb, {})[0]
    assert raw.dtype == torch.uint8  # a quarter of the bytes through the loader
    assert torch.allclose(normalise_on_device(raw[None], mean, std)[0], floats, atol=1e-5)
    assert normalise_on_device(floats, mean, std) is floats  # already normalised: left alone


def test_list_samples_flat_and_class_folders(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", n_per_class=2, classes=("cat", "dog"))
    samples, classes = list_samples(root)
    assert classes == ["cat", "dog"] and len(samples) == 4
    assert [s.label for s in samples] == [0, 0, 1, 1]
    flat = tmp_path / "flat"
    for m in ("rgb", "instance", "semantic"):
        (flat / m).mkdir(parents=True)
    save_rgb(flat / "rgb" / "x.jpg", np.zeros((8, 8, 3), np.uint8))
    save_map(flat / "instance" / "x.png", np.zeros((8, 8)))
    save_map(flat / "semantic" / "x.png", np.zeros((8, 8)))
    samples, classes = list_samples(flat)
    assert classes == [] and len(samples) == 1 and samples[0].label == 0


def test_layout_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no 'rgb' folder"):
        list_samples(tmp_path)
    (tmp_path / "rgb").mkdir()
    with pytest.raises(DataError, match="no images found"):
        list_samples(tmp_path)
    root = make_dataset(tmp_path / "d", n_per_class=2, classes=("a",))
    (root / "semantic" / "a" / "a_01.png").unlink()
    with pytest.raises(DataError, match=r"a_01\.png \(no semantic map"):
        list_samples(root)
    assert list_samples(root, maps=["instance"])[0]  # an RGB+instance run does not need it
    with pytest.raises(DataError, match="cfmae-dataset.json: missing dataset manifest"):
        read_manifest(tmp_path)


def _dataset(root: Path, num_classes: int = 3) -> MultiGranularDataset:
    samples, _ = list_samples(root)
    t = JointTransform(32, 2, 16, (0.5, 1.0), (0.75, 1.33), 0.5, (0.5,) * 3, (0.5,) * 3)
    return MultiGranularDataset(samples, t, ["instance", "semantic"], num_classes)


def test_bad_samples_are_skipped_with_a_reason(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", n_per_class=4, classes=("a",))
    (root / "rgb" / "a" / "a_00.png").write_bytes(b"not an image")
    save_map(root / "instance" / "a" / "a_01.png", np.zeros((10, 10)))  # wrong size
    sem = np.array(Image.open(root / "semantic" / "a" / "a_02.png"))
    sem[0, 0] = 7  # only 3 classes in the manifest
    save_map(root / "semantic" / "a" / "a_02.png", sem)
    ds = _dataset(root)
    items = [ds[i] for i in range(4)]
    assert [isinstance(x, Skipped) for x in items] == [True, True, True, False]
    assert "unreadable" in items[0].reason
    assert "map size 10x10 differs" in items[1].reason and "a_01.png" in items[1].reason
    assert "semantic id 7 is not below the 3 classes" in items[2].reason
    batch = collate(items)
    assert batch["size"] == 1 and len(batch["skipped"]) == 3
    assert batch["rgb"].shape == (1, 3, 32, 32) and batch["instance"].dtype == torch.uint8  # ids travel as uint8


def test_collate_shapes(tmp_path: Path) -> None:
    ds = _dataset(make_dataset(tmp_path / "d", n_per_class=3))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["rgb"].shape == (6, 3, 32, 32) and batch["rgb"].dtype == torch.float32
    assert batch["semantic"].shape == (6, 16, 16) and batch["label"].tolist() == [0, 0, 0, 1, 1, 1]
    inst = batch["instance"]
    assert ((inst < 16) | (inst == 255)).all()


def bar_images(h: int, w: int, cols: tuple[int, int], rows: tuple[int, int]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An image with a vertical bar (red) on ``cols`` and a horizontal bar (green) on ``rows``, an instance map
    with the vertical bar (id 1) and a semantic map with the horizontal one (class 1)."""
    rgb = torch.zeros(3, h, w, dtype=torch.uint8)
    rgb[0, :, cols[0]:cols[1]] = 255
    rgb[1, rows[0]:rows[1], :] = 255
    inst = torch.zeros(h, w, dtype=torch.long)
    inst[:, cols[0]:cols[1]] = 1
    sem = torch.zeros(h, w, dtype=torch.long)
    sem[rows[0]:rows[1], :] = 1
    return rgb, inst, sem


def bar_centre(weights: torch.Tensor, axis: int) -> float | None:
    """The centroid of a 2-D weight map along ``axis`` (1 = across the columns), as a fraction of the side."""
    profile = weights.double().sum(1 - axis)
    coord = (torch.arange(profile.numel(), dtype=torch.float64) + 0.5) / profile.numel()
    return float((profile * coord).sum() / profile.sum()) if profile.sum() > 0 else None


def mean_misalignment(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], map_side: int
                      ) -> tuple[float, float]:
    """Mean signed offset, in map cells, between the bars' centres in the images and in the maps (x, y)."""
    dx, dy = [], []
    for img, inst, sem in pairs:
        for out, image_bar, map_bar, axis in ((dx, img[0], inst == 1, 1), (dy, img[1], sem == 1, 0)):
            a, b = bar_centre(image_bar, axis), bar_centre(map_bar, axis)
            if a is not None and b is not None and bool((image_bar < 128).any()):  # the bar is in the crop
                out.append((a - b) * map_side)
    assert len(dx) > 100 and len(dy) > 100
    return float(np.mean(dx)), float(np.mean(dy))


def test_maps_stay_on_the_image_over_random_crops() -> None:
    """A bar's centre in the cropped image and in the cropped map agree to within 0.1 map cell on average over
    many random crops (nearest-neighbour at the cells' corners would shift the maps by ~0.5 cell right and
    down). Maps at the image's size, and maps at half of it (as packed data keeps them)."""
    rgb, inst, sem = bar_images(90, 120, (38, 62), (20, 44))
    t = JointTransform(64, 4, 16, (0.2, 1.0), (0.75, 1.33), 0.0, (0.0,) * 3, (1.0,) * 3, normalise=False)
    torch.manual_seed(0)
    dx, dy = mean_misalignment([joint(t, rgb, inst, sem) for _ in range(300)], 16)
    assert abs(dx) < 0.1 and abs(dy) < 0.1, (dx, dy)
    half = resample_map(inst, (45, 60)), resample_map(sem, (45, 60))  # exact: the bars' edges are even
    assert half[0][0].nonzero().flatten().tolist() == list(range(19, 31))
    dx, dy = mean_misalignment([joint(t, rgb, *half) for _ in range(300)], 16)
    assert abs(dx) < 0.1 and abs(dy) < 0.1, (dx, dy)


def test_resample_map_is_torchvisions_nearest_exact_and_takes_fractional_boxes() -> None:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    ids = torch.randint(0, 50, (1, 37, 53))
    for box, size in [((0, 0, 37, 53), (16, 16)), ((5, 9, 20, 31), (13, 7)), ((3, 2, 30, 40), (64, 80))]:
        want = TF.resized_crop(ids, *box, list(size), interpolation=InterpolationMode.NEAREST_EXACT)
        assert torch.equal(resample_map(ids, size, box), want), box
        assert np.array_equal(resample_map(ids.numpy(), size, box), want.numpy())
    # a box given in half-size map pixels selects the same cells as the full-size box: a 2x map
    big = ids.repeat_interleave(2, -2).repeat_interleave(2, -1)
    assert torch.equal(resample_map(ids, (9, 9), (2.5, 4.5, 10.0, 15.5)), resample_map(big, (9, 9), (5, 9, 20, 31)))


def test_a_manifest_class_count_must_be_the_whole_count_of_its_names(tmp_path: Path) -> None:
    """The check the folder manifest and a packed one share (layout.check_semantic_classes)."""
    import json

    root = make_dataset(tmp_path / "d", n_per_class=1)
    manifest = json.loads((root / "cfmae-dataset.json").read_text())
    for count in (3.0, "3", True, 4):
        (root / "cfmae-dataset.json").write_text(json.dumps({**manifest, "num_semantic_classes": count}))
        with pytest.raises(DataError, match=f"num_semantic_classes is {count!r} but semantic_classes lists 3"):
            read_manifest(root)
    (root / "cfmae-dataset.json").write_text(json.dumps({**manifest, "semantic_classes": ["c"] * 255,
                                                         "num_semantic_classes": 255}))
    with pytest.raises(DataError, match="255 semantic classes; at most 254 fit in uint8 maps"):
        read_manifest(root)


def test_fine_tuning_images_skip_an_unreadable_file_raise_a_failing_transform_and_seed_every_generator(
        tmp_path: Path) -> None:
    import random

    from cfmae_cli.data.layout import Sample
    from cfmae_cli.eval.data import ImageListDataset

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (8, 8)).save(good)
    bad.write_bytes(b"not an image")
    samples = [Sample(good, {}, 0), Sample(bad, {}, 1)]

    def draw(image):  # what timm's transforms draw from: Python's, NumPy's and torch's generators
        return (random.random(), float(np.random.rand()), float(torch.rand(())))

    ds = ImageListDataset(samples, draw, seed=3)
    first, again = ds[(1, 0)], ds[(1, 0)]
    assert first == again and first["rgb"] != ds[(2, 0)]["rgb"] and first["label"] == 0
    skipped = ds[(1, 1)]
    assert isinstance(skipped, Skipped) and skipped.path == str(bad)
    assert skipped.reason.startswith("unreadable: UnidentifiedImageError: ")

    def broken(image):
        raise ValueError("a bug in a transform")

    with pytest.raises(ValueError, match="a bug in a transform"):
        ImageListDataset(samples, broken)[0]
    from cfmae_cli.eval.coco import CocoDetection  # the detection images: the same record

    coco = {"images": [{"id": 1, "file_name": str(bad), "height": 8, "width": 8}], "annotations": [],
            "categories": []}
    assert CocoDetection(coco, train=False)[(0, 0)] == Skipped(str(bad), skipped.reason)
