"""Tests of the classical labeller and the built-in demo dataset."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from cfmae_cli.data import layout
from cfmae_cli.labeling import demo
from cfmae_cli.labeling.classical import SEMANTIC_CLASSES, ClassicalLabeller, classify_colours


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


# --------------------------------------------------------------------------- classical labeller
def test_class_list_is_small_and_unique():
    assert 8 <= len(SEMANTIC_CLASSES) <= 12
    assert len(set(SEMANTIC_CLASSES)) == len(SEMANTIC_CLASSES)


@pytest.mark.parametrize("shape", [(128, 128), (97, 203), (512, 512), (40, 17)])
def test_label_shapes_and_dtypes(astronaut, shape):
    h, w = shape
    rgb = np.asarray(Image.fromarray(astronaut).resize((w, h)))
    instance, semantic = ClassicalLabeller().label(rgb)
    assert instance.shape == (h, w) and semantic.shape == (h, w)
    assert instance.dtype in (np.uint8, np.uint16)
    assert semantic.dtype == np.uint8
    assert int(semantic.max()) < len(SEMANTIC_CLASSES)  # every pixel labelled, no 255


def test_astronaut_instances_sane(astronaut):
    instance, semantic = ClassicalLabeller().label(astronaut)
    ids = np.unique(instance)
    n = len(ids[ids > 0])
    assert 1 <= n <= 15
    # ids are consecutive 1..n, background present, and instances cover a real part of the image
    assert list(ids[ids > 0]) == list(range(1, n + 1))
    assert (instance == 0).any()
    assert 0.05 < (instance > 0).mean() < 0.99
    assert len(np.unique(semantic)) >= 3


def test_label_is_deterministic(astronaut):
    rgb = np.asarray(Image.fromarray(astronaut).resize((128, 128)))
    a = ClassicalLabeller().label(rgb)
    b = ClassicalLabeller().label(rgb.copy())
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_uniform_image_has_no_instances_and_one_class():
    rgb = np.full((64, 80, 3), (30, 60, 200), dtype=np.uint8)
    instance, semantic = ClassicalLabeller().label(rgb)
    assert instance.max() == 0
    assert set(np.unique(semantic)) == {SEMANTIC_CLASSES.index("blue")}


@pytest.mark.parametrize("colour,name", [
    ((0, 0, 0), "dark"), ((250, 250, 250), "bright"), ((128, 128, 128), "gray"),
    ((220, 20, 20), "red"), ((230, 130, 30), "orange-brown"), ((230, 220, 30), "yellow"),
    ((30, 180, 40), "green"), ((30, 200, 210), "cyan"), ((30, 60, 220), "blue"),
    ((180, 40, 200), "purple-magenta"),
])
def test_colours_map_to_consistent_classes(colour, name):
    means = np.array([colour], dtype=np.float64) / 255.0
    assert SEMANTIC_CLASSES[int(classify_colours(means, np.zeros(1))[0])] == name


def test_textured_gray_region():
    means = np.array([[0.5, 0.5, 0.5]])
    assert SEMANTIC_CLASSES[int(classify_colours(means, np.array([0.2]))[0])] == "textured"


def test_gray_and_rgba_inputs_accepted(astronaut):
    gray = skimage.data.camera()[:100, :120]
    instance, semantic = ClassicalLabeller().label(gray)
    assert instance.shape == semantic.shape == (100, 120)
    rgba = np.dstack([astronaut[:64, :64], np.full((64, 64), 255, np.uint8)])
    assert ClassicalLabeller().label(rgba)[1].shape == (64, 64)
    with pytest.raises(ValueError):
        ClassicalLabeller().label(np.zeros((4, 4, 2), np.uint8))


def test_describe_is_json_serialisable():
    desc = ClassicalLabeller(max_instances=7).describe()
    again = json.loads(json.dumps(desc))
    assert again["params"]["max_instances"] == 7
    assert again["semantic_classes"] == SEMANTIC_CLASSES


# --------------------------------------------------------------------------- demo dataset
def test_demo_photos_load_offline():
    assert len(demo.DEMO_PHOTOS) >= 8
    for name in demo.DEMO_PHOTOS:
        photo = demo.load_photo(name)
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8


def test_default_demo_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CFMAE_CACHE", str(tmp_path / "c"))
    assert demo.default_demo_root() == tmp_path / "c" / "demo-v1"
    monkeypatch.delenv("CFMAE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert demo.default_demo_root() == tmp_path / "x" / "cfmae" / "demo-v1"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert demo.default_demo_root() == tmp_path / "h" / ".cache" / "cfmae" / "demo-v1"


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    return demo.build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo-v1", crops_per_photo=2, size=48, seed=3)


def test_demo_layout(small_demo):
    samples, classes = layout.list_samples(small_demo)
    manifest = layout.read_manifest(small_demo)
    assert sorted(classes) == sorted(demo.DEMO_PHOTOS)
    assert len(samples) == manifest["counts"]["images"] == 2 * len(demo.DEMO_PHOTOS)
    assert manifest["counts"]["classes"] == len(demo.DEMO_PHOTOS)
    assert manifest["semantic_classes"] == SEMANTIC_CLASSES
    lab = manifest["labelling"]
    assert lab["recipe"] == {"crops_per_photo": 2, "size": 48, "seed": 3}
    assert lab["instance"] == lab["semantic"] == "classical"
    assert lab["photos"] == list(demo.DEMO_PHOTOS)
    assert lab["tool"].startswith("cfmae ")
    for sample in samples:
        assert sample.rgb.parent.name == classes[sample.label]
        assert sample.rgb.stem.startswith(classes[sample.label] + "_")
        rgb = np.asarray(Image.open(sample.rgb))
        inst = np.asarray(Image.open(sample.maps["instance"]))
        sem = np.asarray(Image.open(sample.maps["semantic"]))
        assert rgb.shape == (48, 48, 3)
        assert inst.shape == sem.shape == (48, 48)
        assert sem.max() < len(SEMANTIC_CLASSES)
    assert not list(small_demo.parent.glob("demo-v1.tmp-*"))


def test_demo_is_deterministic(small_demo, tmp_path):
    other = demo.build_demo_dataset(tmp_path / "again", crops_per_photo=2, size=48, seed=3)
    for rel in ("instance/coffee/coffee_001.png", "semantic/rocket/rocket_000.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(small_demo / rel)), np.asarray(Image.open(other / rel)))


def test_demo_second_call_is_cached(tmp_path):
    root = demo.build_demo_dataset(tmp_path / "d", crops_per_photo=1, size=32)
    probe = root / "semantic" / "chelsea" / "chelsea_000.png"
    manifest = root / layout.MANIFEST_NAME
    before = (probe.stat().st_mtime_ns, manifest.stat().st_mtime_ns)
    time.sleep(0.05)
    assert demo.build_demo_dataset(tmp_path / "d", crops_per_photo=1, size=32) == root
    assert (probe.stat().st_mtime_ns, manifest.stat().st_mtime_ns) == before


def test_demo_changed_recipe_rebuilds(tmp_path):
    root = demo.build_demo_dataset(tmp_path / "d", crops_per_photo=1, size=32)
    demo.build_demo_dataset(root, crops_per_photo=2, size=32)
    samples, _ = layout.list_samples(root)
    assert len(samples) == 2 * len(demo.DEMO_PHOTOS)
    assert layout.read_manifest(root)["labelling"]["recipe"]["crops_per_photo"] == 2
    demo.build_demo_dataset(root, crops_per_photo=1, size=24)
    assert np.asarray(Image.open(root / "rgb" / "retina" / "retina_000.jpg")).shape == (24, 24, 3)
    assert len(layout.list_samples(root)[0]) == len(demo.DEMO_PHOTOS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_demo_replaces_folder_without_manifest_and_leftovers(tmp_path):
    root = tmp_path / "demo-v1"
    (root / "rgb" / "junk").mkdir(parents=True)
    (root / "rgb" / "junk" / "half.jpg").write_bytes(b"not an image")
    stale = tmp_path / "demo-v1.tmp-999999999"  # from a process that is gone
    (stale / "rgb").mkdir(parents=True)
    own = tmp_path / f"demo-v1.tmp-{os.getpid()}"  # from an earlier, interrupted call in this process
    (own / "rgb" / "x").mkdir(parents=True)
    demo.build_demo_dataset(root, crops_per_photo=1, size=32)
    _, classes = layout.list_samples(root)
    assert sorted(classes) == sorted(demo.DEMO_PHOTOS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-v1"]


def test_interrupted_build_leaves_nothing_and_next_build_works(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_label = ClassicalLabeller.label

    def failing_label(self, rgb):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real_label(self, rgb)

    root = tmp_path / "demo-v1"
    monkeypatch.setattr(ClassicalLabeller, "label", failing_label)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo_dataset(root, crops_per_photo=2, size=32)
    assert list(tmp_path.iterdir()) == []  # no half dataset, no temporary folder
    # an interrupted rebuild keeps the previous complete dataset
    monkeypatch.setattr(ClassicalLabeller, "label", real_label)
    demo.build_demo_dataset(root, crops_per_photo=1, size=32)
    calls["n"] = 0
    monkeypatch.setattr(ClassicalLabeller, "label", failing_label)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo_dataset(root, crops_per_photo=2, size=32)
    assert layout.read_manifest(root)["labelling"]["recipe"]["crops_per_photo"] == 1
    assert len(layout.list_samples(root)[0]) == len(demo.DEMO_PHOTOS)
    monkeypatch.setattr(ClassicalLabeller, "label", real_label)
    demo.build_demo_dataset(root, crops_per_photo=2, size=32)
    assert len(layout.list_samples(root)[0]) == 2 * len(demo.DEMO_PHOTOS)


def test_demo_rejects_bad_parameters(tmp_path):
    from cfmae_cli.errors import DataError

    with pytest.raises(DataError):
        demo.build_demo_dataset(tmp_path / "d", crops_per_photo=0)
    with pytest.raises(DataError):
        demo.build_demo_dataset(tmp_path / "d", size=4)
