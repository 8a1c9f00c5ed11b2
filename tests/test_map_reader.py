"""One reader of id maps (``cfmae_cli.data.maps.read_ids``): one decision per PIL mode, palette maps read as
their indices, colour and alpha refused with one message; ``cfmae pack`` and training keep and skip the same
samples for the same reasons; the figures, the label preview and ``attention-map --stats`` read maps the same
way and name a file they cannot use."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.data.dataset import MultiGranularDataset, Skipped, read_maps
from cfmae_cli.data.layout import list_samples, save_map
from cfmae_cli.data.maps import BadSample, read_ids
from cfmae_cli.data.packed import PackedDataset, _square_map, read_packed_manifest
from cfmae_cli.data.transforms import JointTransform
from cfmae_cli.errors import CfmaeError
from tests.conftest import make_dataset

runner = CliRunner()
# index k is drawn in a colour whose luminance is not k (index 0 light, 1 dark, 2 mid-grey-ish red, ...)
PALETTE = [c for k in range(256) for c in ((250 - 7 * k) % 256, (90 + 31 * k) % 256, (13 * k + 170) % 256)]


def palette_png(path: Path, ids: np.ndarray) -> None:
    """``ids`` (uint8) saved as a palette PNG whose indices are the ids, drawn in :data:`PALETTE`."""
    im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), np.ascontiguousarray(ids, np.uint8).tobytes())
    im.putpalette(PALETTE)
    im.save(path)


def test_each_mode_gives_its_ids_or_one_refusal(tmp_path: Path) -> None:
    ids = np.array([[0, 1, 2], [255, 7, 1]], np.uint8)
    Image.fromarray(ids).save(tmp_path / "grey.png")
    assert np.array_equal(read_ids(tmp_path / "grey.png", (3, 2)), ids)
    palette_png(tmp_path / "palette.png", ids)
    with Image.open(tmp_path / "palette.png") as im:
        assert im.mode == "P" and not np.array_equal(np.asarray(im.convert("L")), ids)  # colours are not ids
    got = read_ids(tmp_path / "palette.png", (3, 2), "semantic")
    assert got.dtype == np.int64 and np.array_equal(got, ids)
    wide = np.array([[0, 300], [65535, 7]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")  # 16-bit grey: I;16
    Image.frombytes("I;16B", (2, 2), wide.astype(">u2").tobytes()).save(tmp_path / "wide.tif")
    for name in ("wide.png", "wide.tif"):
        assert np.array_equal(read_ids(tmp_path / name), wide), name
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I (an older Pillow's 16-bit PNG)
    assert np.array_equal(read_ids(tmp_path / "i32.tif"), wide)
    Image.fromarray(np.array([[0, 70000], [3, 4]], np.int32)).save(tmp_path / "i32-big.tif")
    with pytest.raises(BadSample, match=r"i32-big\.tif: id ids 0\.\.70000 lie outside \[0, 65535\]"):
        read_ids(tmp_path / "i32-big.tif")
    Image.fromarray(np.array([[True, False], [False, True]])).save(tmp_path / "bits.png")  # mode 1: 0 and 1
    assert read_ids(tmp_path / "bits.png").tolist() == [[1, 0], [0, 1]]
    for mode, why in [("LA", "an alpha channel"), ("RGBA", "an alpha channel"), ("RGB", "colour channels"),
                      ("CMYK", "colour channels"), ("F", "floating-point values")]:
        path = tmp_path / f"{mode}.{'tif' if mode in ('CMYK', 'F') else 'png'}"
        Image.new(mode, (3, 2)).save(path)
        with pytest.raises(BadSample) as err:
            read_ids(path, (3, 2), "semantic")
        text = str(err.value)
        assert text.startswith(f"{path}: a semantic map must hold one id per pixel") and f"mode {mode} ({why})" in text
        assert "save the ids as an 8-bit grey PNG" in text
    with pytest.raises(BadSample, match=r"grey\.png: map size 3x2 differs from the image's 4x2"):
        read_ids(tmp_path / "grey.png", (4, 2))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(BadSample, match=r"junk\.png: not a readable image \(UnidentifiedImageError"):
        read_ids(tmp_path / "junk.png")


def palette_dataset(root: Path) -> Path:
    """:func:`make_dataset` (3 per class, classes a and b) with palette semantic maps, class b's instance maps
    16-bit with ids above 255, a semantic map with an alpha channel (a_01) and an instance map that is no image
    (b_02)."""
    make_dataset(root, n_per_class=3)
    for path in sorted((root / "semantic").rglob("*.png")):
        with Image.open(path) as im:
            ids = np.asarray(im)
        palette_png(path, ids)
    for path in sorted((root / "instance" / "b").glob("*.png")):
        with Image.open(path) as im:
            ids = np.asarray(im).astype(np.uint16)
        save_map(path, np.where(ids > 0, ids + 300, 0))
    sem = root / "semantic" / "a" / "a_01.png"
    with Image.open(sem) as im:
        Image.merge("LA", [im.convert("L"), im.convert("L")]).save(sem)
    (root / "instance" / "b" / "b_02.png").write_bytes(b"not a png")
    return root


def test_palette_maps_pack_and_training_keep_the_same_samples_with_the_same_ids(tmp_path: Path) -> None:
    """The folder reader (training) and ``cfmae pack`` read the palette maps as their indices: the packed maps
    are the folder's ids sampled over the stored square, sample by sample; both skip the alpha map and the
    unreadable one, with the same reasons; the counts agree."""
    src = palette_dataset(tmp_path / "src")
    out = tmp_path / "packed"
    result = runner.invoke(app, ["pack", str(src), "--out", str(out), "--size", "48", "--shard-size", "3",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "packed 4 images" in result.output and "2 skipped" in result.output
    samples, _ = list_samples(src)
    t = JointTransform(32, 2, 16, (0.5, 1.0), (0.75, 1.33), 0.5, (0.5,) * 3, (0.5,) * 3)
    folder = MultiGranularDataset(samples, t, ["instance", "semantic"], 3)
    items = [folder[i] for i in range(len(folder))]
    skipped = [(x.path, x.reason) for x in items if isinstance(x, Skipped)]
    manifest = read_packed_manifest(out)
    assert [(s["file"], s["reason"]) for s in manifest["skipped"]] == skipped
    assert [Path(f).name for f, _ in skipped] == ["a_01.png", "b_02.png"]
    assert "a_01.png: a semantic map must hold one id per pixel" in skipped[0][1] and "mode LA" in skipped[0][1]
    assert "b_02.png: not a readable image" in skipped[1][1]
    kept = [s for s, x in zip(samples, items) if not isinstance(x, Skipped)]
    packed = PackedDataset(out, t, ["instance", "semantic"])
    assert manifest["images"] == len(packed) == len(kept) == 4
    for i, sample in enumerate(kept):
        with Image.open(sample.rgb) as im:
            ids = read_maps(sample, im.size, ["instance", "semantic"], 3)
        k, j = (int(v) for v in packed.index[i])
        shard = packed.shard(k)
        for name in ("instance", "semantic"):
            assert np.array_equal(shard[name][j], _square_map(ids[name].numpy(), 48, 24)), (sample.rgb, name)
        assert int(shard["labels"][j]) == sample.label
    assert set(np.unique(packed.shard(0)["semantic"]).tolist()) <= {0, 1, 2}  # indices, not luminances
    assert packed.shard(1)["instance"].max() > 300


def test_figures_preview_and_stats_read_palette_maps_and_name_a_bad_one(tmp_path: Path, caplog) -> None:
    from cfmae_cli.labeling.preview import write_preview
    from cfmae_cli.viz.inference import dataset_maps

    data = palette_dataset(tmp_path / "data")
    image = data / "rgb" / "a" / "a_00.png"
    maps, classes = dataset_maps(image, ["instance", "semantic"], (48, 48))
    assert classes == ["sky", "grass", "thing"] and set(np.unique(maps["semantic"]).tolist()) == {0, 1, 2}
    with pytest.raises(CfmaeError, match=r"a_01\.png: a semantic map must hold one id per pixel .* mode LA"):
        dataset_maps(data / "rgb" / "a" / "a_01.png", ["instance", "semantic"], (48, 48))
    # the label preview: the palette map's classes in the legend, the unreadable map's image left out by name
    (data / "meta").mkdir()
    records = [{"rgb": f"{c}/{c}_{i:02d}.png", "class": c, "stem": f"{c}_{i:02d}"} for c in "ab" for i in range(3)]
    for c in "ab":
        (data / "meta" / f"{c}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["class"] == c))
    with caplog.at_level(logging.WARNING):
        assert write_preview(data, 6) == data / "preview.png"
    assert "a_01.png left out" in caplog.text and "b_02.png left out" in caplog.text
    # attention-map --stats: exit 2 naming the unreadable map, nothing written
    out = tmp_path / "stats.json"
    result = runner.invoke(app, ["attention-map", "--stats", str(data), "--checkpoint", "random", "--out", str(out),
                                 "--device", "cpu"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"error: {data / 'semantic' / 'a' / 'a_01.png'}: a semantic map must hold one id per pixel" in text
    assert "--stats reads every image it picks" in text and not out.exists()
    palette_png(data / "semantic" / "a" / "a_01.png", np.zeros((48, 56), np.uint8))  # fixed: the next bad file
    result = runner.invoke(app, ["attention-map", "--stats", str(data), "--checkpoint", "random", "--out", str(out),
                                 "--device", "cpu"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"error: {data / 'instance' / 'b' / 'b_02.png'}: not a readable image (UnidentifiedImageError" in text
    assert not out.exists()
