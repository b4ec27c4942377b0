"""qaclims.fat against the reference vectors (fat.npz) and its edge cases."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qaclims.fat import fat_masks
from refdata import load_reference


def alpha_cases(data):
    """(name, alpha) for every `alpha_<a>` group in the file, checked against the `alphas` list."""
    names = sorted({key.split("/")[0] for key in data if key.startswith("alpha_")})
    alphas = [float(name[len("alpha_"):]) for name in names]
    assert sorted(alphas) == sorted(float(a) for a in data["alphas"])
    return list(zip(names, alphas))


def map_sets(data):
    return sorted(key[len("maps_"):] for key in data if key.startswith("maps_"))


def test_reference_masks_exact():
    data = load_reference("fat.npz")
    cases = alpha_cases(data)
    assert cases and map_sets(data)
    for name, alpha in cases:
        for maps in map_sets(data):
            cams = torch.from_numpy(data[f"maps_{maps}"])
            got = fat_masks(cams, alpha)
            expected = data[f"{name}/masks_{maps}"]
            assert got.shape == cams.shape and got.dtype == cams.dtype
            mismatch = int((got.numpy() != expected.astype(np.float32)).sum())
            assert mismatch == 0, f"{name} maps_{maps}: {mismatch} pixels differ"


def test_reference_masks_without_channel_dim():
    # [N, 1, H, W] and [N, H, W] give the same masks: the max is over each H x W map
    data = load_reference("fat.npz")
    for name, alpha in alpha_cases(data):
        for maps in map_sets(data):
            cams = torch.from_numpy(data[f"maps_{maps}"])
            flat = fat_masks(cams.flatten(0, -3), alpha)
            assert torch.equal(flat.view_as(cams), fat_masks(cams, alpha))


def test_tie_pixels_follow_float32_threshold():
    for alpha in (0.1, 0.3, 0.15):
        peak = torch.tensor(0.8321, dtype=torch.float32)
        th = peak * alpha
        cam = torch.zeros(3, 4)
        cam[0, 0] = peak
        cam[1, :3] = th
        cam[2, :3] = torch.nextafter(th, torch.tensor(0.0))
        mask = fat_masks(cam, alpha)
        assert mask[1, :3].tolist() == [1, 1, 1] and mask[2, :3].tolist() == [0, 0, 0]


def test_no_gradient_and_dtype():
    cams = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    masks = fat_masks(cams)
    assert not masks.requires_grad and masks.dtype == torch.float64
    (cams * masks).sum().backward()  # masks act as constants
    assert torch.equal(cams.grad, masks)


@pytest.mark.parametrize("alpha", [-0.01, 1.01, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        fat_masks(torch.rand(4, 4), alpha)


def test_bad_input():
    with pytest.raises(ValueError, match="2 dims"):
        fat_masks(torch.rand(4))
    with pytest.raises(TypeError, match="floating"):
        fat_masks(torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError):
        fat_masks(np.zeros((4, 4), dtype=np.float32))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_batched_equals_one_map_at_a_time(n, h, w, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    cams = torch.rand(n, 2, h, w, generator=gen) ** 2
    batched = fat_masks(cams, alpha)
    for i in range(n):
        for k in range(2):
            one = cams[i, k]
            expected = (one >= one.max() * alpha).float()
            assert torch.equal(batched[i, k], expected)
    assert batched.amax(dim=(-2, -1)).eq(1).all()  # the peak is always kept
