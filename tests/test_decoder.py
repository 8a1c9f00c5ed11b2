"""The decoders and the global token: the encoder's final global token (what a linear probe reads) gets a gradient
in pre-training through every decoder, runs made before the switch resume with their old decoder, and
MultiMAE's output adapter reads the visible tokens and the global token, never the mask tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cfmae_cli.checkpoints import save_checkpoint
from cfmae_cli.config import Config, load_config
from cfmae_cli.masking import visible_indices
from cfmae_cli.model import CFMAE
from tests.conftest import make_dataset
from tests.test_distributed import cli, sets, steps
from tests.test_resume import assert_same_steps

DECODERS = {"cascade": [], "parallel": ["model.decoder.cascade=false"],
            "without cross-attention": ["model.decoder.cross_attention=false"],
            "multimae": ["model.decoder.kind=multimae", "model.decoder.cascade=false"]}


def batch_and_mask(cfg: Config, b: int = 4, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random batch of the config's modalities and a mask with exactly ``num_visible`` visible tokens."""
    g = torch.Generator().manual_seed(seed)
    s, ms, n = cfg.data.img_size, cfg.data.img_size // cfg.model.map_stride, cfg.tokens_per_modality
    batch = {"rgb": torch.randn(b, 3, s, s, generator=g),
             "instance": torch.randint(0, cfg.model.num_instance_ids, (b, ms, ms), generator=g),
             "semantic": torch.randint(0, 3, (b, ms, ms), generator=g)}
    m = len(cfg.data.modalities)
    keep = torch.rand(b, m * n, generator=g).argsort(1)[:, : cfg.masking.num_visible]
    mask = torch.ones(b, m * n, dtype=torch.bool).scatter_(1, keep, False)
    return {k: batch[k] for k in cfg.data.modalities}, mask.reshape(b, m, n)


def final_global_token_grad(cfg: Config) -> torch.Tensor:
    """One pre-training forward and backward → the gradient of the encoder's output row 0 (B, D)."""
    torch.manual_seed(0)
    model = CFMAE.from_config(cfg, 3)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["out"] = out

    model.encoder.register_forward_hook(keep)
    batch, mask = batch_and_mask(cfg)
    model(batch, mask, visible_indices(mask))["loss"].backward()
    return seen["out"].grad[:, 0]


@pytest.mark.parametrize("decoder", list(DECODERS))
def test_the_final_global_token_learns_in_every_decoder(decoder: str) -> None:
    grad = final_global_token_grad(load_config("demo", DECODERS[decoder]))
    assert (grad.abs().sum(-1) > 0).all(), "some sample's final global token got no gradient"


@pytest.mark.parametrize("decoder", ["cascade", "without cross-attention"])
def test_runs_before_the_switch_gave_it_none(decoder: str) -> None:
    """``model.decoder.global_token=false`` is the old decoder (patch tokens only): exactly zero."""
    grad = final_global_token_grad(load_config("demo", [*DECODERS[decoder], "model.decoder.global_token=false"]))
    assert torch.count_nonzero(grad) == 0


@pytest.mark.slow
def test_an_old_demo_checkpoint_resumes_with_its_old_decoder(tmp_path: Path) -> None:
    """A checkpoint whose config predates ``model.decoder.global_token`` and ``kind`` resumes (not refused as a
    changed config) and continues exactly as an unbroken run of the old decoder."""
    data = make_dataset(tmp_path / "data")
    args = ["pretrain", "--data", str(data), "--epochs", "3", *sets("train.plot_every=1000")]
    cli(*args, "--out", str(tmp_path / "old"), "--set", "model.decoder.global_token=false", cwd=tmp_path)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "old", run)
    state = torch.load(run / "checkpoints/epoch-0001.pt", weights_only=True)
    for key in ("global_token", "kind"):
        del state["config"]["model"]["decoder"][key]  # as a run written before the keys
    for path in (run / "checkpoints").glob("*.pt"):
        path.unlink()
    save_checkpoint(run / "checkpoints/last.pt", state)
    cli("pretrain", "--resume", str(run), cwd=tmp_path)
    assert_same_steps(steps(run), steps(tmp_path / "old"))
    a = torch.load(run / "checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "old/checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert a["config"]["model"]["decoder"]["global_token"] is False


# -- MultiMAE's output adapter -----------------------------------------------------------------------------
MULTIMAE = ["model.decoder.kind=multimae", "model.decoder.cascade=false"]


def test_multimae_cross_attends_to_the_visible_tokens_and_the_global_token_only() -> None:
    """Its keys are exactly the projected visible tokens (with position and task embedding) plus the projected
    global token: V + 1 per sample, not the M·N-long H with mask tokens."""
    cfg = load_config("demo", MULTIMAE)
    torch.manual_seed(0)
    model = CFMAE.from_config(cfg, 3).eval()
    batch, mask = batch_and_mask(cfg)
    encoded, ids_keep = model.encode(batch, visible_indices(mask))
    n, v = cfg.tokens_per_modality, cfg.masking.num_visible
    for name, adapter in model.decoder.tasks.items():
        seen = {}
        hook = adapter.attn.kv.register_forward_pre_hook(lambda mod, args: seen.setdefault("kv", args[0]))
        with torch.no_grad():
            model.decoder(encoded, ids_keep)
        hook.remove()
        with torch.no_grad():
            proj = adapter.proj_context(encoded)
            modality, patch = ids_keep // n, ids_keep % n  # where each visible token sits
            visible = proj[:, 1:] + adapter.pos_embed[0, patch] + adapter.task_embed[modality]
            expected = adapter.context_norm(torch.cat([visible, proj[:, :1]], dim=1))
        assert seen["kv"].shape == (mask.shape[0], v + 1, cfg.model.decoder.dim), name
        assert torch.allclose(seen["kv"], expected, atol=1e-5), name


@pytest.mark.parametrize("kind", ["cfmae", "multimae"])
def test_what_H_holds_at_masked_positions_reaches_only_the_cfmae_decoder(kind: str) -> None:
    """No semantic token visible: MultiMAE's RGB output does not depend on what the semantic segment would hold
    (its embedding), cfmae's (whose K/V is all of H) does."""
    cfg = load_config("demo", MULTIMAE if kind == "multimae" else [])
    torch.manual_seed(0)
    model = CFMAE.from_config(cfg, 3).eval()
    batch, _ = batch_and_mask(cfg)
    n, v, sem = cfg.tokens_per_modality, cfg.masking.num_visible, model.modalities.index("semantic")
    mask = torch.ones(4, 3, n, dtype=torch.bool)
    others = [i for i in range(3) if i != sem]
    mask[:, others[0], : v // 2] = False
    mask[:, others[1], : v - v // 2] = False
    encoded, ids_keep = model.encode(batch, visible_indices(mask))
    with torch.no_grad():
        before = model.decoder(encoded, ids_keep)["rgb"]
        embed = model.decoder.tasks["rgb"].task_embed if kind == "multimae" else model.decoder.modality_embed
        embed[sem] += 1.0
        after = model.decoder(encoded, ids_keep)["rgb"]
    assert torch.equal(before, after) == (kind == "multimae")


def test_multimae_heads_are_its_output_projection() -> None:
    model = CFMAE.from_config(load_config("demo", MULTIMAE), 3)
    assert all(isinstance(h[0], torch.nn.Identity) and isinstance(h[1], torch.nn.Linear) for h in model.heads.values())
    assert {k for k in model.no_weight_decay() if k.startswith("decoder.")} == \
        {f"decoder.tasks.{m}.{p}" for m in ("rgb", "instance", "semantic") for p in ("mask_token", "task_embed")}
