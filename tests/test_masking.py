"""The masking equations (Appendix C, Eqs. 6–11) and the schedule, on CPU and (when present) CUDA."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from cfmae_cli.config import Config, MaskingConfig
from cfmae_cli.masking import (MaskGenerator, blend_masks, largest_remainder, object_patches, schedule,
                               semantic_patch_classes)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device"))]
MODS = ["rgb", "instance", "semantic"]


def vitb_generator(**masking) -> MaskGenerator:
    cfg = Config().masking.model_copy(update=masking)
    return MaskGenerator(cfg, MODS, grid=14, num_semantic_classes=133, num_instance_ids=16)


def blob_maps(batch: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """56x56 maps: a few rectangles as instances (canonical ids) and 5 semantic classes + unlabelled."""
    g = torch.Generator().manual_seed(seed)
    inst = torch.zeros(batch, 56, 56, dtype=torch.long)
    sem = torch.randint(0, 5, (batch, 1, 1), generator=g).expand(batch, 56, 56).clone()
    for b in range(batch):
        for k in range(1, 4):
            y, x = torch.randint(0, 40, (2,), generator=g).tolist()
            h, w = torch.randint(4, 16 + 8 * k, (2,), generator=g).tolist()
            inst[b, y:y + h, x:x + w] = k
            sem[b, y:y + h, x:x + w] = 5 + k  # classes 6..8 on objects
        sem[b, :4, :8] = 255
    return inst.to(device), sem.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alphas", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.3, 0.5), (0.5, 0.5)])
def test_masked_counts_add_up_to_588_minus_visible(device: str, alphas: tuple[float, float]) -> None:
    gen = vitb_generator()
    inst, sem = blob_maps(32, device)
    out = gen(*alphas, 32, torch.device(device), instance=inst, semantic=sem)
    assert out.mask.shape == (32, 3, 196) and out.mask.device.type == device
    assert (out.mask.sum((1, 2)) == 588 - 98).all()
    assert (out.mask.sum(2) == 196 - out.visible).all()  # per modality n_m = N - visible_m
    assert (out.visible.sum(1) == 98).all()


@pytest.mark.parametrize("visible", [98, 147, 196])
def test_budgets_sum_exactly_for_the_ablation_token_counts(visible: int) -> None:
    gen = vitb_generator(num_visible=visible)
    v = gen.budgets(512, torch.device("cpu"))
    assert (v.sum(1) == visible).all() and (v >= 0).all() and (v <= 196).all()
    # Dirichlet(1,1,1) shares: each modality's mean share is 1/3
    assert torch.allclose(v.double().mean(0) / visible, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)


@pytest.mark.parametrize("device", DEVICES)
def test_instance_guided_puts_floor_alpha_n_on_objects(device: str) -> None:
    gen = vitb_generator(alpha_obj=0.75)
    inst, _ = blob_maps(64, device, seed=3)
    n_masked = torch.randint(20, 120, (64, 3), device=device)
    m_i = gen.instance_masks(inst, n_masked)
    is_obj = object_patches(inst, 14, 16, gen.cfg.min_instance_area, None)
    on_obj = (m_i & is_obj.unsqueeze(1)).sum(-1)
    n_obj = is_obj.sum(1, keepdim=True)
    n_bg = 196 - n_obj
    want = torch.floor(0.75 * n_masked.double()).long()
    enough = (want <= n_obj) & (n_masked - want <= n_bg)
    assert enough.any()
    assert (on_obj[enough] == want[enough]).all()
    assert (m_i.sum(-1) == n_masked).all()
    # when the object side is short, every object patch is masked and the background fills the rest
    short = want > n_obj
    assert (on_obj[short] == n_obj.expand_as(on_obj)[short]).all()


def test_instance_guided_when_objects_cover_almost_everything() -> None:
    gen = vitb_generator(alpha_obj=0.75)
    inst = torch.ones(2, 56, 56, dtype=torch.long)
    inst[:, :4, :4] = 0  # one background patch
    n = torch.tensor([[100, 196, 0], [50, 60, 70]])
    m_i = gen.instance_masks(inst, n)
    assert (m_i.sum(-1) == n).all()
    assert m_i[0, 1].all()  # all 196 masked


def test_object_patch_rule_half_of_the_cells() -> None:
    inst = torch.zeros(1, 56, 56, dtype=torch.long)
    inst[0, 0:4, 0:2] = 1   # patch 0: 8 of 16 cells → object
    inst[0, 0:4, 4:5] = 1   # patch 1: 4 of 16 → background
    inst[0, 20:40, 20:40] = 1
    obj = object_patches(inst, 14, 16, 0.0, None)[0]
    assert obj[0] and not obj[1]
    assert not object_patches(inst, 14, 16, 0.5, None).any()  # too small an instance: not selected


def expected_eq10(sizes: list[int], n: int) -> list[int]:
    """Eq. 10 with w_c = 1 and exact largest-remainder rounding (ties to the lower class id)."""
    total = sum(sizes)
    raw = [Fraction(n * s, total) for s in sizes]
    base = [int(r) for r in raw]
    rest = n - sum(base)
    order = sorted(range(len(sizes)), key=lambda c: (-(raw[c] - base[c]), c))
    for c in order[:rest]:
        base[c] += 1
    return base


@pytest.mark.parametrize("device", DEVICES)
def test_semantic_guided_counts_follow_eq10(device: str) -> None:
    gen = vitb_generator()
    _, sem = blob_maps(16, device, seed=5)
    n_masked = torch.randint(1, 196, (16, 3), device=device)
    m_s = gen.semantic_masks(sem, n_masked)
    cls = semantic_patch_classes(sem, 14, 133)
    for b in range(16):
        sizes = torch.bincount(cls[b], minlength=134).tolist()
        for m in range(3):
            got = torch.bincount(cls[b][m_s[b, m]], minlength=134).tolist()
            assert got == expected_eq10(sizes, int(n_masked[b, m]))


def test_semantic_class_weights_shift_the_allocation_and_respect_region_sizes() -> None:
    weights = [1.0] * 134
    weights[7] = 50.0
    gen = vitb_generator(semantic_class_weights=weights)
    _, sem = blob_maps(8, "cpu", seed=1)
    n = torch.full((8, 3), 150)
    m_s = gen.semantic_masks(sem, n)
    cls = semantic_patch_classes(sem, 14, 133)
    assert (m_s.sum(-1) == 150).all()
    for b in range(8):
        region = cls[b] == 7
        if region.any():  # class 7 is fully masked before the others get more than their share
            assert m_s[b, :, region].all()


def test_semantic_patch_class_is_the_majority_of_cells() -> None:
    sem = torch.zeros(1, 56, 56, dtype=torch.long)
    sem[0, 0:4, 0:3] = 4      # 12 of 16 cells of patch 0
    sem[0, 0:4, 4:8] = 255    # patch 1 unlabelled → its own class 133
    cls = semantic_patch_classes(sem, 14, 133)[0]
    assert cls[0] == 4 and cls[1] == 133 and cls[2] == 0


def test_largest_remainder_sums_exactly_and_matches_hamilton() -> None:
    w = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.3, 0.2], [0.0, 0.0, 0.0]])
    total = torch.tensor([10, 7, 5])
    out = largest_remainder(w, total)
    assert out.tolist() == [[4, 3, 3], [4, 2, 1], [2, 2, 1]]


def test_schedule_phases_and_endpoints() -> None:
    order, bp = ["semantic", "instance", "random"], [0.25, 0.40, 0.60, 0.75]
    assert schedule(0.0, order, bp) == (0.0, 1.0)
    assert schedule(0.25, order, bp) == (0.0, 1.0)
    a_i, a_s = schedule(0.325, order, bp)
    assert a_i == pytest.approx(0.5) and a_s == pytest.approx(0.5)
    assert schedule(0.40, order, bp) == (1.0, 0.0)
    assert schedule(0.5, order, bp) == (1.0, 0.0)
    assert schedule(0.675, order, bp)[0] == pytest.approx(0.5) and schedule(0.675, order, bp)[1] == 0.0
    assert schedule(0.75, order, bp) == (0.0, 0.0)
    assert schedule(1.0, order, bp) == (0.0, 0.0)
    for p in torch.linspace(0, 1, 101).tolist():  # α_I + α_S ≤ 1 throughout
        a_i, a_s = schedule(p, order, bp)
        assert 0 <= a_i <= 1 and 0 <= a_s <= 1 and a_i + a_s <= 1 + 1e-12


def test_schedule_reversed_order_and_constant() -> None:
    bp = [0.25, 0.40, 0.60, 0.75]
    assert schedule(0.1, ["random", "instance", "semantic"], bp) == (0.0, 0.0)
    assert schedule(0.9, ["random", "instance", "semantic"], bp) == (0.0, 1.0)
    assert schedule(0.7, ["instance"], []) == (1.0, 0.0)
    with pytest.raises(ValueError):
        MaskingConfig(order=["semantic", "random"], breakpoints=[0.5])


@pytest.mark.parametrize("device", DEVICES)
def test_pure_strategies_equal_their_component_masks(device: str) -> None:
    """With α_S = 1 the final mask is a semantic-guided mask: its per-class counts follow Eq. 10."""
    gen = vitb_generator()
    inst, sem = blob_maps(8, device, seed=9)
    torch.manual_seed(0)
    out = gen(0.0, 1.0, 8, torch.device(device), instance=inst, semantic=sem)
    cls = semantic_patch_classes(sem, 14, 133)
    n = 196 - out.visible
    for b in range(8):
        sizes = torch.bincount(cls[b], minlength=134).tolist()
        for m in range(3):
            got = torch.bincount(cls[b][out.mask[b, m]], minlength=134).tolist()
            assert got == expected_eq10(sizes, int(n[b, m]))


def test_missing_guide_map_falls_back_to_random() -> None:
    gen = MaskGenerator(Config().masking, ["rgb"], 14, 133, 16)
    gen.cfg = gen.cfg.model_copy(update={"num_visible": 49})
    out = gen(0.5, 0.5, 4, torch.device("cpu"))
    assert (out.mask.sum((1, 2)) == 196 - 49).all()


def test_semantic_weights_of_zero_still_mask_exactly_n() -> None:
    weights = [0.0] * 134
    weights[0] = 1.0  # only class 0 is wanted; once it is full, the rest goes where there is room
    gen = vitb_generator(semantic_class_weights=weights)
    _, sem = blob_maps(8, "cpu", seed=2)
    n = torch.randint(100, 196, (8, 3))
    m_s = gen.semantic_masks(sem, n)
    assert (m_s.sum(-1) == n).all()
    cls = semantic_patch_classes(sem, 14, 133)
    for b in range(8):
        region = cls[b] == 0
        for m in range(3):  # class 0 takes min(n, |class 0|) masked patches, the others the rest
            assert int(m_s[b, m, region].sum()) == min(int(n[b, m]), int(region.sum()))


def half_object_maps(batch: int, device: str = "cpu") -> torch.Tensor:
    """56x56 instance maps whose top half is one object: 98 of the 196 patches are object patches."""
    inst = torch.zeros(batch, 56, 56, dtype=torch.long, device=device)
    inst[:, :28] = 1
    return inst


def object_share(mask: torch.Tensor, is_obj: torch.Tensor) -> float:
    return float((mask & is_obj.unsqueeze(1)).sum() / mask.sum())


@pytest.mark.parametrize("device", DEVICES)
def test_the_curriculum_blends_the_object_share_moves_linearly_with_alpha_i(device: str) -> None:
    """Eq. 11 with α_I = t and the rest random: over many samples the share of object patches among the masked
    ones moves linearly from the random share (t = 0) to the instance-guided share (t = 1). The literal
    top-n of the weighted binary masks instead stays at one end and jumps at t = 0.5."""
    batch, ts = 2048, [i / 8 for i in range(9)]
    inst = half_object_maps(batch, device)
    is_obj = object_patches(inst, 14, 16, 0.005, None)

    def shares(mix: str) -> list[float]:
        gen = vitb_generator(num_visible=196, mix=mix)  # n_m ≈ 131 on average: room for α_obj = 0.75
        return [object_share(gen(t, 0.0, batch, torch.device(device), instance=inst, seed=7).mask, is_obj)
                for t in ts]

    blended = shares("quota")
    masked = batch * (3 * 196 - 196)
    tol = 4 * (0.25 / masked) ** 0.5  # four standard errors of a share measured over this many patches
    lo, hi = blended[0], blended[-1]
    assert hi - lo > 50 * tol  # the two strategies differ clearly: there is something to blend
    for t, share in zip(ts, blended):
        assert share == pytest.approx(lo + t * (hi - lo), abs=tol), t
    switched = shares("score")
    assert switched[0] == pytest.approx(lo) and switched[-1] == pytest.approx(hi)
    assert switched[2] == pytest.approx(lo, abs=tol) and switched[6] == pytest.approx(hi, abs=tol)  # t = 1/4, 3/4


@pytest.mark.parametrize("device", DEVICES)
def test_a_pure_weight_gives_exactly_that_strategys_mask(device: str) -> None:
    gen = vitb_generator()
    inst, sem = blob_maps(16, device, seed=2)
    n = torch.randint(0, 197, (16, 3), device=device)
    dev = torch.device(device)

    def seeded() -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(11)

    assert torch.equal(gen.blend(0.0, 0.0, n, inst, sem, seeded()), gen.random_masks(n, seeded()))
    assert torch.equal(gen.blend(1.0, 0.0, n, inst, sem, seeded()), gen.instance_masks(inst, n, seeded()))
    assert torch.equal(gen.blend(0.0, 1.0, n, inst, sem, seeded()), gen.semantic_masks(sem, n, seeded()))


@pytest.mark.parametrize("device", DEVICES)
def test_blend_draws_each_patch_with_the_probability_of_its_weights(device: str) -> None:
    """One sample's three strategy masks, blended many times: the count is always n_m, a patch all three want
    is always masked, one none wants never, and each patch is masked with probability Σ_s k_s·M_s / n_m."""
    dev = torch.device(device)
    gen = vitb_generator()
    inst, sem = blob_maps(1, device, seed=6)
    n = torch.tensor([[70, 120, 150]], device=device)
    g = torch.Generator(device=dev).manual_seed(3)
    masks = [gen.random_masks(n, g), gen.instance_masks(inst, n, g), gen.semantic_masks(sem, n, g)]
    quotas = largest_remainder(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, device=device).expand(1, 3, 3), n)
    reps = 4000
    out = blend_masks([m.expand(reps, 3, 196) for m in masks], quotas.expand(reps, 3, 3), g)
    assert (out.sum(-1) == n).all()
    weight = sum(q.unsqueeze(-1) * mk.long() for q, mk in zip(quotas.unbind(-1), masks))[0]  # (3, 196)
    assert out[:, weight == n[0].unsqueeze(-1)].all() and not out[:, weight == 0].any()
    freq = out.double().mean(0)
    expected = weight.double() / n[0].double().unsqueeze(-1)
    assert torch.allclose(freq, expected, atol=4 * (0.25 / reps) ** 0.5)
    assert 0 < freq[weight == quotas[0, :, :1].expand(3, 196)].mean() < 1  # patches of M_R alone: sometimes


def test_blend_counts_are_exact_at_the_edges() -> None:
    gen = vitb_generator()
    inst, sem = blob_maps(8, "cpu", seed=8)
    n = torch.tensor([[0, 196, 1]] * 4 + [[195, 2, 97]] * 4)
    for alphas in [(0.3, 0.5), (0.5, 0.0), (0.0, 0.5), (0.2, 0.2)]:
        out = gen.blend(*alphas, n, inst, sem)
        assert (out.sum(-1) == n).all(), alphas


def test_score_mix_gives_the_masks_of_the_literal_formula_bit_for_bit() -> None:
    """``masking.mix: score`` keeps the masks of the literal Eq. 11 (the only mix before the blend): digests of
    the masks that code gave for these inputs and seed. At (0.2, 0.1) random dominates, and the literal
    formula returns M_R itself, the same masks as (0, 0)."""
    import hashlib

    gen = vitb_generator(mix="score")
    inst, sem = blob_maps(64, "cpu", seed=4)
    digests = {(0.0, 0.0): "03717834a3028331", (1.0, 0.0): "ebd1c57926bbc020", (0.0, 1.0): "c10e9ab9b23f8442",
               (0.3, 0.5): "41a78986644a1692", (0.5, 0.5): "801fd1f584c6742d", (0.2, 0.1): "03717834a3028331"}
    for alphas, digest in digests.items():
        mask = gen(*alphas, 64, torch.device("cpu"), instance=inst, semantic=sem, seed=123).mask
        assert hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16] == digest, alphas


def test_eq8_floor_is_exact_for_decimal_alphas() -> None:
    """⌊α·n_m⌋ of Eq. 8 in exact arithmetic: 0.57 · 100 = 57 (floating point gives 56.99999… → 56)."""
    gen = vitb_generator(alpha_obj=0.57)
    inst = half_object_maps(1)
    n = torch.tensor([[100, 50, 1]])
    on_object = (gen.instance_masks(inst, n) & object_patches(inst, 14, 16, 0.005, None).unsqueeze(1)).sum(-1)
    assert on_object[0].tolist() == [57, 28, 0]
