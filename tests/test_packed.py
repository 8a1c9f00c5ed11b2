"""`cfmae pack`: the packed copy gives the folder's items (image and maps still aligned after the joint crop),
trains, and skips what it cannot read; a packed folder whose manifest or shard files do not hold together is
refused before anything is sized by it; pack's workers die with it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.data.dataset import MultiGranularDataset
from cfmae_cli.data.layout import list_samples, save_map, save_rgb, write_manifest
from cfmae_cli.data.packed import PackedDataset, read_packed_manifest
from cfmae_cli.data.transforms import JointTransform
from cfmae_cli.errors import DataError
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
    t = JointTransform(32, 2, 16, (0.3, 1.0), (0.75, 1.33), 0.5, (0.5,) * 3, (0.5,) * 3, normalise=False)
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
    t = JointTransform(32, 2, 16, (0.3, 1.0), (0.75, 1.33), 0.0, (0.0,) * 3, (1.0,) * 3, normalise=False)
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


# -- a packed folder is checked before anything is sized by it -----------------------------------------------
T = JointTransform(32, 2, 16, (0.5, 1.0), (0.75, 1.33), 0.5, (0.5,) * 3, (0.5,) * 3, normalise=False)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`make_dataset` (2 classes x 2 images) packed at 48 px (maps 24 px) in shards of 3 and 1 images."""
    root = tmp_path_factory.mktemp("packed")
    src = make_dataset(root / "src", n_per_class=2)
    result = runner.invoke(app, ["pack", str(src), "--out", str(root / "p"), "--size", "48", "--shard-size", "3",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    return root / "p"


def _copy(packed: Path, to: Path) -> Path:
    shutil.copytree(packed, to)
    return to


def _rewrite(path: Path, change) -> None:
    """Rewrite the array of a shard file as ``change`` returns it."""
    np.save(path, change(np.load(path)))


def _cut(p: Path) -> None:
    blob = p / "shard-00001.jpg.bin"
    blob.write_bytes(blob.read_bytes()[:-1])


DAMAGE = {  # damage to a packed folder → what the message says (after the file's path)
    "maps cut to 8x8": ("shard-00000.instance.npy", lambda p: _rewrite(p / "shard-00000.instance.npy",
                                                                      lambda a: a[:, :8, :8].copy()),
                        ["uint8 of shape (3, 8, 8)", "uint8 or uint16 of shape (3, 24, 24)"]),
    "a map of floats": ("shard-00000.semantic.npy", lambda p: _rewrite(p / "shard-00000.semantic.npy",
                                                                      lambda a: a.astype(np.float32)),
                        ["float32 of shape (3, 24, 24)"]),
    "labels of int64": ("shard-00000.labels.npy", lambda p: _rewrite(p / "shard-00000.labels.npy",
                                                                    lambda a: a.astype(np.int64)),
                        ["int64 of shape (3,)", "int32 of shape (3,)"]),
    "a label beyond the class folders": ("shard-00001.labels.npy",
                                         lambda p: _rewrite(p / "shard-00001.labels.npy", lambda a: a + 5),
                                         ["label 6 does not index the 2 class folder(s)"]),
    "offsets that decrease": ("shard-00000.offsets.npy",
                              lambda p: _rewrite(p / "shard-00000.offsets.npy", lambda a: a[[0, 2, 1, 3]]),
                              ["decreasing", "bytes of shard-00000.jpg.bin"]),
    "a JPEG file cut short": ("shard-00001.offsets.npy", _cut, ["do not run from 0 to the"]),
    "one shard row fewer": ("shard-00000.labels.npy", lambda p: _rewrite(p / "shard-00000.labels.npy",
                                                                        lambda a: a[:2]),
                            ["int32 of shape (2,)", "int32 of shape (3,)"]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_shard_files_that_differ_from_the_manifest_are_refused_naming_the_file(packed: Path, tmp_path: Path,
                                                                               case: str) -> None:
    name, damage, says = DAMAGE[case]
    p = _copy(packed, tmp_path / "p")
    damage(p)
    with pytest.raises(DataError) as err:
        PackedDataset(p, T, ["instance", "semantic"])
    text = str(err.value)
    assert text.startswith(f"{p / name}: ") and "the pack is damaged: pack the data again" in text, text
    for part in says:
        assert part in text, (part, text)


def _claims(**change):
    def edit(m: dict) -> None:
        m.update(change)
    return edit


MANIFEST_CLAIMS = {  # a manifest's claim → what the message says (after the manifest's path)
    "a million classes": (_claims(semantic_classes=[f"c{i}" for i in range(10 ** 6)], num_semantic_classes=10 ** 6),
                          "1,000,000 semantic classes; at most 254"),
    "a count of a million for three names": (_claims(num_semantic_classes=10 ** 6),
                                             "num_semantic_classes is 1000000 but semantic_classes lists 3"),
    "a count of images its shards do not hold": (_claims(images=10 ** 9), "images is 1000000000, not the 4 images"),
    "a negative shard": (_claims(shards=[5, -1]), "shards is [5, -1], not a list of image counts"),
    "a size as text": (_claims(size="48"), "size is '48', not a side of 1 to 65535 px"),
    "a map size that does not divide it": (_claims(map_size=7), "map_size is 7, not a divisor of size 48"),
    "a map of another kind": (_claims(maps=["depth"]), "maps is ['depth'], not a list of distinct id maps"),
    "class folders that are not names": (_claims(class_folders=[1, 2]), "class_folders is [1, 2], not a list"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CLAIMS))
def test_the_manifest_is_checked_before_anything_is_sized_by_it(packed: Path, tmp_path: Path, case: str) -> None:
    edit, says = MANIFEST_CLAIMS[case]
    p = _copy(packed, tmp_path / "p")
    manifest = json.loads((p / "cfmae-packed.json").read_text())
    edit(manifest)
    (p / "cfmae-packed.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        PackedDataset(p, T, ["instance", "semantic"])
    assert str(err.value).startswith(f"{p / 'cfmae-packed.json'}: ") and says in str(err.value), str(err.value)


def test_a_packed_semantic_id_beyond_the_classes_makes_its_sample_bad(packed: Path, tmp_path: Path) -> None:
    """As in the folder: a semantic id that is neither below C nor 255 is a bad sample, named, not an index error
    in the model."""
    from cfmae_cli.data.dataset import Skipped

    p = _copy(packed, tmp_path / "p")

    def seven(a: np.ndarray) -> np.ndarray:
        a[1, 5, 5] = 7
        return a
    _rewrite(p / "shard-00000.semantic.npy", seven)
    ds = PackedDataset(p, T, ["instance", "semantic"])
    items = [ds[(0, i)] for i in range(len(ds))]
    assert [isinstance(x, Skipped) for x in items] == [False, True, False, False]
    assert items[1].path == f"{p}/shard-00000#1"
    assert items[1].reason == f"{p}/shard-00000.semantic.npy#1: semantic id 7 is not below the 3 classes of the " \
                              f"manifest and is not 255"


def test_pretraining_refuses_a_damaged_pack_before_it_starts(packed: Path, tmp_path: Path) -> None:
    """Through the command: exit 2, one line naming the file, no run folder content written."""
    for case, (name, damage, says) in [("maps cut", DAMAGE["maps cut to 8x8"]),
                                       ("300 classes", ("cfmae-packed.json", None, ["300 semantic classes"]))]:
        p = _copy(packed, tmp_path / case)
        if damage is not None:
            damage(p)
        else:
            manifest = json.loads((p / name).read_text())
            manifest.update(semantic_classes=[f"c{i}" for i in range(300)], num_semantic_classes=300)
            (p / name).write_text(json.dumps(manifest))
        run = tmp_path / f"run-{case}"
        result = runner.invoke(app, ["pretrain", "--data", str(p), "--out", str(run), "--epochs", "1",
                                     *sets("optim.effective_batch=2", "train.batch_size=2")])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"error: {p / name}: " in text and all(s in text for s in says), text
        assert not (run / "checkpoints").exists()


def test_a_manifest_of_a_million_classes_is_refused_before_torch_is_imported(packed: Path, tmp_path: Path) -> None:
    """The cost of the refusal is the manifest's check, not torch's (whose import alone is some 650 MB here): the
    command refuses before importing it, and before the run folder is made."""
    p = _copy(packed, tmp_path / "p")
    manifest = json.loads((p / "cfmae-packed.json").read_text())
    MANIFEST_CLAIMS["a million classes"][0](manifest)
    (p / "cfmae-packed.json").write_text(json.dumps(manifest))
    probe = ("import sys, resource\nfrom typer.testing import CliRunner\nfrom cfmae_cli.cli import app\n"
             "r = CliRunner().invoke(app, sys.argv[1:])\nprint(r.exit_code, 'torch' in sys.modules)\n"
             "print(r.output)\n")
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", probe, "pretrain", "--data", str(p), "--out", str(run)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    code, torch_imported = done.stdout.split("\n", 1)[0].split()
    assert (code, torch_imported) == ("2", "False"), done.stdout + done.stderr
    assert f"{p / 'cfmae-packed.json'}: 1,000,000 semantic classes; at most 254" in " ".join(done.stdout.split())
    assert not run.exists()


# -- pack's workers die with it --------------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_packs_workers_die_when_it_is_killed(tmp_path: Path) -> None:
    """kill -9 of `cfmae pack` takes its workers with it within a few seconds (no orphan keeps packing). The
    data is slow to pack (every file a link to one 16-megapixel image), so a worker left alive would still be
    working."""
    src = tmp_path / "src"
    big = tmp_path / "big"
    big.mkdir()
    save_rgb(big / "rgb.png", np.zeros((4000, 4000, 3), np.uint8))
    save_map(big / "map.png", np.zeros((4000, 4000), np.uint8))
    for m in ("rgb", "instance", "semantic"):
        (src / m / "c").mkdir(parents=True)
        for i in range(60):
            (src / m / "c" / f"{i:02d}.png").symlink_to(big / ("rgb.png" if m == "rgb" else "map.png"))
    write_manifest(src, ["a"], {"instance": "test", "semantic": "test"}, {"images": 60})
    proc = subprocess.Popen([sys.executable, "-m", "cfmae_cli", "pack", str(src), "--out", str(tmp_path / "p"),
                             "--size", "48", "--shard-size", "30", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            workers |= _children(proc.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, (workers, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(0.5)  # the workers are at work on their shards
        # (a short-lived child of the pack, which a poll may also catch, is gone by now; the 2 workers are not)
        assert len({w for w in workers if _alive(w)}) >= 2, workers
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "workers outlived the killed pack"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # (only on failure: the orphans this test made)
            if _alive(w):
                os.kill(w, signal.SIGKILL)
