"""Model: encoder = timm ViT-B layout, cascaded vs parallel decoder, losses on masked tokens only."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from cfmae_cli.config import Config, load_config
from cfmae_cli.model import CFMAE
from cfmae_cli.masking import visible_indices
from cfmae_cli.model.losses import image_loss, id_map_loss, patchify_image, unpatchify_image
from tests.conftest import tiny_config


def test_vitb_encoder_matches_timm_vit_base_patch16_224_without_head() -> None:
    model = CFMAE.from_config(load_config("vitb-400e"), num_semantic_classes=133)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    ours = sum(p.numel() for p in model.encoder.parameters())
    assert ours == sum(p.numel() for p in ref.parameters()) == 85_798_656
    # key for key, and the weights load strictly into timm
    ref.load_state_dict(model.encoder.state_dict(), strict=True)
    assert model.decoder.embed.out_features == 256
    assert all(t.first.attn.num_heads == 8 for t in model.decoder.tasks.values())
    assert model.decoder.order == ["semantic", "instance", "rgb"]


def _batch(cfg: Config, b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, ms = cfg.data.img_size, cfg.data.img_size // cfg.model.map_stride
    return {"rgb": torch.randn(b, 3, s, s, generator=g),
            "instance": torch.randint(0, cfg.model.num_instance_ids, (b, ms, ms), generator=g),
            "semantic": torch.randint(0, 3, (b, ms, ms), generator=g)}


def _random_mask(cfg: Config, b: int, seed: int = 0) -> torch.Tensor:
    n = cfg.tokens_per_modality
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, 3 * n, generator=g)
    keep = scores.argsort(1)[:, : cfg.masking.num_visible]
    mask = torch.ones(b, 3 * n, dtype=torch.bool)
    mask.scatter_(1, keep, False)
    return mask.reshape(b, 3, n)


@pytest.mark.parametrize("cascade", [True, False])
def test_semantic_block_feeds_the_instance_block_only_when_cascaded(cascade: bool) -> None:
    cfg = tiny_config(f"model.decoder.cascade={str(cascade).lower()}")
    torch.manual_seed(0)
    model = CFMAE.from_config(cfg, 3).eval()
    batch, mask = _batch(cfg), _random_mask(cfg, 2)
    encoded, keep = model.encode(batch, visible_indices(mask))
    before = model.decoder(encoded, keep)
    with torch.no_grad():  # change F from the semantic block: perturb only its weights
        for p in model.decoder.tasks["semantic"].parameters():
            p.add_(torch.randn_like(p))
    after = model.decoder(encoded, keep)
    assert not torch.allclose(before["semantic"], after["semantic"])
    changed = not torch.allclose(before["instance"], after["instance"])
    assert changed == cascade
    assert torch.equal(before["rgb"], after["rgb"]) != cascade


def test_without_cross_attention_still_cascades_but_reads_no_other_modality() -> None:
    cfg = tiny_config("model.decoder.cross_attention=false")
    torch.manual_seed(0)
    model = CFMAE.from_config(cfg, 3).eval()
    batch, mask = _batch(cfg), _random_mask(cfg, 2)
    encoded, keep = model.encode(batch, visible_indices(mask))
    h, glob = model.decoder.full_tokens(encoded, keep)
    n = cfg.tokens_per_modality
    zeros = torch.zeros_like(h[:, :n])
    sem_only = model.decoder.tasks["semantic"](h[:, 2 * n:], h, zeros, glob)
    h2 = h.clone()
    h2[:, :2 * n] += 1.0  # change the rgb and instance segments: no effect without cross-attention
    assert torch.allclose(sem_only, model.decoder.tasks["semantic"](h2[:, 2 * n:], h2, zeros, glob))


def test_forward_shapes_and_loss_terms() -> None:
    cfg = tiny_config()
    model = CFMAE.from_config(cfg, 3)
    mask = _random_mask(cfg, 2)
    out = model(_batch(cfg), mask, visible_indices(mask))
    n, cells = cfg.tokens_per_modality, (cfg.model.patch_size // cfg.model.map_stride) ** 2
    assert out["pred"]["rgb"].shape == (2, n, cfg.model.patch_size ** 2 * 3)
    assert out["pred"]["semantic"].shape == (2, n, cells * 3)
    assert out["pred"]["instance"].shape == (2, n, cells * cfg.model.num_instance_ids)
    total = sum(out["losses"].values())
    assert torch.allclose(out["loss"], total)
    out["loss"].backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.encoder.pos_embed.grad is None  # fixed sin-cos


def test_loss_ignores_visible_tokens_and_unlabelled_cells() -> None:
    torch.manual_seed(0)
    b, n, cells, c = 2, 4, 4, 3
    logits = torch.randn(b, n, cells * c)
    ids = torch.randint(0, c, (b, 4, 4))
    mask = torch.tensor([[True, False, False, False], [False, False, True, False]])
    base = id_map_loss(logits, ids, mask, c)
    # changing predictions or targets of visible tokens changes nothing
    logits2, ids2 = logits.clone(), ids.clone()
    logits2[0, 1:] += 5.0
    ids2[0, 2:, :] = (ids2[0, 2:, :] + 1) % c  # patches 2,3 of sample 0 are visible
    assert torch.allclose(base, id_map_loss(logits2, ids2, mask, c))
    # a masked patch whose cells are all 255 adds nothing
    ids3 = ids.clone()
    ids3[1, 2:, 0:2] = 255  # patch 2 of sample 1 (row 1, col 0 of the 2x2 grid)
    only_first = id_map_loss(logits, ids3, mask, c)
    expected = id_map_loss(logits[:1], ids[:1], mask[:1], c)
    assert torch.allclose(only_first, expected)


def test_no_masked_token_gives_zero_not_nan() -> None:
    pred = torch.randn(2, 4, 16 * 3)
    images = torch.randn(2, 3, 8, 8)
    none = torch.zeros(2, 4, dtype=torch.bool)
    assert image_loss(pred, images, none, 4, True).item() == 0.0
    assert id_map_loss(torch.randn(2, 4, 12), torch.randint(0, 3, (2, 4, 4)), none, 3).item() == 0.0
    all_unlabelled = torch.full((2, 4, 4), 255)
    loss = id_map_loss(torch.randn(2, 4, 12), all_unlabelled, ~none, 3)
    assert loss.item() == 0.0 and not torch.isnan(loss)


def test_image_loss_is_norm_pix_mse_on_masked_patches() -> None:
    images = torch.randn(1, 3, 8, 8)
    target = patchify_image(images, 4)
    assert torch.equal(unpatchify_image(target, 4), images)
    mask = torch.tensor([[True, False, True, False]])
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert image_loss(norm, images, mask, 4, True).item() == pytest.approx(0.0, abs=1e-10)
    pred = torch.zeros_like(target)
    expected = target[0, [0, 2]].pow(2).mean()
    assert image_loss(pred, images, mask, 4, False).item() == pytest.approx(expected.item(), rel=1e-6)


def test_modality_subset_builds_only_what_it_needs() -> None:
    cfg = tiny_config("data.modalities=[rgb,semantic]")
    model = CFMAE.from_config(cfg, 3)
    assert set(model.adapters) == {"semantic"} and set(model.heads) == {"rgb", "semantic"}
    assert model.decoder.order == ["semantic", "rgb"]
    batch = _batch(cfg)
    del batch["instance"]
    mask = torch.ones(2, 2 * cfg.tokens_per_modality, dtype=torch.bool)
    mask[:, : cfg.masking.num_visible] = False  # exactly num_visible visible tokens over the two modalities
    mask = mask.reshape(2, 2, -1)
    out = model(batch, mask, visible_indices(mask, cfg.masking.num_visible))
    assert set(out["losses"]) == {"rgb", "semantic"}
    assert out["pred"]["semantic"].shape[1] == cfg.tokens_per_modality


def test_state_dict_roundtrip_is_exact() -> None:
    cfg = tiny_config()
    a = CFMAE.from_config(cfg, 3)
    b = CFMAE.from_config(cfg, 3)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    batch, mask = _batch(cfg), _random_mask(cfg, 2)
    keep = visible_indices(mask)
    torch.manual_seed(1)
    la = a(batch, mask, keep)["loss"]
    torch.manual_seed(1)
    assert torch.equal(la, b(batch, mask, keep)["loss"])


def test_bf16_autocast_forward_and_backward() -> None:
    """The GPU default (bf16 autocast) checked on the CPU: no dtype clash, finite fp32 losses."""
    cfg = tiny_config()
    model = CFMAE.from_config(cfg, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = _random_mask(cfg, 2)
        out = model(_batch(cfg), mask, visible_indices(mask))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(model.decoder.mask_token.grad).all()


def test_the_model_encodes_the_tokens_the_masks_name_and_has_no_budget_of_its_own() -> None:
    """One door for the visible budget: the generator's ids_keep (a stable sort of the mask) is what the model
    encodes; the model is built from the model section and the data's sizes, not from masking.num_visible."""
    from cfmae_cli.masking import MaskGenerator

    cfg = tiny_config()
    model = CFMAE(cfg.model, 3, modalities=cfg.data.modalities, img_size=cfg.data.img_size)
    assert not hasattr(model, "num_visible") and not hasattr(model, "cfg")
    batch = _batch(cfg)
    gen = MaskGenerator(cfg.masking, cfg.data.modalities, model.grid, 3, cfg.model.num_instance_ids)
    masks = gen(0.0, 1.0, 2, torch.device("cpu"), semantic=batch["semantic"], seed=3)
    assert masks.ids_keep.shape == (2, cfg.masking.num_visible)
    assert torch.equal(masks.ids_keep, visible_indices(masks.mask))
    flat = masks.mask.reshape(2, -1)
    assert not flat.gather(1, masks.ids_keep).any()  # every kept token is visible
    assert (masks.ids_keep.diff(dim=1) > 0).all()  # in sequence order
    encoded, keep = model.eval().encode(batch, masks.ids_keep)
    assert encoded.shape[1] == 1 + cfg.masking.num_visible and keep is masks.ids_keep
    with pytest.raises(TypeError, match="modalities.*img_size"):  # the data defines them
        CFMAE(cfg.model, 3)  # type: ignore[call-arg]


def test_visible_indices_counts_the_visible_tokens_unless_told() -> None:
    mask = torch.tensor([[[True, False, True], [False, True, True]], [[False, True, True], [True, True, False]]])
    assert visible_indices(mask).tolist() == [[1, 3], [0, 5]]
    assert visible_indices(mask, 1).tolist() == [[1], [0]]
