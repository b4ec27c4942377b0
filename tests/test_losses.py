"""qaclims.losses against the reference vectors (frc_brc.npz, clims.npz) and its properties.

Tolerances for FRC/BRC (reference README section 1): float64 rtol 1e-10, float32 atol 2e-6. In
float64 an absolute floor is added (1e-14 on losses, 1e-13 on gradients): the reference evaluates
-log(p / n) with p / n close to 1 for its smallest losses, so its own rounding error is absolute
(about 1e-16), not relative; our logsumexp form is exact there.
"""
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qaclims.losses import (RITC_LOSS_WEIGHTS, area_loss, bg_suppression_loss, brc_loss, frc_loss,
                            mix_fg_text, ritc_loss, sim_max_loss, sim_min_loss)
from refdata import case_names, load_reference

LOSSES = {"fg": frc_loss, "bg": brc_loss}
F64 = dict(loss=dict(rtol=1e-10, atol=1e-14), grad=dict(rtol=1e-10, atol=1e-13))


def pair_case(data, case, dtype=torch.float64):
    get = lambda field: torch.from_numpy(data[f"{case}/{field}"]).to(dtype)
    return dict(fg_img=get("fg_img_feat"), bg_img=get("bg_img_feat"), t_fg=get("fg_text")[0],
                t_bg=get("bg_text"), tau=float(data[f"{case}/temperature"]))


def one_pair_loss_and_grad(kind, c):
    img = c[f"{kind}_img"].unsqueeze(0).clone().requires_grad_()
    loss = LOSSES[kind](img, c["t_fg"].unsqueeze(0), c["t_bg"].unsqueeze(0), tau=c["tau"])
    loss.sum().backward()
    assert loss.shape == (1,) and loss.dtype == img.dtype and img.grad.dtype == img.dtype
    return loss[0].item(), img.grad[0].numpy()


# ---------------------------------------------------------------- reference vectors: frc_brc.npz
def test_mix_fg_text_reference():
    data = load_reference("frc_brc.npz")
    names = case_names(data, "mix")
    assert names
    for case in names:
        t_label = torch.from_numpy(data[f"{case}/t_label"])[0]
        t_answers = torch.from_numpy(data[f"{case}/t_answers"])
        got = mix_fg_text(t_label, t_answers, float(data[f"{case}/w"]))
        np.testing.assert_allclose(got.numpy(), data[f"{case}/t_fg"][0], rtol=1e-12, atol=1e-15, err_msg=case)
        got32 = mix_fg_text(t_label.float(), t_answers.float(), float(data[f"{case}/w"]))
        np.testing.assert_allclose(got32.numpy(), data[f"{case}/t_fg"][0], rtol=0, atol=1e-6, err_msg=case)


def test_frc_brc_reference_float64():
    data = load_reference("frc_brc.npz")
    names = case_names(data, "case")
    assert names
    for case in names:
        c = pair_case(data, case)
        for kind in LOSSES:
            loss, grad = one_pair_loss_and_grad(kind, c)
            np.testing.assert_allclose(loss, data[f"{case}/{kind}_loss"], **F64["loss"], err_msg=f"{case} {kind}")
            np.testing.assert_allclose(grad, data[f"{case}/{kind}_grad"], **F64["grad"], err_msg=f"{case} {kind}")


def test_frc_brc_reference_float32():
    data = load_reference("frc_brc.npz")
    for case in case_names(data, "case"):
        c = pair_case(data, case, torch.float32)
        for kind in LOSSES:
            loss, grad = one_pair_loss_and_grad(kind, c)
            np.testing.assert_allclose(loss, data[f"{case}/{kind}_loss"], rtol=0, atol=2e-6, err_msg=f"{case} {kind}")
            np.testing.assert_allclose(grad, data[f"{case}/{kind}_grad"], rtol=0, atol=2e-6, err_msg=f"{case} {kind}")


def test_frc_brc_reference_all_cases_batched():
    """All cases of one feature size in one call: background lists padded (with NaN), one tau per pair."""
    data = load_reference("frc_brc.npz")
    by_dim = defaultdict(list)
    for case in case_names(data, "case"):
        by_dim[data[f"{case}/fg_img_feat"].shape[0]].append(case)
    for dim, cases in by_dim.items():
        pairs = [pair_case(data, case) for case in cases]
        max_bg = max(c["t_bg"].shape[0] + 2 for c in pairs)  # always some padding
        t_bg = torch.full((len(pairs), max_bg, dim), float("nan"), dtype=torch.float64)
        bg_valid = torch.zeros(len(pairs), max_bg, dtype=torch.bool)
        for p, c in enumerate(pairs):
            n = c["t_bg"].shape[0]
            t_bg[p, :n], bg_valid[p, :n] = c["t_bg"], True
        t_fg = torch.stack([c["t_fg"] for c in pairs])
        tau = torch.tensor([c["tau"] for c in pairs], dtype=torch.float64)
        for kind, loss_fn in LOSSES.items():
            img = torch.stack([c[f"{kind}_img"] for c in pairs]).requires_grad_()
            loss = loss_fn(img, t_fg, t_bg, bg_valid, tau)
            loss.sum().backward()
            for p, case in enumerate(cases):
                np.testing.assert_allclose(loss[p].item(), data[f"{case}/{kind}_loss"], **F64["loss"], err_msg=case)
                np.testing.assert_allclose(img.grad[p].numpy(), data[f"{case}/{kind}_grad"], **F64["grad"], err_msg=case)


# ---------------------------------------------------------------- reference vectors: clims.npz
def test_sim_losses_reference():
    data = load_reference("clims.npz")
    names = case_names(data, "sim")
    assert names
    for case in names:
        x = torch.from_numpy(data[f"{case}/x"]).requires_grad_()
        w = data[f"{case}/weights"]
        weights = float(w) if w.ndim == 0 else torch.from_numpy(w)
        margin = float(data[f"{case}/margin"])
        free = data[f"{case}/x_on_clamp_boundary"] == 0  # the gradient exactly on the clamp bounds is version-dependent
        for name, loss_fn in (("sim_max", sim_max_loss), ("sim_min", sim_min_loss)):
            x.grad = None
            loss = loss_fn(x, weights, margin)
            loss.backward()
            assert loss.dim() == 0
            np.testing.assert_allclose(loss.item(), data[f"{case}/{name}_loss"], rtol=1e-12, err_msg=f"{case} {name}")
            np.testing.assert_allclose(x.grad.numpy()[free], data[f"{case}/{name}_grad"][free], rtol=1e-12,
                                       atol=1e-15, err_msg=f"{case} {name}")


def test_bg_suppression_reference():
    data = load_reference("clims.npz")
    names = case_names(data, "cbs")
    assert names
    for case in names:
        threshold = float(data[f"{case}/threshold"])
        # from the stored similarities alone
        loss = bg_suppression_loss(torch.from_numpy(data[f"{case}/logits"]), threshold)
        np.testing.assert_allclose(loss.item(), data[f"{case}/loss"], rtol=1e-12, err_msg=case)
        # from the raw features, with the gradient through the normalisation
        feats = torch.from_numpy(data[f"{case}/image_features"]).requires_grad_()
        texts = torch.from_numpy(data[f"{case}/text_features"])
        logits = F.normalize(feats, dim=-1) @ F.normalize(texts, dim=-1).t()
        np.testing.assert_array_equal((logits > threshold).numpy(), data[f"{case}/mask"].astype(bool))
        loss = bg_suppression_loss(logits, threshold)
        loss.backward()
        np.testing.assert_allclose(loss.item(), data[f"{case}/loss"], rtol=1e-12, err_msg=case)
        np.testing.assert_allclose(feats.grad.numpy(), data[f"{case}/grad_image_features"], rtol=1e-12,
                                   atol=1e-15, err_msg=case)


# ---------------------------------------------------------------- properties
def random_pairs(seed, num_pairs, max_bg, dim, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    img = 3 * torch.randn(num_pairs, dim, generator=gen, dtype=dtype)
    t_fg = 0.8 * F.normalize(torch.randn(num_pairs, dim, generator=gen, dtype=dtype), dim=-1)
    t_bg = F.normalize(torch.randn(num_pairs, max_bg, dim, generator=gen, dtype=dtype), dim=-1)
    n_bg = torch.randint(1, max_bg + 1, (num_pairs,), generator=gen)
    bg_valid = torch.arange(max_bg).unsqueeze(0) < n_bg.unsqueeze(1)
    return img, t_fg, t_bg, bg_valid


pair_params = dict(seed=st.integers(0, 2**31 - 1), num_pairs=st.integers(1, 5), max_bg=st.integers(1, 6),
                   dim=st.integers(2, 12), tau=st.sampled_from([0.7, 0.07, 1.0]))


@settings(max_examples=30, deadline=None)
@given(**pair_params, extra=st.integers(1, 4), junk=st.sampled_from([0.0, 1e3, float("nan")]))
def test_padding_changes_nothing(seed, num_pairs, max_bg, dim, tau, extra, junk):
    img, t_fg, t_bg, bg_valid = random_pairs(seed, num_pairs, max_bg, dim)
    padded_bg = torch.cat([t_bg, torch.full((num_pairs, extra, dim), junk, dtype=t_bg.dtype)], dim=1)
    padded_valid = torch.cat([bg_valid, torch.zeros(num_pairs, extra, dtype=torch.bool)], dim=1)
    for loss_fn in LOSSES.values():
        a = img.clone().requires_grad_()
        b = img.clone().requires_grad_()
        loss_a = loss_fn(a, t_fg, t_bg, bg_valid, tau)
        loss_b = loss_fn(b, t_fg, padded_bg, padded_valid, tau)
        loss_a.sum().backward()
        loss_b.sum().backward()
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-14, atol=0)
        assert torch.isfinite(b.grad).all()
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-14, atol=0)


@settings(max_examples=30, deadline=None)
@given(**pair_params, perm_seed=st.integers(0, 2**31 - 1))
def test_background_order_does_not_matter(seed, num_pairs, max_bg, dim, tau, perm_seed):
    img, t_fg, t_bg, bg_valid = random_pairs(seed, num_pairs, max_bg, dim)
    gen = torch.Generator().manual_seed(perm_seed)
    perm = torch.stack([torch.randperm(max_bg, generator=gen) for _ in range(num_pairs)])  # [P, L], valid slots move too
    t_bg_perm = torch.gather(t_bg, 1, perm.unsqueeze(-1).expand_as(t_bg))
    valid_perm = torch.gather(bg_valid, 1, perm)
    for loss_fn in LOSSES.values():
        torch.testing.assert_close(loss_fn(img, t_fg, t_bg_perm, valid_perm, tau),
                                   loss_fn(img, t_fg, t_bg, bg_valid, tau), rtol=1e-13, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(**pair_params)
def test_batched_equals_one_by_one(seed, num_pairs, max_bg, dim, tau):
    img, t_fg, t_bg, bg_valid = random_pairs(seed, num_pairs, max_bg, dim)
    for loss_fn in LOSSES.values():
        batch_img = img.clone().requires_grad_()
        batched = loss_fn(batch_img, t_fg, t_bg, bg_valid, tau)
        batched.sum().backward()
        for p in range(num_pairs):
            one_img = img[p:p + 1].clone().requires_grad_()
            n = int(bg_valid[p].sum())
            one = loss_fn(one_img, t_fg[p:p + 1], t_bg[p:p + 1, :n], None, tau)
            one.sum().backward()
            torch.testing.assert_close(batched[p], one[0], rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(batch_img.grad[p], one_img.grad[0], rtol=1e-12, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(**pair_params)
def test_matches_direct_formula(seed, num_pairs, max_bg, dim, tau):
    img, t_fg, t_bg, bg_valid = random_pairs(seed, num_pairs, max_bg, dim)
    f = img / img.norm(dim=-1, keepdim=True)
    pos = torch.exp((f * t_fg).sum(-1) / tau)
    neg = torch.exp(torch.einsum("pc,plc->pl", f, t_bg) / tau) * bg_valid
    frc = -torch.log(pos / (pos + neg.sum(-1)))
    mean_neg = neg.sum(-1) / bg_valid.sum(-1)
    brc = -torch.log(mean_neg / (mean_neg + pos))
    torch.testing.assert_close(frc_loss(img, t_fg, t_bg, bg_valid, tau), frc, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(brc_loss(img, t_fg, t_bg, bg_valid, tau), brc, rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------- invalid pairs and bad input
def test_pair_without_background_text_gives_zero_loss_and_gradient():
    img, t_fg, t_bg, bg_valid = random_pairs(0, 3, 4, 6)
    bg_valid[1] = False
    t_bg[1] = float("nan")
    for loss_fn in LOSSES.values():
        x = img.clone().requires_grad_()
        loss = loss_fn(x, t_fg, t_bg, bg_valid)
        loss.sum().backward()
        assert loss[1] == 0 and (x.grad[1] == 0).all()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        assert (loss[[0, 2]] > 0).all() and (x.grad[[0, 2]] != 0).any()
    empty = t_bg[:, :0]
    assert frc_loss(img, t_fg, empty).eq(0).all() and brc_loss(img, t_fg, empty).eq(0).all()


def test_large_logits_stay_finite_in_float32():
    img, t_fg, t_bg, bg_valid = random_pairs(3, 4, 10, 768, torch.float32)
    img.requires_grad_()
    for loss_fn in LOSSES.values():
        loss = loss_fn(img, t_fg, t_bg, bg_valid, tau=0.005)  # logits up to 200: exp() would overflow float32
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(img.grad).all()


def test_bad_pair_input():
    img, t_fg, t_bg, bg_valid = random_pairs(0, 3, 4, 6)
    with pytest.raises(TypeError, match="bool"):
        frc_loss(img, t_fg, t_bg, bg_valid.float())
    with pytest.raises(ValueError, match=r"\[P, L\]"):
        brc_loss(img, t_fg, t_bg, bg_valid[:2])
    with pytest.raises(ValueError, match="img"):
        frc_loss(img[0], t_fg, t_bg)
    with pytest.raises(ValueError, match="t_bg"):
        frc_loss(img, t_fg, t_bg[..., :5])
    with pytest.raises(ValueError, match="tau"):
        frc_loss(img, t_fg, t_bg, tau=-0.7)
    with pytest.raises(TypeError, match="dtype"):
        brc_loss(img.float(), t_fg, t_bg)


def test_mix_fg_text_is_not_renormalised():
    t_label = F.normalize(torch.randn(16, dtype=torch.float64), dim=0)
    t_answers = F.normalize(torch.randn(6, 16, dtype=torch.float64), dim=1)
    t_fg = mix_fg_text(t_label, t_answers)
    torch.testing.assert_close(t_fg, 0.5 * t_label + 0.5 * t_answers.mean(0))
    assert t_fg.norm() < 1
    batched = mix_fg_text(t_label.expand(3, 16), t_answers.expand(3, 6, 16))
    assert batched.shape == (3, 16) and torch.allclose(batched[1], t_fg)
    with pytest.raises(ValueError, match="Q = 0"):
        mix_fg_text(t_label, t_answers[:0])


def test_area_and_ritc_loss():
    cams = torch.rand(2, 20, 8, 8, dtype=torch.float64)
    assert area_loss(cams) == cams.mean()
    frc, brc = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    w_frc, w_brc, w_reg = RITC_LOSS_WEIGHTS["coco"]
    assert (w_frc, w_brc, w_reg) == (30.0, 24.0, 0.2) and RITC_LOSS_WEIGHTS["voc"] == (10.0, 8.0, 0.2)
    expected = 10 * frc.sum() + 8 * brc.sum() + 0.2 * cams.mean()
    torch.testing.assert_close(ritc_loss(frc, brc, cams), expected)
    with pytest.raises(ValueError, match="empty"):
        area_loss(cams[:0])


def test_clims_losses_edge_cases():
    # entries at or below the threshold contribute nothing, even when log(1 - s) would be NaN there
    assert bg_suppression_loss(torch.tensor([[0.26, 0.1]]), 0.26) == 0
    logits = torch.tensor([[0.5, 0.1], [0.3, 0.9]], dtype=torch.float64)
    expected = -(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.7)) + torch.log(torch.tensor(0.1)))
    torch.testing.assert_close(bg_suppression_loss(logits, 0.26), expected.double())
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    sim_max_loss(x).backward()
    assert (x.grad == 0).all()  # out of the clamp range: no gradient
    with pytest.raises(TypeError):
        sim_min_loss(torch.tensor([1, 0]))
