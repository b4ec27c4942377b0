"""qaclims.irn: the IRN's shapes and gradients, its losses on tiny inputs checked by hand, boundary maps with flips."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qaclims.irn import (Irn, RunningCentre, affinity_losses, boundary_map, displacement_losses, irn_loss,
                         pair_displacements, stage_channels, stage_strides)
from qaclims.path_index import PathIndex, affinity_labels, edge_to_affinity
from qaclims.transforms import inference_views


def two_regions(h=12, w=16, split=7):
    "Labels [1, h, w]: class 1 left of column `split`, 255 on it, background right of it."
    labels = torch.zeros(1, h, w, dtype=torch.long)
    labels[:, :, :split] = 1
    labels[:, :, split] = 255
    return labels


@pytest.mark.parametrize("arch, stride, size", [("resnet18", 8, (48, 40)), ("resnet18", 16, (37, 29)),
                                                ("resnet50", 16, (33, 45)), ("resnet18", 32, (50, 38))])
def test_shapes_and_gradients(arch, stride, size):
    torch.manual_seed(0)
    net = Irn(arch, stride).train()
    edge, dp = net(torch.randn(1, 3, *size))
    grid = (-(-size[0] // 4), -(-size[1] // 4))
    assert edge.shape == (1, 1, *grid) and dp.shape == (1, 2, *grid)
    (edge.square().mean() + dp.square().mean()).backward()
    assert all(p.grad is None for p in net.resnet.parameters())  # frozen backbone, as the reference
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for group in net.param_groups() for p in group)
    assert not net.resnet.training and net.edge_layers.training and net.dp_fuse.training


def test_stage_layout_matches_the_reference():
    trunk = Irn("resnet50", 16).resnet
    assert stage_channels(trunk) == (64, 256, 512, 1024, 2048) and stage_strides(trunk) == (4, 4, 8, 16, 16)
    net = Irn("resnet50", 16)
    widths = [layer[0].out_channels for layer in net.edge_layers] + [net.edge_fuse.in_channels]
    assert widths == [32] * 5 + [160] and net.edge_fuse.bias is not None
    assert [layer[1].num_groups for layer in net.edge_layers] == [4] * 5
    assert [layer[0].out_channels for layer in net.dp_layers] == [64, 128, 256, 256, 256]
    assert net.dp_fuse_deep[0].in_channels == 768 and net.dp_fuse[0][0].in_channels == 448 and net.dp_fuse[1].bias is None
    edge_params, dp_params = net.param_groups()
    assert sum(p.numel() for p in edge_params) == 32 * (64 + 256 + 512 + 1024 + 2048) + 5 * 2 * 32 + 161


def test_running_centre_tracks_the_mean_in_training_only():
    centre = RunningCentre(2)
    x = torch.ones(3, 2, 4, 4) * torch.tensor([2.0, -4.0]).view(1, 2, 1, 1)
    assert torch.equal(centre(x), x)
    assert torch.allclose(centre.running_mean, torch.tensor([0.2, -0.4]))
    centre.eval()
    assert torch.allclose(centre(x), x - torch.tensor([0.2, -0.4]).view(1, 2, 1, 1))
    assert torch.allclose(centre.running_mean, torch.tensor([0.2, -0.4]))  # no update in eval


def test_perfect_boundary_has_about_zero_affinity_loss():
    labels = two_regions()
    index = PathIndex(3, (12, 16))
    pairs = affinity_labels(labels, index)
    assert all(v.any() for v in pairs.values())
    perfect = (labels == 255).float().unsqueeze(1)
    losses = affinity_losses(edge_to_affinity(perfect, index), pairs)
    assert all(abs(v.item()) < 2e-5 for v in losses.values())
    # no boundary: the negative pairs (and only they) are wrong, with the reference's guard -log(1e-5)
    losses = affinity_losses(edge_to_affinity(torch.zeros_like(perfect), index), pairs)
    assert losses["neg"].item() == pytest.approx(-np.log(1e-5), rel=1e-3) and abs(losses["fg_pos"].item()) < 2e-5


def test_affinity_loss_by_hand():
    "Two pairs: a positive pair with affinity 0.8 and a negative pair with affinity 0.3."
    aff = torch.tensor([[[[0.8, 0.3]]]])  # [1, 1, 1, 2]
    labels = {"bg_pos": torch.tensor([[[[True, False]]]]), "fg_pos": torch.zeros(1, 1, 1, 2, dtype=torch.bool),
              "neg": torch.tensor([[[[False, True]]]])}
    losses = affinity_losses(aff, labels)
    assert losses["bg_pos"].item() == pytest.approx(-np.log(0.8 + 1e-5) / (1 + 1e-5), rel=1e-6)
    assert losses["neg"].item() == pytest.approx(-np.log(1 + 1e-5 - 0.3) / (1 + 1e-5), rel=1e-6)
    assert losses["fg_pos"].item() == 0


def test_centred_displacement_field_has_zero_loss():
    labels = two_regions()
    index = PathIndex(3, (12, 16))
    pairs = affinity_labels(labels, index)
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(16.0), indexing="ij")
    field = (torch.stack([5.0 - ys, 3.0 - xs]) * (labels == 1)).unsqueeze(0)
    losses = displacement_losses(field, pairs, index)
    assert losses["fg"].item() < 1e-6 and losses["bg"].item() < 1e-6
    shifted = displacement_losses(field + 1.0, pairs, index)  # a constant shift changes no pair difference
    assert shifted["fg"].item() < 1e-6 and shifted["bg"].item() < 1e-6


@settings(max_examples=25, deadline=None)
@given(a=st.lists(st.floats(-2, 2), min_size=4, max_size=4), b=st.lists(st.floats(-3, 3), min_size=2, max_size=2),
       radius=st.integers(2, 4))
def test_pair_displacements_of_an_affine_field(a, b, radius):
    "For D(p) = A p + b, D(p) - D(p + d) = -A d at every pair."
    index = PathIndex(radius, (10, 14))
    A = torch.tensor(a, dtype=torch.float64).view(2, 2)
    ys, xs = torch.meshgrid(torch.arange(10.0, dtype=torch.float64), torch.arange(14.0, dtype=torch.float64), indexing="ij")
    field = torch.einsum("ij,jhw->ihw", A, torch.stack([ys, xs])) + torch.tensor(b, dtype=torch.float64).view(2, 1, 1)
    pairs = pair_displacements(field[None], index)[0]  # [2, D, h', w']
    expected = -(A @ index.directions.t().double())  # [2, D]
    assert torch.allclose(pairs, expected[:, :, None, None].expand_as(pairs), atol=1e-9)


def test_irn_loss_combines_the_parts_as_the_reference():
    torch.manual_seed(1)
    edge_logits, dp = torch.randn(2, 1, 12, 16, requires_grad=True), torch.randn(2, 2, 12, 16, requires_grad=True)
    index = PathIndex(3, (12, 16))
    labels = affinity_labels(torch.cat([two_regions(), two_regions(split=4)]), index)
    total, parts = irn_loss(edge_logits, dp, labels, index)
    a = affinity_losses(edge_to_affinity(torch.sigmoid(edge_logits), index), labels)
    d = displacement_losses(dp, labels, index)
    expected = (a["bg_pos"] / 2 + a["fg_pos"] / 2 + a["neg"]) / 2 + (d["fg"] + d["bg"]) / 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["dp_fg"] == pytest.approx(d["fg"].item()) and set(parts) == {"bg_pos", "fg_pos", "neg", "dp_fg", "dp_bg"}
    total.backward()
    assert edge_logits.grad.abs().sum() > 0 and dp.grad.abs().sum() > 0


def test_boundary_map_averages_flips_and_scales():
    torch.manual_seed(0)
    net = Irn("resnet18", 8).eval()
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    views = [v[None] for v in inference_views({"image": image}, (1.0, 0.5))["views"]]
    one = boundary_map(net, views[:1], (40, 56))[0]
    logits = net.boundary_logits(views[0][0])
    assert torch.allclose(one, torch.sigmoid((logits[0, 0] + logits[1, 0].flip(-1)) / 2), atol=1e-6)
    two = boundary_map(net, views, (40, 56))
    assert two.shape == (1, 10, 14) and ((two >= 0) & (two <= 1)).all()
    mirror = np.concatenate([image[:, :28], image[:, :28][:, ::-1]], axis=1)
    sym = boundary_map(net, [v[None] for v in inference_views({"image": mirror}, (1.0,))["views"]], (40, 56))
    assert torch.allclose(sym, sym.flip(-1), atol=1e-5)
    batch = boundary_map(net, [torch.cat([views[0], views[0]])], (40, 56))
    assert torch.allclose(batch[1], one, atol=1e-5)


def test_bad_input():
    net = Irn("resnet18", 8)
    index = PathIndex(3, (12, 16))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="7 widths"):
        Irn(dp_widths=(8, 8))
    with pytest.raises(ValueError, match="same PathIndex"):
        affinity_losses(torch.rand(1, 2, 3, 3), affinity_labels(two_regions(), index))
    with pytest.raises(ValueError, match=r"\[B, 2, h, w\]"):
        pair_displacements(torch.zeros(1, 1, 12, 16), index)
    with pytest.raises(ValueError, match="empty"):
        boundary_map(net, [], (32, 32))
    with pytest.raises(ValueError, match=r"\[N, 2, 3, h, w\]"):
        boundary_map(net, [torch.zeros(1, 3, 32, 32)], (32, 32))
