"""``cfmae attention-map --stats``: the global token's object share and, per block, the patch tokens' mean
attention distance and entropy — the equations on hand-made attention, on real encoders with uniform
attention, and the command end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.model import CFMAE
from tests.conftest import pretrained_run, tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny CFMAE (2 blocks, 2 heads, a 4 x 4 grid) pre-trained for one epoch on a synthetic dataset."""
    return pretrained_run(tmp_path_factory.mktemp("stats"))


def mean_pairwise_distance(grid: int) -> float:
    """The mean of ||pos_q - pos_k|| over all ordered pairs of a grid's patches, self pairs included."""
    cells = list(itertools.product(range(grid), range(grid)))
    return sum(math.dist(a, b) for a in cells for b in cells) / len(cells) ** 2


def test_the_grids_mean_pairwise_distance_by_hand() -> None:
    # 2 x 2: from each corner 0 (itself), 1, 1 (the neighbours) and sqrt 2 (the opposite corner)
    assert mean_pairwise_distance(2) == pytest.approx((2 + math.sqrt(2)) / 4)


# -- the equations on hand-made attention ----------------------------------------------------------------------
def _objects(n: int) -> torch.Tensor:
    return torch.zeros(1, n)


def test_uniform_attention_over_a_2x2_grid_has_entropy_1_and_the_grids_mean_distance() -> None:
    from cfmae_cli.viz.attention_stats import image_stats

    prefix, n = 2, 4
    attention = torch.full((1, 3, prefix + n, prefix + n), 1 / (prefix + n))  # prefix columns dropped, renormalised
    stats = image_stats([attention, attention], prefix, _objects(n), None)
    for block in ("b00", "b01"):
        assert stats[f"mean_distance_{block}"].item() == pytest.approx((2 + math.sqrt(2)) / 4, abs=1e-6)
        assert stats[f"patch_entropy_{block}"].item() == pytest.approx(1.0, abs=1e-6)
        assert stats[f"mean_distance_heads_{block}"].shape == (1, 3)
    assert stats["mean_distance_uniform"].item() == pytest.approx((2 + math.sqrt(2)) / 4, abs=1e-6)


def test_attention_on_the_query_itself_has_distance_0_and_entropy_0_and_heads_are_told_apart() -> None:
    from cfmae_cli.viz.attention_stats import image_stats, summarise_all

    prefix, grid = 1, 2
    n = grid * grid
    attention = torch.zeros(2, 2, prefix + n, prefix + n)
    attention[:, :, :, 0] = 0.3  # every token gives 0.3 to the global token: left out
    for q in range(n):
        r, c = divmod(q, grid)
        attention[:, 0, prefix + q, prefix + q] = 0.7  # head 0: the query itself
        attention[:, 1, prefix + q, prefix + c * grid + r] = 0.7  # head 1: the mirror patch (transposed)
    stats = image_stats([attention], prefix, _objects(n).expand(2, n), None)
    heads = stats["mean_distance_heads_b00"]
    assert torch.equal(heads[:, 0], torch.zeros(2))  # on the query itself: distance 0
    assert torch.allclose(heads[:, 1], torch.full((2,), math.sqrt(2) / 2))  # 2 of 4 queries sqrt 2 away
    assert torch.allclose(stats["mean_distance_b00"], torch.full((2,), math.sqrt(2) / 4))
    assert torch.equal(stats["patch_entropy_b00"], torch.zeros(2))  # one patch per row
    summary = summarise_all({k: v.double().numpy() for k, v in stats.items()})
    assert summary["mean_distance_nearest_head_b00"]["head"] == 0
    assert summary["mean_distance_nearest_head_b00"]["mean"] == 0.0
    assert summary["mean_distance_farthest_head_b00"]["head"] == 1
    assert summary["mean_distance_farthest_head_b00"]["mean"] == pytest.approx(math.sqrt(2) / 2)
    assert "mean_distance_heads_b00" not in summary
    eye = torch.eye(1 + 196).expand(1, 3, 197, 197)  # a 14 x 14 grid: exactly 0 too
    stats = image_stats([eye], 1, _objects(196), None)
    assert stats["mean_distance_b00"].item() == 0.0 and stats["patch_entropy_b00"].item() == 0.0


def test_distance_and_entropy_of_random_attention_follow_the_grid_row_by_row() -> None:
    from cfmae_cli.viz.attention_stats import image_stats

    torch.manual_seed(0)
    prefix, grid, heads = 2, 3, 2
    n = grid * grid
    attention = torch.randn(1, heads, prefix + n, prefix + n).mul(2).softmax(-1)
    stats = image_stats([attention], prefix, _objects(n), None)
    distance, entropy = [], []
    for h in range(heads):
        for q in range(n):
            row = attention[0, h, prefix + q, prefix:].double()
            row = row / row.sum()
            distance.append(sum(row[k].item() * math.dist(divmod(q, grid), divmod(k, grid)) for k in range(n)))
            entropy.append(-sum(p * math.log(p) for p in row.tolist()) / math.log(n))
    assert stats["mean_distance_b00"].item() == pytest.approx(np.mean(distance), rel=1e-5)
    assert stats["patch_entropy_b00"].item() == pytest.approx(np.mean(entropy), rel=1e-5)
    assert 0 < stats["patch_entropy_b00"].item() < 1


def test_blocks_are_reduced_as_they_run() -> None:
    from cfmae_cli.viz.attention_stats import BlockStats, stream_attention

    torch.manual_seed(0)
    model = CFMAE.from_config(tiny_config(), 3).eval()
    images = torch.randn(2, 3, 32, 32)
    seen: list[tuple[int, ...]] = []
    stats = BlockStats(prefix=1)

    def each(weights: torch.Tensor) -> None:
        seen.append(tuple(weights.shape))
        stats.add(weights)

    with torch.no_grad():
        stream_attention(model.encoder.blocks, lambda: model.encoder.forward_image(images), each)
    assert seen == [(2, 2, 17, 17)] * 2  # each block's weights handed over once, as it runs
    assert all(set(block) == {"distance_heads", "entropy"} for block in stats.blocks)  # nothing (B, H, L, L) kept
    assert stats.roll.shape == (2, 17, 17)


# -- attention statistics on real encoders -------------------------------------------------------------------
def test_patch_fractions_follow_the_patches_row_by_row_and_cell_by_cell() -> None:
    from cfmae_cli.viz.attention_stats import patch_fractions

    ids = torch.zeros(32, 32, dtype=torch.long)  # a 4 x 4 grid of 8-pixel patches
    ids[0:8, 0:16] = 3  # the first two patches of the top row: an object
    ids[8:12, 24:32] = 1  # the upper half of the last patch of the second row
    ids[31, 31] = 255  # unlabelled is no object
    objects = patch_fractions(ids, 4).reshape(4, 4)
    expected = torch.zeros(4, 4)
    expected[0, :2], expected[1, 3] = 1.0, 0.5
    assert torch.equal(objects, expected)  # not transposed, not half a patch off
    regions = patch_fractions(ids, 4, classes=4)
    assert torch.allclose(regions[7], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # the patch's cells, class by class
    assert torch.allclose(regions[15], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # its unlabelled cell is left out


def test_the_statistics_read_the_patch_the_global_token_looks_at_after_the_prefix() -> None:
    from cfmae_cli.viz.attention_stats import image_stats

    n, prefix = 16, 2  # e.g. a class and a register token
    attention = torch.zeros(1, 3, prefix + n, prefix + n)
    attention[:, :, 0, 1] = 0.5  # the global token's attention to a prefix token is left out
    attention[:, :, 0, prefix + 5] = 0.5
    attention[:, :, prefix:, prefix:] = torch.eye(n)  # the patches on themselves
    objects = torch.zeros(1, n)
    objects[0, 5], objects[0, 6] = 1.0, 1.0
    regions = torch.zeros(1, n, 2)
    regions[0, :, 0], regions[0, 5] = 1.0, torch.tensor([0.25, 0.75])
    stats = image_stats([attention], prefix, objects, regions)
    assert stats["object_share_last"].item() == 1.0 and stats["object_pixel_share"].item() == 2 / 16
    assert stats["spatial_entropy_last"].item() == 0.0  # one patch
    assert stats["region_entropy_last"].item() == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


def _zero_query_key(blocks: torch.nn.Module) -> None:
    with torch.no_grad():
        for block in blocks:
            dim = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[: 2 * dim] = 0
            block.attn.qkv.bias[: 2 * dim] = 0


def test_with_query_and_key_zeroed_the_attention_is_uniform_in_every_statistic(trained: Path) -> None:
    import timm

    from cfmae_cli.data.layout import list_samples
    from cfmae_cli.viz import attention_stats as st
    from cfmae_cli.viz import attention_subjects as su

    samples, _ = list_samples(trained / "data", ["instance", "semantic"])
    cpu = torch.device("cpu")
    ours, _ = su.ours(trained / "run", cpu)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, reg_tokens=2, no_embed_class=True)
    theirs = su.Subject("timm", "", vit.blocks, vit.forward_features, 64, 16, vit.num_prefix_tokens,
                        su.IMAGENET_MEAN, su.IMAGENET_STD)
    uniform = mean_pairwise_distance(4)  # both see a 4 x 4 grid
    for subject, depth in ((ours, 2), (theirs, 12)):
        assert subject.grid == 4
        before = st.measure(subject, samples, 3, batch_size=3)
        assert not np.allclose(before["object_share_last"], before["object_pixel_share"])  # a real model looks
        assert not np.allclose(before["patch_entropy_b00"], 1.0, atol=1e-6)
        _zero_query_key(subject.blocks)
        after = st.measure(subject, samples, 3, batch_size=3)
        assert after["object_pixel_share"].min() > 0
        for attended in ("object_share_last", "object_share_rollout"):
            assert np.allclose(after[attended], after["object_pixel_share"], atol=1e-6)
        assert np.allclose(after["region_entropy_last"], after["region_entropy_uniform"], atol=1e-5)
        assert np.allclose(after["spatial_entropy_last"], 1.0, atol=1e-6)
        assert np.allclose(after["spatial_entropy_rollout"], 1.0, atol=1e-6)
        assert np.allclose(after["mean_distance_uniform"], uniform, atol=1e-6)
        for block in range(depth):
            assert np.allclose(after[f"patch_entropy_b{block:02d}"], 1.0, atol=1e-6)
            assert np.allclose(after[f"mean_distance_b{block:02d}"], uniform, atol=1e-5)
            assert np.allclose(after[f"mean_distance_heads_b{block:02d}"], uniform, atol=1e-5)
        assert f"patch_entropy_b{depth:02d}" not in after


def _cells(output: str, label: str) -> list[str]:
    """The cells of the table's first row whose label is ``label``."""
    for line in output.splitlines():
        parts = [p.strip() for p in line.split("│")]
        if len(parts) > 2 and parts[1] == label:
            return parts[2:-1]
    raise AssertionError(f"no row {label!r} in\n{output}")


def test_stats_table_for_a_run_a_random_init_and_timm_models(trained: Path, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224")
    save_file(vit.state_dict(), str(tmp_path / "tiny.safetensors"))
    export = tmp_path / "export"
    result = runner.invoke(app, ["export", str(trained / "run"), "--out", str(export)])
    assert result.exit_code == 0, result.output
    architecture = json.loads((export / "config.json").read_text())["architecture"]
    out = tmp_path / "stats.json"
    result = runner.invoke(app, ["attention-map", "--stats", str(trained / "data"), "--checkpoint",
                                 str(trained / "run"), "--checkpoint", "random", "--model", "vit_tiny_patch16_224",
                                 "--weights", str(tmp_path / "tiny.safetensors"), "--model", architecture,
                                 "--weights", str(export / "model.safetensors"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = ["run", "random", "vit_tiny_patch16_224", f"{architecture} (2)"]
    assert architecture == "vit_tiny_patch16_224"  # the export's shape travels in its config.json
    assert [m["name"] for m in report["models"]] == names
    assert report["images"] == 8 and [m["img_size"] for m in report["models"]] == [32, 32, 224, 32]
    assert [m["blocks"] for m in report["models"]] == [2, 2, 12, 2]
    stats = report["statistics"]
    share = stats["object_pixel_share"]
    assert share["run"]["mean"] == share["random"]["mean"]  # the same maps at the same grid
    for key, row in stats.items():
        for name in names:
            if name in row:
                lo, hi = row[name]["ci95"]
                assert lo - 1e-12 <= row[name]["mean"] <= hi + 1e-12, (key, name)
    # the new rows: every block of every model, in the table and the JSON
    for block in range(12):
        for group in ("mean_distance", "mean_distance_nearest_head", "mean_distance_farthest_head",
                      "patch_entropy"):
            row = stats[f"{group}_b{block:02d}"]
            assert row["block"] == block and f"block {block}" in row["label"]
            assert set(row) - {"label", "block"} == set(names if block < 2 else ["vit_tiny_patch16_224"])
    for name in names:
        assert 0 <= stats["patch_entropy_b01"][name]["mean"] <= 1
        near, far = stats["mean_distance_nearest_head_b01"][name], stats["mean_distance_farthest_head_b01"][name]
        assert near["mean"] <= stats["mean_distance_b01"][name]["mean"] <= far["mean"]
        assert {near["head"], far["head"]} <= set(range(3 if name == "vit_tiny_patch16_224" else 2))
    assert stats["mean_distance_uniform"]["run"]["mean"] == pytest.approx(mean_pairwise_distance(4))
    assert stats["mean_distance_uniform"]["vit_tiny_patch16_224"]["mean"] == pytest.approx(mean_pairwise_distance(14))
    # the exported run read by timm gives the run's numbers
    for key, row in stats.items():
        if "run" in row:
            assert row[f"{architecture} (2)"]["mean"] == pytest.approx(row["run"]["mean"], abs=1e-5), key
    text = result.output
    assert "object share, last block" in text and "vit_tiny_patch16_224" in text
    assert "mean attention distance (patches)" in text and "patch entropy (1 = uniform)" in text
    assert "nearest - farthest head" in text
    for block in range(12):
        cells = _cells(text, f"block {block}")  # the first: the mean distance
        assert len(cells) == 4 and all(c != "-" for c in cells[2:3]), cells
        assert (cells[0] == "-") == (block >= 2) and (cells[3] == "-") == (block >= 2)
    assert _cells(text, "block 1")[0].startswith(f"{stats['mean_distance_b01']['run']['mean']:.3f} [")
    # 'random' is the encoder the run started from (its seed 0)
    from cfmae_cli.viz import attention_subjects as su

    _, template = su.ours(trained / "run", torch.device("cpu"))
    first = su.random_init(template, torch.device("cpu"), seed=0)
    ckpt = torch.load(trained / "run/checkpoints/epoch-0001.pt", weights_only=True)
    torch.manual_seed(ckpt["config"]["train"]["seed"])
    start = CFMAE.from_config(tiny_config(), 3).encoder
    ours, theirs = first.blocks.state_dict(), start.blocks.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_an_export_under_another_timm_name_exit_2(trained: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    assert runner.invoke(app, ["export", str(trained / "run"), "--out", str(export)]).exit_code == 0
    result = runner.invoke(app, ["attention-map", "--stats", str(trained / "data"), "--model",
                                 "vit_small_patch16_224", "--weights", str(export), "--out",
                                 str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "give --model vit_tiny_patch16_224" in " ".join(result.output.split())


def test_stats_of_a_folder_without_instance_maps_exit_2_and_write_nothing(trained: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    shutil.rmtree(data / "instance")
    out = tmp_path / "stats.json"
    result = runner.invoke(app, ["attention-map", "--stats", str(data), "--checkpoint", str(trained / "run"),
                                 "--out", str(out)])
    assert result.exit_code == 2 and "no instance/ folder" in result.output and str(data) in result.output
    assert not out.exists()
    result = runner.invoke(app, ["attention-map", "--stats", str(trained / "data"), "--model", "vit_tiny_patch16_224"])
    assert result.exit_code == 2 and "give each --model its --weights" in result.output
