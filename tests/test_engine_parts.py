"""Engine parts with known answers: schedules, collapse monitor, LARS, NT-Xent, EMA, DINO loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslfeatures.engine.ema import EMA
from sslfeatures.engine.monitor import collapse_stats, is_collapsed
from sslfeatures.engine.optim import LARS, param_groups
from sslfeatures.engine.schedules import cosine, linear_warmup_then_constant, warmup_cosine
from sslfeatures.losses import DINOLoss, nt_xent


def test_schedules_hit_their_endpoints():
    assert warmup_cosine(0, 100, 10, 1.0) == 0.0
    assert warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, 1.0, final=0.1) == pytest.approx(0.1)
    assert cosine(0.5, 0.996, 1.0) == pytest.approx(0.998)
    assert linear_warmup_then_constant(15, 30, 0.04, 0.07) == pytest.approx(0.055)


def test_collapse_monitor_fires_only_on_collapse():
    torch.manual_seed(0)
    spread = torch.randn(256, 64)
    collapsed = torch.ones(256, 64) + 1e-4 * torch.randn(256, 64)
    s = collapse_stats(spread)
    assert 0.8 < s["norm_std"] <= 1.05 and s["eff_rank"] > 40 and not is_collapsed(s)
    assert is_collapsed(collapse_stats(collapsed))


def test_nt_xent_matches_a_direct_computation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    t = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(4) + 4, torch.arange(4)])
    assert nt_xent(z1, z2, t).item() == pytest.approx(F.cross_entropy(sim, target).item(), rel=1e-5)
    assert nt_xent(z1, z1 + 1e-3, t) < nt_xent(z1, z2, t)  # aligned views: lower loss


def test_lars_descends_and_skips_norm_params():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    opt = LARS(param_groups(lin, 1e-6), lr=1.0)
    x = torch.randn(64, 8)
    losses = []
    for _ in range(20):
        loss = lin(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]


def test_lars_multi_tensor_step_equals_the_per_parameter_rule():
    """The foreach path of LARS.step makes the same update as the one-parameter reference
    (trust ratio, weight decay, momentum, excluded groups, a zero weight and a missing grad)."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        net[2].weight.data.zero_()[0, 0] = 0.5  # one layer far from the others' norms
        net[2].bias.requires_grad_(False)       # no grad: skipped, as in the per-parameter loop
    fast, ref = (LARS(param_groups(n, 1e-2), lr=0.5, momentum=0.9) for n in nets)
    x = torch.randn(32, 8)
    for _ in range(4):
        for net, opt in zip(nets, (fast, ref)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
        fast.step()
        for group in ref.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    ref._update(p, group)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_ema_update_rule():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema = EMA(a)
    before = ema.module.weight.clone()
    ema.update(b, 0.9)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * b.weight)
    assert not any(p.requires_grad for p in ema.parameters())


def test_dino_loss_skips_same_view_and_updates_center():
    loss = DINOLoss(out_dim=4, student_temp=0.1, center_momentum=0.5)
    t = [torch.tensor([[10.0, 0, 0, 0]]), torch.tensor([[0, 10.0, 0, 0]])]
    s_match = [t[1] * 1.0, t[0] * 1.0]  # each student view predicts the *other* teacher view
    s_same = [t[0] * 1.0, t[1] * 1.0]
    a = loss(s_match, t, 0.04).item()
    loss.center.zero_()
    b = loss(s_same, t, 0.04).item()
    assert a < b and math.isfinite(a)
    assert torch.allclose(loss.center, 0.5 * torch.tensor([[5.0, 5.0, 0, 0]]))
