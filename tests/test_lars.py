"""The linear probe's optimizer is LARS as MAE defines it: what LARS is for, not only that it runs.

Each weight of two or more dimensions moves by ``lr x trust`` of its own norm on the first step, whatever its
gradient (the trust ratio); biases take plain SGD with momentum. At MAE's ViT-B probe lr (0.1 x 16384 / 256 =
6.4) this keeps a probe on a fixed synthetic 100-class problem stable, where plain SGD with momentum at that lr
(what timm's ``Lars`` does at weight decay 0) blows up.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cfmae_cli.config import EncoderArch, load_config
from cfmae_cli.eval.classifier import ViTClassifier
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.eval.task import finetune_optimizer, recipe_name

VITB_PROBE_LR = 0.1 * 16384 / 256  # MAE's main_linprobe.py: blr 0.1, batch 16384
CLASSES, DIM = 100, 768


def probe(seed: int = 0) -> tuple[ViTClassifier, FinetuneConfig]:
    """A linear probe as `cfmae finetune --mode linear` builds it (BN without affine + linear head, encoder
    frozen), on a one-block encoder of ViT-B's width, and the ViT-B probe config."""
    cfg = load_config("ft-vitb-400e", schema=FinetuneConfig, mode="linear")
    torch.manual_seed(seed)
    arch = EncoderArch(patch_size=16, embed_dim=DIM, depth=1, num_heads=12)
    model = ViTClassifier(arch, 32, CLASSES, ["rgb"], global_pool="token", linear=True,
                          head_init_std=cfg.model.head_init_std)
    return model, cfg


def features(seed: int, n: int, separation: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed 100-class problem: class means N(0, 1) in 768 dimensions, scaled by ``separation``, plus unit noise."""
    means = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return means[labels] * separation + torch.randn(n, DIM, generator=g), labels


def test_the_probe_preset_is_maes() -> None:
    model, cfg = probe()
    assert cfg.optim.name == "lars" and cfg.optim.weight_decay == 0 and cfg.optim.trust_coefficient == 0.001
    assert cfg.optim.base_lr * cfg.optim.effective_batch / 256 == VITB_PROBE_LR and cfg.train.epochs == 90
    assert isinstance(model.head[0], nn.BatchNorm1d) and not model.head[0].affine
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert "trust ratio 0.001 on every weight" in recipe_name(cfg.optim)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_first_step_moves_the_head_by_lr_times_trust_not_lr_times_grad(scale: float) -> None:
    model, cfg = probe()
    opt = finetune_optimizer(model, cfg.optim, VITB_PROBE_LR, torch.device("cpu"))
    x, y = features(1, 256)
    head = model.head
    loss = scale * nn.functional.cross_entropy(head(x), y)
    loss.backward()
    w, b = head[1].weight.detach().clone(), head[1].bias.detach().clone()
    grad_w, grad_b = head[1].weight.grad.clone(), head[1].bias.grad.clone()
    opt.step()
    relative = (head[1].weight.detach() - w).norm() / w.norm()
    # LARS: |dw| / |w| = lr x trust = 0.0064, whatever the gradient's size (without the ratio: lr |g| / |w|,
    # 4 here and 4000 with the loss x 1000)
    assert relative.item() == pytest.approx(VITB_PROBE_LR * cfg.optim.trust_coefficient, rel=1e-4)
    assert (VITB_PROBE_LR * grad_w.norm() / w.norm()).item() > 100 * relative.item()
    # the bias (one dimension) takes plain SGD: no trust ratio, no weight decay
    assert torch.allclose(head[1].bias.detach() - b, -VITB_PROBE_LR * grad_b, rtol=1e-5, atol=1e-7)


def train(opt_of, steps: int = 60, batch: int = 256) -> tuple[list[float], float]:
    """Online training on fresh samples of the fixed problem at the ViT-B probe lr → (train losses, val loss)."""
    model, cfg = probe()
    opt = opt_of(model, cfg)
    x, y = features(1, steps * batch)
    losses = []
    model.head.train()
    for step in range(steps):
        part = slice(step * batch, (step + 1) * batch)
        loss = nn.functional.cross_entropy(model.head(x[part]), y[part])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.head.eval()
    xv, yv = features(2, 2048)
    with torch.no_grad():
        return losses, nn.functional.cross_entropy(model.head(xv), yv).item()


def test_a_probe_at_the_vitb_lr_stays_stable_where_plain_sgd_diverges() -> None:
    chance = math.log(CLASSES)
    losses, val = train(lambda m, cfg: finetune_optimizer(m, cfg.optim, VITB_PROBE_LR, torch.device("cpu")))
    assert max(losses) < 1.05 * chance and val < chance and losses[-1] < losses[0]
    sgd_losses, sgd_val = train(lambda m, cfg: torch.optim.SGD([p for p in m.parameters() if p.requires_grad],
                                                               lr=VITB_PROBE_LR, momentum=0.9))
    assert max(sgd_losses) > 5 * chance and sgd_val > 5 * chance  # the same lr without the trust ratio


def test_lars_weight_decay_and_zero_weights() -> None:
    """Weight decay enters the direction before the ratio; a zero weight (or gradient) takes the plain step."""
    from cfmae_cli.train.optim import LARS

    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    w.grad = torch.tensor([[0.0, 0.0]])
    LARS([w], lr=1.0, momentum=0.0, weight_decay=0.5, trust_coefficient=0.1).step()
    # d = 0.5 w, |d| = 2.5, ratio 0.1 x 5 / 2.5 = 0.2: w -= 0.2 x 0.5 w = 0.1 w
    assert torch.allclose(w.detach(), torch.tensor([[2.7, 3.6]]))
    z = nn.Parameter(torch.zeros(2, 2))
    z.grad = torch.ones(2, 2)
    LARS([z], lr=0.5, momentum=0.0).step()
    assert torch.allclose(z.detach(), torch.full((2, 2), -0.5))
