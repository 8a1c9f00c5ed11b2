"""Activation checkpointing (``model.grad_checkpointing``, issue 30): the same gradients with fewer bytes kept for
the backward pass, counted by the rule `cfmae bench --what memory` uses; the bench prints its table; a pre-training
run with the key computes the same losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn
from typer.testing import CliRunner

from cfmae_cli.bench import Rig
from cfmae_cli.cli import app
from cfmae_cli.config import dump_config, load_config
from cfmae_cli.eval.classifier import ViTClassifier
from cfmae_cli.eval.seg_model import ViTSegmenter
from cfmae_cli.model import layers
from cfmae_cli.model.encoder import build_encoder
from cfmae_cli.model.layers import SavedBytes
from tests.conftest import TINY_OVERRIDES, make_dataset, tiny_config
from tests.test_bench import model_inputs

runner = CliRunner()
DECODERS = {"cascade": [], "no-ca": ["model.decoder.cross_attention=false"],
            "multimae": ["model.decoder.kind=multimae", "model.decoder.cascade=false"]}


class Recomputed:
    """Counts the forwards of the model's blocks (timm's ``Block``, ``CrossBlock``) while ``counting``: with
    checkpointing each block runs again in the backward pass."""

    def __init__(self, model: nn.Module):
        self.calls, self.counting = 0, False
        for m in model.modules():
            if isinstance(m, (layers.Block, layers.CrossBlock)):
                m.register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += self.counting


def pretrain_step(ckpt: bool, *extra: str, bf16: bool = False, seed: int = 5) -> dict[str, Any]:
    """One forward and backward of a tiny CFMAE (4 encoder blocks, drop-path 0.3, in training) on a fixed batch
    and masks: loss, gradients, blocks recomputed in the backward, bytes saved for it."""
    cfg = tiny_config("model.depth=4", "model.drop_path=0.3", f"model.grad_checkpointing={str(ckpt).lower()}", *extra)
    rig = Rig(cfg, 3, torch.device("cpu"))  # seeds the weights: the same in every call
    rig.bf16 = bf16
    batch = rig.batch(4)
    masks = rig.mask(batch, 0)
    recomputed = Recomputed(rig.model)
    torch.manual_seed(seed)  # drop-path's draws
    with SavedBytes(rig.model.train()) as saved:
        loss = rig.forward(batch, masks)
    recomputed.counting = True
    loss.backward()
    grads = {k: p.grad.clone() for k, p in rig.model.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "grads": grads, "recomputed": recomputed.calls, "saved": saved.total,
            "blocks": sum(isinstance(m, (layers.Block, layers.CrossBlock)) for m in rig.model.modules())}


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_checkpointing_gives_the_same_gradients_with_drop_path(decoder: str) -> None:
    """Encoder and decoder blocks recomputed in the backward (each block's forward runs again: encoder 4, decoder
    its task blocks), with drop-path's paths drawn again as in the forward: every gradient equal to fp32
    tolerance; drop-path does draw (another seed, another loss), so the RNG state is what keeps them equal."""
    plain, ckpt = pretrain_step(False, *DECODERS[decoder]), pretrain_step(True, *DECODERS[decoder])
    assert plain["recomputed"] == 0
    assert ckpt["recomputed"] == ckpt["blocks"] >= 4 + 3  # 4 encoder blocks, at least one per decoder task
    assert ckpt["loss"] == plain["loss"]
    assert set(ckpt["grads"]) == set(plain["grads"]) and any(k.startswith("decoder.") for k in ckpt["grads"])
    for key, grad in plain["grads"].items():
        torch.testing.assert_close(ckpt["grads"][key], grad, rtol=1e-5, atol=1e-6, msg=key)
    assert pretrain_step(False, *DECODERS[decoder], seed=6)["loss"] != plain["loss"]  # drop-path draws


def test_checkpointing_under_bf16_autocast_gives_the_same_gradients() -> None:
    """The recomputation runs under the forward's autocast state: bf16 gradients equal to bf16 rounding."""
    plain, ckpt = pretrain_step(False, bf16=True), pretrain_step(True, bf16=True)
    assert ckpt["recomputed"] > 0 and ckpt["saved"] < plain["saved"]
    for key, grad in plain["grads"].items():
        torch.testing.assert_close(ckpt["grads"][key], grad, rtol=1e-2, atol=1e-4, msg=key)


def test_checkpointing_keeps_the_step_one_graph() -> None:
    """torch.compile (train.compile): the checkpointed forward + loss traces as one graph, each block (2 encoder, 2
    per decoder task) a checkpointed region in it, and gives the same gradients as eager."""
    rig, args = model_inputs("model.drop_path=0.0", "model.grad_checkpointing=true")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(rig.model)(*args)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    blocks = sum(isinstance(m, (layers.Block, layers.CrossBlock)) for m in rig.model.modules())
    assert explained.graphs[0].code.count("higher_order.tag_activation_checkpoint(") == blocks == 2 + 3 * 2
    rig.model(*args)["loss"].backward()
    eager = {k: p.grad.clone() for k, p in rig.model.named_parameters() if p.grad is not None}
    rig.model.zero_grad(set_to_none=True)
    torch.compile(rig.model, fullgraph=True, backend="eager")(*args)["loss"].backward()
    for key, grad in eager.items():
        torch.testing.assert_close(rig.model.get_parameter(key).grad, grad, rtol=1e-5, atol=1e-6, msg=key)


def test_saved_bytes_count_each_storage_once_and_leave_parameters_out() -> None:
    """The counting rule: views of one storage count once, the model's weights not at all."""
    lin = nn.Linear(100, 100, bias=False)
    x = torch.randn(100, requires_grad=True)  # 400 bytes
    with SavedBytes(lin) as saved:
        y = x.sin()  # saves x
        z = y[:50].cos() * y[50:].cos()  # two views of y (one 400-byte storage); mul saves both 200-byte cosines
        lin(z.repeat(2))  # saves its 400-byte input (its weight is the model's)
    assert saved.total == 400 + 400 + 2 * 200 + 400


def test_checkpointing_keeps_fewer_bytes_for_the_backward() -> None:
    """A 4-block encoder keeps at most a fifth of the bytes (the blocks' inputs); the whole tiny CFMAE (adapters,
    heads and losses are not checkpointed) at most 60 %."""
    tokens = torch.randn(4, 16, 64)

    def encoder_bytes(ckpt: bool) -> int:
        torch.manual_seed(0)
        enc = build_encoder("demo", 32, 0.1, embed_dim=64, grad_checkpointing=ckpt).train()
        with SavedBytes(enc) as saved:
            enc(tokens.requires_grad_(True))
        return saved.total

    plain, ckpt = encoder_bytes(False), encoder_bytes(True)
    assert 0 < ckpt <= plain / 5, (ckpt, plain)
    assert pretrain_step(True)["saved"] <= 0.6 * pretrain_step(False)["saved"]


def test_saved_bytes_are_linear_in_the_batch() -> None:
    """The bench's extrapolation: the demo's activations at batch 8 lie on the line through batch 2 and 4."""
    for ckpt in (False, True):
        rig = Rig(load_config("demo", [f"model.grad_checkpointing={str(ckpt).lower()}"]), 3, torch.device("cpu"))
        counts = {}
        for b in (2, 4, 8):
            batch = rig.batch(b)
            with SavedBytes(rig.model.train()) as saved:
                rig.forward(batch, rig.mask(batch, 0))
            counts[b] = saved.total
        assert counts[8] == pytest.approx(counts[2] + 3 * (counts[4] - counts[2]), rel=0.01), counts


def test_fine_tuning_models_checkpoint_their_encoder() -> None:
    """The classifier and the segmenter take grad_checkpointing to their encoder (timm's forward_intermediates
    for the segmenter's blocks): the same gradients, fewer bytes kept."""
    arch = load_config("demo").model
    out: dict[str, list[dict[str, Any]]] = {}
    for name, make in (("classifier", lambda c: ViTClassifier(arch, 32, 3, ["rgb"], drop_path=0.2,
                                                              grad_checkpointing=c)),
                       ("segmenter", lambda c: ViTSegmenter(arch, 32, 3, [0, 1, 2, 3], 16, drop_path=0.2,
                                                            grad_checkpointing=c))):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = make(ckpt).train()
            batch = {"rgb": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
            torch.manual_seed(3)
            with SavedBytes(model) as saved:
                logits = model(batch)
            logits.float().square().mean().backward()
            grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
            out.setdefault(name, []).append({"saved": saved.total, "grads": grads})
        plain, ckpt_run = out[name]
        assert ckpt_run["saved"] < 0.7 * plain["saved"], name
        for key, grad in plain["grads"].items():
            torch.testing.assert_close(ckpt_run["grads"][key], grad, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_bench_memory_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    result = runner.invoke(app, ["bench", "--what", "memory", "--preset", "demo", "--device", "cpu", "--out",
                                 str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "memory of one training step per device in GiB" in text
    assert "counted at batch 2 and 4 and extended linearly to the batch, in bf16 autocast" in text
    row = next(line for line in result.output.splitlines() if "│ demo" in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    r = json.loads(out.read_text())["presets"]["demo"]
    gib = 2 ** 30
    assert cells[:4] == ["demo", "32", "64", f"{r['params'] / 1e6:.1f}"]
    assert cells[4:6] == [f"{r['activations_off'] / gib:.2f}", f"{(r['activations_on'] + r['recompute']) / gib:.2f}"]
    assert r["activations_on"] + r["recompute"] < 0.7 * r["activations_off"]
    assert r["total_off"] == r["param_state"] + r["activations_off"]
    assert r["total_on"] == r["param_state"] + r["activations_on"] + r["recompute"] < r["total_off"]
    assert 4 * r["params"] < r["param_state"] <= 16 * r["params"]  # fp32 weights, grads and AdamW's two moments
    bad = runner.invoke(app, ["bench", "--what", "memory", "--preset", "demo,nope", "--device", "cpu", "--out",
                              str(tmp_path / "bad.json")])
    assert bad.exit_code == 2 and "nope" in bad.output and not (tmp_path / "bad.json").exists()


def count_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each call of the checkpoint that model.layers.run_block makes."""
    calls: list[int] = []
    real = layers.checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counted)
    return calls


def test_the_key_round_trips_and_a_run_with_it_computes_the_same_losses(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("demo", ["model.grad_checkpointing=true"])
    assert cfg.model.grad_checkpointing is True and load_config("demo").model.grad_checkpointing is False
    saved = tmp_path / "ckpt.yaml"
    saved.write_text(dump_config(cfg))
    assert load_config(str(saved)).model.grad_checkpointing is True
    data = make_dataset(tmp_path / "data", n_per_class=2)  # 4 images: one step an epoch
    calls = count_checkpoints(monkeypatch)
    losses = {}
    for ckpt in ("false", "true"):
        sets = [x for item in [*TINY_OVERRIDES, "model.drop_path=0.2", "train.epochs=3", "train.plot_every=1000",
                               "train.threads=1", "train.monitor.enabled=false",
                               f"model.grad_checkpointing={ckpt}"] for x in ("--set", item)]
        run = tmp_path / f"run-{ckpt}"
        result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(run), *sets])
        assert result.exit_code == 0, result.output
        losses[ckpt] = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                        if r["type"] == "step"]
        assert bool(calls) == (ckpt == "true")
    assert len(losses["true"]) == 3  # the third after a step on the gradients (the first step's lr is 0)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-6, abs=1e-7)


def test_a_fine_tuning_run_with_the_key_checkpoints_and_computes_the_same_losses(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    """``cfmae finetune --set model.grad_checkpointing=true`` reaches the classifier's encoder (its blocks are
    recomputed) and trains exactly as without it."""
    data = make_dataset(tmp_path / "data", n_per_class=4)
    calls = count_checkpoints(monkeypatch)
    arch = ("{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 4.0, map_stride: 2, "
            "map_embed_dim: 8, num_instance_ids: 16}")
    losses = {}
    for ckpt in ("false", "true"):
        sets = [x for item in ["data.img_size=32", "data.num_workers=0", "optim.effective_batch=4",
                               "train.batch_size=4", "optim.warmup_epochs=1", "train.epochs=3", "train.log_every=1",
                               "train.threads=1", "model.drop_path=0.2", f"model.encoder={arch}",
                               f"model.grad_checkpointing={ckpt}"] for x in ("--set", item)]
        run = tmp_path / f"ft-{ckpt}"
        result = runner.invoke(app, ["finetune", "-c", "random", "--data", str(data), "--out", str(run), *sets])
        assert result.exit_code == 0, result.output
        losses[ckpt] = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                        if r["type"] == "step"]
        assert bool(calls) == (ckpt == "true")
    assert len(losses["true"]) >= 3  # steps after updates (the first step's lr is 0)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-6, abs=1e-7)
