"""The sample list of a folder-layout dataset is a table of arrays (issue 29, item 3): the same samples as a list of
:class:`Sample`, subsets that stay tables, and no Python object per sample (what DataLoader workers would copy)."""

from __future__ import annotations

import gc
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cfmae_cli.data.layout import list_samples, save_map, save_rgb
from cfmae_cli.data.samples import Sample, SampleTable
from cfmae_cli.data.splits import find_splits, held_out, spread


def _expected(root: Path, maps: list[str]) -> list[Sample]:
    """The samples of the layout, listed the plain way (sorted class folders, sorted files)."""
    out = []
    class_dirs = sorted(d.name for d in (root / "rgb").iterdir() if d.is_dir())
    groups = [(c, root / "rgb" / c) for c in class_dirs] or [("", root / "rgb")]
    for label, (c, folder) in enumerate(groups):
        for f in sorted(p.name for p in folder.iterdir() if p.is_file()):
            stem = os.path.splitext(f)[0]
            out.append(Sample(folder / f, {m: root / m / c / f"{stem}.png" for m in maps}, label))
    return out


def _layout(root: Path, classes: dict[str, list[str]]) -> Path:
    for c, files in classes.items():
        for f in files:
            stem = os.path.splitext(f)[0]
            save_rgb(root / "rgb" / c / f, np.zeros((8, 8, 3), np.uint8))
            for m in ("instance", "semantic"):
                save_map(root / m / c / f"{stem}.png", np.zeros((8, 8)))
    return root


def test_the_table_gives_the_samples_a_list_gave(tmp_path: Path) -> None:
    # names that are not plain ASCII, with dots, of different lengths: offsets and UTF-8 must be right
    root = _layout(tmp_path / "d", {"cat": ["a.b.jpg", "zz.png"], "dög": ["é.jpg", "x" * 40 + ".jpg", "1.jpg"]})
    table, classes = list_samples(root)
    assert isinstance(table, SampleTable) and classes == ["cat", "dög"]
    want = _expected(root, ["instance", "semantic"])
    assert list(table) == want and [table[i] for i in range(len(table))] == want
    assert table[-1] == want[-1] and list(table[1:4]) == want[1:4]
    with pytest.raises(IndexError):
        table[len(want)]
    flat = _layout(tmp_path / "flat", {"": ["q.jpg", "p.jpg"]})
    table, classes = list_samples(flat, maps=["instance"])
    assert classes == [] and list(table) == _expected(flat, ["instance"])
    assert table[0].maps == {"instance": flat / "instance" / "p.png"}


def test_subsets_stay_tables_and_keep_their_samples(tmp_path: Path) -> None:
    root = _layout(tmp_path / "d", {"a": [f"a{i}.jpg" for i in range(7)], "b": [f"bb{i}.jpg" for i in range(5)]})
    table, _ = list_samples(root)
    samples = list(table)
    order = [11, 0, 5, 5, 3]
    assert isinstance(table.take(order), SampleTable) and list(table.take(order)) == [samples[i] for i in order]
    keep = [held_out(s, 0.3) for s in samples]
    assert list(table.where(keep)) == [s for s, k in zip(samples, keep) if k]
    assert len(table.take([])) == 0
    assert list(spread(table, 4)) == [samples[int(i * 3)] for i in range(4)]
    back = pickle.loads(pickle.dumps(table))  # what a spawn-started DataLoader worker receives
    assert list(back) == samples


def test_image_folder_splits_are_tables(tmp_path: Path) -> None:
    for c in ("x", "y"):
        for i in range(10):
            save_rgb(tmp_path / "imgs" / c / f"{c}{i}.jpg", np.zeros((8, 8, 3), np.uint8))
    train, val, classes, _ = find_splits(tmp_path / "imgs", 0.3, [])
    assert isinstance(train, SampleTable) and isinstance(val, SampleTable) and classes == ["x", "y"]
    every = sorted(str(s.rgb) for s in [*train, *val])
    assert every == sorted(str(p) for p in (tmp_path / "imgs").rglob("*.jpg"))
    assert all(held_out(s, 0.3) for s in val) and not any(held_out(s, 0.3) for s in train)
    assert all(s.label == ("x", "y").index(s.rgb.parent.name) and s.maps == {} for s in [*train, *val])


def test_no_python_object_per_sample() -> None:
    """A list of Samples holds several tracked objects per sample (the Sample, its dict, its Paths), whose
    reference counts a worker writes as it reads them; the table holds a handful of arrays whatever its size."""
    n = 20_000
    files = [(k, [f"n{k:08d}_{i}.JPEG" for i in range(n // 4)]) for k in range(4)]
    gc.collect()
    before = len(gc.get_objects())
    table = SampleTable.from_folders(Path("/data/rgb"), Path("/data"), ("instance", "semantic"),
                                     [f"n{k:08d}" for k in range(4)], files)
    del files
    gc.collect()
    assert len(table) == n
    assert len(gc.get_objects()) - before < 50
    assert table.names.nbytes + table.offsets.nbytes + table.labels.nbytes < 40 * n
    assert table[n - 1] == Sample(Path(f"/data/rgb/n00000003/n00000003_{n // 4 - 1}.JPEG"),
                                  {m: Path(f"/data/{m}/n00000003/n00000003_{n // 4 - 1}.png")
                                   for m in ("instance", "semantic")}, 3)


def test_file_names_that_are_not_utf8_are_listed(tmp_path: Path) -> None:
    """Linux file names are bytes: one in Latin-1 (as old archives hold) lists and reads back as the same file."""
    name = os.fsdecode(b"caf\xe9.jpg")
    root = _layout(tmp_path / "d", {"a": [name, "b.jpg"]})
    table, _ = list_samples(root)
    assert list(table) == _expected(root, ["instance", "semantic"])
    assert all(s.rgb.is_file() and s.maps["instance"].is_file() for s in table)
