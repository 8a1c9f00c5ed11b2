"""Dataset layout, joint augmentation, canonical instance ids, and bad-file handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfmae_cli.data.dataset import MultiGranularDataset, Skipped, collate
from cfmae_cli.data.layout import list_samples, read_manifest, save_map, save_rgb
from cfmae_cli.data.transforms import JointTransform, canonical_instance_ids
from cfmae_cli.errors import DataError
from tests.conftest import make_dataset


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
        img, ins, sem = t(rgb, inst.clone(), inst.clone())
        assert img.shape == (3, 64, 64) and ins.shape == (16, 16) and sem is not None
        red = img[0, 2::4, 2::4]  # pixel in the middle of every map cell
        raw = torch.round(red * 255 / 100).long()
        interior = (raw == sem)  # semantic map keeps raw ids: compare directly away from edges
        assert interior.float().mean() > 0.9


def test_uint8_from_the_loader_normalised_on_the_device_is_the_same_image() -> None:
    from cfmae_cli.data.transforms import normalize_on_device

    rgb = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    args = (32, 4, 16, (0.2, 1.0), (0.75, 1.33), 0.5, mean, std)
    torch.manual_seed(3)
    floats = JointTransform(*args)(rgb, None, None)[0]
    torch.manual_seed(3)
    raw = JointTransform(*args, normalize=False)(rgb, None, None)[0]
    assert raw.dtype == torch.uint8  # a quarter of the bytes through the loader
    assert torch.allclose(normalize_on_device(raw[None], mean, std)[0], floats, atol=1e-5)
    assert normalize_on_device(floats, mean, std) is floats  # already normalised: left alone


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
    assert batch["rgb"].shape == (1, 3, 32, 32) and batch["instance"].dtype == torch.long


def test_collate_shapes(tmp_path: Path) -> None:
    ds = _dataset(make_dataset(tmp_path / "d", n_per_class=3))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["rgb"].shape == (6, 3, 32, 32) and batch["rgb"].dtype == torch.float32
    assert batch["semantic"].shape == (6, 16, 16) and batch["label"].tolist() == [0, 0, 0, 1, 1, 1]
    inst = batch["instance"]
    assert ((inst < 16) | (inst == 255)).all()
