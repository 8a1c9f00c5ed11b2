"""Speed work that can be checked on a CPU: the step compiles as one graph, and `cfmae bench` reports what
it should (FLOPs from a count, phases, the MAE-equivalent ratio, masks, data path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
from typer.testing import CliRunner

from cfmae_cli.bench import Rig, count_flops
from cfmae_cli.cli import app
from cfmae_cli.config import load_config
from tests.conftest import tiny_config

runner = CliRunner()


def model_inputs(*overrides: str) -> tuple[Rig, tuple]:
    """A rig of the tiny config with ``overrides`` on the CPU, and the model's arguments for a batch of 4 (inputs,
    mask, ids_keep) at the start of the curriculum."""
    cfg = tiny_config(*overrides)
    rig = Rig(cfg, 3, torch.device("cpu"))
    batch = rig.batch(4)
    masks = rig.mask(batch, 0)
    return rig, ({m: batch[m] for m in cfg.data.modalities}, masks.mask, masks.ids_keep)


@pytest.mark.parametrize("extra", [[], ["model.decoder.cascade=false"], ["model.decoder.cross_attention=false"],
                                   ["data.modalities=[rgb]", "masking.order=[random]", "masking.breakpoints=[]"]])
def test_the_model_step_is_one_graph(extra: list[str]) -> None:
    """forward + loss under dynamo: no graph break, and fullgraph=True runs (backend 'eager': tracing only)."""
    rig, args = model_inputs(*extra)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(rig.model)(*args)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    compiled = torch.compile(rig.model, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(*args)["loss"], rig.model(*args)["loss"])


def test_flops_are_counted_per_module() -> None:
    cfg = tiny_config()
    flops = count_flops(cfg, 3)
    assert flops["backward"] == pytest.approx(2 * flops["forward"], rel=0.25)  # backward ≈ 2 x forward
    modules = flops["forward_by_module"]
    assert {"encoder", "decoder", "heads"} <= set(modules)
    # the encoder's matmuls: qkv, proj, fc1, fc2 of each block on 1 + V tokens (+ attention), 2 FLOP per MAC
    m, d, v = cfg.model, cfg.model.embed_dim, cfg.masking.num_visible
    linear = 2 * m.depth * (1 + v) * (4 * d * d + 2 * d * int(d * m.mlp_ratio)) / 1e9
    attention = 2 * m.depth * 2 * (1 + v) ** 2 * d / 1e9
    assert modules["encoder"] == pytest.approx(linear + attention, rel=1e-6)


def test_bench_cli_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    mae = tmp_path / "mae-tiny.yaml"
    mae.write_text("base: demo\ndata: {modalities: [rgb]}\nmasking: {order: [random], breakpoints: []}\n"
                   "model: {decoder: {cross_attention: false}}\n")
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--preset", "demo", "--compare", str(mae),
                                 "--steps", "1", "--warmup", "0", "--workers", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "img/s" in text and "GFLOP / image: forward" in text and f"step time demo / {mae}" in text
    assert "masks of a batch of 64" in text and "data path, folder (cpu reader): 0 worker(s)" in text
    assert "data path, packed (gpu-decode reader): 0 worker(s)" in text
    # the readers side by side: CPU ms per sample, the device step (CPU time here, labelled so), cores per GPU
    assert "device ms/sample = data.decode=gpu's decode + crop + resize + flip on cpu (CPU time of the device " \
        "step: no GPU); cores/GPU = img/s x ms / 1000 at 1,500 and 6,000 img/s" in text
    assert "MAE anchor" in text
    # a line before each phase: what it does and, for the CPU's steps, about how long
    assert "bench: demo: counting the FLOPs" in text and "bench: demo: timing 0 untimed + 1 timed step(s) at " \
        "batch 4, ~" in text and f"bench: {mae}: timing" in text and "bench: demo: building 3 kinds of masks" in text
    assert "bench: data path: 11 batches of 16 from 48 generated ImageNet-sized samples" in text
    report = json.loads(out.read_text())
    demo = report["presets"]["demo"]
    assert set(demo["step"]["phases_ms"]) == {"data", "masking", "forward", "backward", "optimizer"}
    assert demo["flops_gflop_per_image"]["step"] > report["presets"][str(mae)]["flops_gflop_per_image"]["step"]
    assert demo["mfu"] is None  # no peak is claimed for a CPU
    rows = demo["data"]
    assert [(r["format"], r["reader"]) for r in rows] == [("folder", "cpu"), ("folder", "gpu-decode"),
                                                          ("packed", "cpu"), ("packed", "gpu-decode"),
                                                          ("mae-anchor", "cpu")]
    for r in rows:  # 0 workers: the main process, one core
        assert r["samples_per_s"] > 0 and r["ms_per_sample_per_core"] == pytest.approx(1e3 / r["samples_per_s"])
        assert r["cores_per_gpu"]["6000"] == pytest.approx(6 * r["ms_per_sample_per_core"])
        assert ("device_ms_per_sample" in r) == (r["reader"] == "gpu-decode")
    assert all(r["device_ms_per_sample"] > 0 and r["device"] == "cpu" for r in rows if r["reader"] == "gpu-decode")


def test_mae_preset_is_mae() -> None:
    cfg = load_config("mae-vitb")
    assert cfg.data.modalities == ["rgb"] and cfg.masking.order == ["random"]
    assert cfg.masking.num_visible == 49 and cfg.tokens_per_modality == 196  # mask ratio 0.75
    d = cfg.model.decoder
    assert (d.dim, d.num_heads, d.cross_attention, d.self_blocks + 1) == (512, 16, False, 8)
