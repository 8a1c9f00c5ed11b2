"""Progressive masking (paper §3.3, App. C, Eqs. 4, 6–11; docs/design.md §4.3–4.4), batched on the batch's device.

Shapes: B samples, M input modalities (in ``data.modalities`` order), N patches per modality.
A mask is ``(B, M, N)`` bool with True = masked. Every sample masks exactly ``M·N − num_visible`` tokens.
No Python loop runs over samples or patches: allocation and selection are sorts and scatters.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import cast, Sequence

import numpy as np
import torch
from torch import Tensor

from cfmae_cli.config import MaskingConfig
from cfmae_cli.errors import ConfigError
from cfmae_cli.formats import UNLABELLED


def largest_remainder(weights: Tensor, total: Tensor) -> Tensor:
    """Split ``total`` (…,) into integer counts (…, K) proportional to ``weights`` (…, K), Hamilton's method.

    Each count is ⌊total·w_k/Σw⌋; the units still missing go to the largest remainders (ties: lower index
    first). The counts add up to ``total`` exactly. Integer weights are split in exact integer arithmetic
    (so equal remainders tie exactly); float weights in float64. A row of zero weights splits evenly.
    """
    if weights.is_floating_point():
        w = weights.double()
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
        raw = w * total.unsqueeze(-1).double() / w.sum(-1, keepdim=True)
        base = raw.floor()
        remainder = raw - base
        base = base.long()
    else:
        w = weights.long()
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))
        num = w * total.unsqueeze(-1)
        den = w.sum(-1, keepdim=True)
        base, remainder = num // den, num % den
    deficit = total - base.sum(-1)
    order = torch.argsort(-remainder, dim=-1, stable=True)  # largest remainder first, ties to lower index
    return base + (_positions(order) < deficit.unsqueeze(-1)).long()


def capped_allocation(weights: Tensor, caps: Tensor, total: Tensor) -> Tensor:
    """Largest-remainder counts (…, K) with ``count_k <= caps_k``; what a capped entry cannot take goes to the
    others in proportion to their weights, and when no weighted entry has room left, to the entries with room
    (even of weight 0) in proportion to it. Requires ``total <= caps.sum(-1)``. With weights proportional to
    the caps (Eq. 10 with equal class weights) no entry is ever capped and this is one largest-remainder call.
    """
    fixed = torch.zeros_like(caps)
    active = weights.double() * (caps > 0)
    for _ in range(caps.shape[-1] + 1):  # each round caps at least one entry; one round in the usual case
        spare = caps - fixed
        # a row whose weighted entries are all capped (or weigh 0) gives the rest to the entries with room
        w = torch.where(active.sum(-1, keepdim=True) > 0, active, spare.double())
        alloc = largest_remainder(w, total - fixed.sum(-1))
        alloc = torch.where(w > 0, alloc, torch.zeros_like(alloc))
        over = fixed + alloc > caps
        if not bool(over.any()):
            return fixed + alloc
        fixed = torch.where(over, caps, fixed)
        active = torch.where(over, torch.zeros_like(active), active)
    return torch.minimum(fixed, caps)


def _positions(order: Tensor) -> Tensor:
    """Inverse permutation along the last dim: where each element landed in a sort."""
    pos = torch.empty_like(order)
    ar = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return pos.scatter_(-1, order, ar)


def select_in_groups(groups: Tensor, take: Tensor, num_groups: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """Pick ``take[b, m, g]`` patches uniformly at random inside each group g, independently per modality.

    groups: (B, N) long group id of every patch; take: (B, M, G) long, ``take <= group size``.
    Returns (B, M, N) bool. A random key ``group + U[0,1)`` sorts each group's patches into random order;
    a patch is picked when its rank inside its group is below the group's ``take``.
    """
    b, m, _ = take.shape
    n = groups.shape[1]
    noise = torch.rand(b, m, n, device=groups.device, dtype=torch.float64, generator=generator)
    key = groups.unsqueeze(1).double() + noise
    pos = _positions(torch.argsort(key, dim=-1))
    sizes = torch.zeros(b, num_groups, dtype=torch.long, device=groups.device)
    sizes.scatter_add_(1, groups, torch.ones_like(groups))
    start = (sizes.cumsum(1) - sizes).gather(1, groups).unsqueeze(1)  # (B, 1, N)
    quota = take.gather(2, groups.unsqueeze(1).expand(b, m, n))
    return (pos - start) < quota


def blend_masks(masks: list[Tensor], quotas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """n_m patches drawn with inclusion probability Σ_s (k_s / n_m)·M_s: the blend of Eq. 11 (B, M, N) bool.

    masks: S strategy masks (B, M, N) bool, n_m patches each; quotas: (B, M, S) long, the integer shares k_s
    of n_m (summing to n_m). A patch's weight c = Σ_s k_s·M_s is an integer in [0, n_m], the weights add up
    to n_m², and systematic sampling picks exactly n_m patches, each with probability c / n_m: the patches
    are put in random order (grouped by which strategies want them), a random offset U in [0, n_m) is drawn,
    and a patch is picked when one of U, U + n_m, U + 2·n_m, … falls in its stretch of the cumulative
    weights. Exact integer arithmetic: the count is always n_m; a patch every strategy wants is always
    picked, one no strategy wants never; the expected share of any region (objects, a semantic class) is
    Σ_s (k_s / n_m)·(its share in M_s), linear in the weights; and the picks of each group of patches are
    within one of their expected number.
    """
    n = quotas.sum(-1)  # (B, M) = n_m
    weight = cast(Tensor, sum(q.unsqueeze(-1) * mk.long() for q, mk in zip(quotas.unbind(-1), masks)))
    pattern = sum(mk.double() * 2 ** s for s, mk in enumerate(masks))
    key = pattern + torch.rand(pattern.shape, device=n.device, dtype=torch.float64, generator=generator)
    order = torch.argsort(key, dim=-1)
    cum = weight.gather(-1, order).cumsum(-1)
    step = n.clamp(min=1).unsqueeze(-1)
    offset = (torch.rand(n.shape, device=n.device, dtype=torch.float64, generator=generator) * step[..., 0]
              ).long().unsqueeze(-1)
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
    # points offset + j·n_m in [before, cum): ceil((cum − U)/n) − ceil((before − U)/n), ceil(x/n) = ⌊(x+n−1)/n⌋
    hits = torch.div(cum - offset + step - 1, step, rounding_mode="floor") - \
        torch.div(before - offset + step - 1, step, rounding_mode="floor")
    return torch.zeros_like(hits, dtype=torch.bool).scatter_(-1, order, hits > 0)


def top_k_mask(score: Tensor, k: Tensor) -> Tensor:
    """(B, M, N) score, (B, M) k → bool mask of the k highest scores per row."""
    pos = _positions(torch.argsort(score, dim=-1, descending=True, stable=True))
    return pos < k.unsqueeze(-1)


def patch_histogram(ids: Tensor, grid: int, num_bins: int) -> Tensor:
    """Cell counts per patch: ids (B, h, w) long in [0, num_bins) → (B, grid², num_bins) long."""
    b, h, w = ids.shape
    ph, pw = h // grid, w // grid
    cells = ids.reshape(b, grid, ph, grid, pw).permute(0, 1, 3, 2, 4).reshape(b, grid * grid, ph * pw)
    out = torch.zeros(b, grid * grid, num_bins, dtype=torch.long, device=ids.device)
    return out.scatter_add_(2, cells, torch.ones_like(cells))


def semantic_patch_classes(semantic: Tensor, grid: int, num_classes: int) -> Tensor:
    """Most frequent class of each patch's cells; id 255 counts as its own class ``num_classes``. → (B, N)."""
    ids = torch.where(semantic == UNLABELLED, torch.full_like(semantic, num_classes), semantic)
    return patch_histogram(ids, grid, num_classes + 1).argmax(-1)


def object_patches(instance: Tensor, grid: int, num_ids: int, min_area: float, top_k: int | None) -> Tensor:
    """Object patches (B, N) bool: at least half of the cells belong to a selected instance.

    instance: (B, h, w) canonical ids (0 = background, 1 = largest, …, 255 = unlabelled). Selected: an id
    in [1, num_ids) whose area share in the crop is ≥ ``min_area`` and, with ``top_k``, id ≤ top_k.
    """
    b, h, w = instance.shape
    ids = torch.where(instance == UNLABELLED, torch.full_like(instance, num_ids), instance)
    flat = ids.reshape(b, -1)
    area = torch.zeros(b, num_ids + 1, dtype=torch.long, device=ids.device)
    area.scatter_add_(1, flat, torch.ones_like(flat))
    idx = torch.arange(num_ids + 1, device=ids.device)
    selected = (area >= min_area * h * w) & (idx > 0) & (idx < num_ids)
    if top_k is not None:
        selected &= idx <= top_k
    on_object = selected.gather(1, flat).reshape(b, h, w).long()
    per_patch = patch_histogram(on_object, grid, 2)[..., 1]
    cells = (h // grid) * (w // grid)
    return 2 * per_patch >= cells


def schedule(progress: float, order: Sequence[str], breakpoints: Sequence[float]) -> tuple[float, float]:
    """(α_I, α_S) at training progress p ∈ [0, 1] (paper Fig. 5; docs/design.md §4.4).

    Phase j runs at full weight between breakpoints ``2j−1`` and ``2j`` (0 and 1 at the ends) and hands
    over linearly to phase j+1 between breakpoints ``2j`` and ``2j+1``. Random is what α_I + α_S leave.
    """
    p = min(max(float(progress), 0.0), 1.0)
    weights = {s: 0.0 for s in ("semantic", "instance", "random")}
    current = 0
    for j in range(len(order) - 1):
        end, start_next = breakpoints[2 * j], breakpoints[2 * j + 1]
        if p <= end:
            break
        if p < start_next:
            t = (p - end) / (start_next - end)
            weights[order[j]], weights[order[j + 1]] = 1.0 - t, t
            return weights["instance"], weights["semantic"]
        current = j + 1
    weights[order[current]] = 1.0
    return weights["instance"], weights["semantic"]


def visible_indices(mask: Tensor, num_visible: int | None = None) -> Tensor:
    """mask (B, M, N) bool, True = masked → (B, V) positions of the visible tokens in the flattened (M·N)
    sequence, in sequence order (a stable sort of the mask). Every sample must have exactly V visible tokens;
    V is counted from the first sample unless given."""
    flat = mask.reshape(mask.shape[0], -1).to(torch.uint8)
    v = int((flat[0] == 0).sum()) if num_visible is None else num_visible
    return torch.argsort(flat, dim=1, stable=True)[:, :v]


@dataclass
class Masks:
    """mask: (B, M, N) bool, True = masked; visible: (B, M) long visible tokens per modality; ids_keep: (B, V)
    long, the visible tokens' positions (:func:`visible_indices`), what the model encodes."""

    mask: Tensor
    visible: Tensor
    ids_keep: Tensor


class MaskGenerator:
    """Builds M_R, M_I, M_S per modality and mixes them by Eq. 11 (``masking.mix``: blended by quotas, or the
    literal top-n of the weighted sum).

    ``modalities`` gives the order of the M rows; ``grid`` is the patch grid side (N = grid²).
    """

    def __init__(self, cfg: MaskingConfig, modalities: list[str], grid: int, num_semantic_classes: int,
                 num_instance_ids: int):
        self.cfg = cfg
        self.modalities = list(modalities)
        self.grid = grid
        self.n = grid * grid
        self.num_semantic_classes = num_semantic_classes
        self.num_instance_ids = num_instance_ids
        weights = cfg.semantic_class_weights
        if weights is not None and len(weights) != num_semantic_classes + 1:
            raise ConfigError(f"masking.semantic_class_weights: need {num_semantic_classes + 1} weights "
                             f"({num_semantic_classes} classes + 'unlabelled'), got {len(weights)}")
        self.class_weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.alpha_obj = Fraction(str(cfg.alpha_obj)).limit_denominator(10 ** 9)  # Eq. 8's α, exactly

    def budgets(self, batch: int, device: torch.device, seed: int | None = None) -> Tensor:
        """Visible tokens per modality (B, M): Dirichlet shares of ``num_visible``, rounded to add up exactly.

        With ``seed`` the shares come from a NumPy generator of that seed (B·M numbers, copied to the device).
        """
        m = len(self.modalities)
        if seed is None:
            conc = torch.full((m,), float(self.cfg.dirichlet_alpha), device=device)
            shares = torch.distributions.Dirichlet(conc, validate_args=False).sample((batch,))  # no host sync
        else:
            draw = np.random.default_rng(seed).dirichlet([self.cfg.dirichlet_alpha] * m, size=batch)
            shares = torch.from_numpy(draw).to(device, non_blocking=True)
        total = torch.full((batch,), self.cfg.num_visible, dtype=torch.long, device=device)
        # num_visible <= N (checked by the config), so no modality can be given more than its N patches.
        return largest_remainder(shares, total)

    def random_groups(self, n_masked: Tensor) -> tuple[Tensor, Tensor, int]:
        """M_R as groups: one group of all N patches that takes n_m."""
        zeros = torch.zeros(n_masked.shape[0], self.n, dtype=torch.long, device=n_masked.device)
        return zeros, n_masked.unsqueeze(-1), 1

    def instance_groups(self, instance: Tensor, n_masked: Tensor) -> tuple[Tensor, Tensor, int]:
        """M_I as groups (Eq. 8): object patches (group 0) take ⌊α_obj·n_m⌋, background (group 1) the rest; a
        short side's lack is taken from the other side. ⌊α_obj·n_m⌋ is exact: α_obj as the fraction it was
        written as (0.57 → 57/100), in integer arithmetic."""
        is_obj = object_patches(instance, self.grid, self.num_instance_ids, self.cfg.min_instance_area,
                                self.cfg.instance_top_k)
        n_obj = is_obj.sum(1, keepdim=True)  # (B, 1)
        n_bg = self.n - n_obj
        want = n_masked * self.alpha_obj.numerator // self.alpha_obj.denominator
        take_obj = torch.maximum(torch.minimum(want, n_obj), n_masked - n_bg)
        return (~is_obj).long(), torch.stack([take_obj, n_masked - take_obj], dim=-1), 2

    def semantic_groups(self, semantic: Tensor, n_masked: Tensor) -> tuple[Tensor, Tensor, int]:
        """M_S as groups (Eq. 10): per class c, n_m·w_c|Ω_c| / Σ_k w_k|Ω_k| patches inside Ω_c (largest remainder)."""
        k = self.num_semantic_classes + 1
        cls = semantic_patch_classes(semantic, self.grid, self.num_semantic_classes)
        sizes = torch.zeros(cls.shape[0], k, dtype=torch.long, device=cls.device)
        sizes.scatter_add_(1, cls, torch.ones_like(cls))
        b, m = n_masked.shape
        weights = sizes.unsqueeze(1).expand(b, m, k)
        if self.class_weights is None:  # w_c = 1: n_m·|Ω_c|/N ≤ |Ω_c|, no class can overflow (no host sync)
            take = largest_remainder(weights, n_masked)
        else:
            weights = weights.double() * self.class_weights.to(cls.device)
            take = capped_allocation(weights, sizes.unsqueeze(1).expand(b, m, k), n_masked)
        return cls, take, k

    def random_masks(self, n_masked: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """M_R: (B, M) counts → (B, M, N) uniformly random masks with exactly those counts."""
        return select_in_groups(*self.random_groups(n_masked), generator)

    def instance_masks(self, instance: Tensor, n_masked: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """M_I (Eq. 8), (B, M, N) bool with n_m masked patches per row."""
        return select_in_groups(*self.instance_groups(instance, n_masked), generator)

    def semantic_masks(self, semantic: Tensor, n_masked: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """M_S (Eq. 10), (B, M, N) bool with n_m masked patches per row."""
        return select_in_groups(*self.semantic_groups(semantic, n_masked), generator)

    def __call__(self, alpha_i: float, alpha_s: float, batch: int, device: torch.device,
                 instance: Tensor | None = None, semantic: Tensor | None = None, seed: int | None = None) -> Masks:
        """Final masks (Eq. 11). ``instance``/``semantic`` are (B, h, w) canonical maps; when a map is
        absent the strategy that needs it falls back to random masking. With ``seed`` every draw comes from
        generators of that seed (the same masks on any device count); without, from the global RNG."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        visible = self.budgets(batch, device, seed)
        n_masked = self.n - visible
        mix = self.blend if self.cfg.mix == "quota" else self.score_mix
        mask = mix(alpha_i, alpha_s, n_masked, instance, semantic, gen)
        return Masks(mask, visible, visible_indices(mask, self.cfg.num_visible))

    def blend(self, alpha_i: float, alpha_s: float, n_masked: Tensor, instance: Tensor | None = None,
              semantic: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``masking.mix: quota`` (B, M, N): the weights (w_R, w_I, w_S) = (1−α_I−α_S, α_I, α_S) split each
        n_m into integer quotas k_s (largest remainder), and :func:`blend_masks` draws the n_m patches with
        probability Σ_s (k_s/n_m)·M_s. At a pure weight the mask is that strategy's; in between, the mask's
        make-up (its share of objects, of each region) moves linearly with the weights."""
        weights = {"random": 1.0 - alpha_i - alpha_s, "instance": alpha_i, "semantic": alpha_s}
        for name, guide in (("instance", instance), ("semantic", semantic)):
            if guide is None:  # no guide map: that strategy's share is masked at random
                weights["random"] += weights.pop(name)
        active = [name for name, w in weights.items() if w > 1e-12]
        groups = {"random": lambda: self.random_groups(n_masked)}
        if instance is not None:
            groups["instance"] = lambda: self.instance_groups(instance, n_masked)
        if semantic is not None:
            groups["semantic"] = lambda: self.semantic_groups(semantic, n_masked)
        masks = [select_in_groups(*groups[name](), generator) for name in active]
        if len(active) == 1:
            return masks[0]
        # made by fills on the device: a tensor of host data would be a blocking copy (a sync) on a GPU
        w = torch.stack([torch.full((), weights[name], dtype=torch.float64, device=n_masked.device)
                         for name in active])
        quotas = largest_remainder(w.expand(*n_masked.shape, len(active)), n_masked)
        return blend_masks(masks, quotas, generator)

    def score_mix(self, alpha_i: float, alpha_s: float, n_masked: Tensor, instance: Tensor | None = None,
                  semantic: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``masking.mix: score`` (B, M, N), Eq. 11 read literally: the n_m highest of (1−α_I−α_S)·M_R + α_I·M_I +
        α_S·M_S plus a tie-breaker. The three binary masks hold n_m patches each, so the top n_m is always the
        mask of the largest weight: the schedule switches strategies, it does not blend them."""
        m_r = self.random_masks(n_masked, generator).double()
        score = (1.0 - alpha_i - alpha_s) * m_r
        if alpha_i > 0:
            m_i = self.instance_masks(instance, n_masked, generator) if instance is not None else m_r
            score = score + alpha_i * m_i.double()
        if alpha_s > 0:
            m_s = self.semantic_masks(semantic, n_masked, generator) if semantic is not None else m_r
            score = score + alpha_s * m_s.double()
        tie = torch.rand(score.shape, device=n_masked.device, dtype=score.dtype, generator=generator)
        score = score + 1e-6 * tie  # tie-breaker below any α step that matters
        return top_k_mask(score, n_masked)
