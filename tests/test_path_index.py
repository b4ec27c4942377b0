"""qaclims.path_index: pair directions, affinities from boundary maps, pair labels (reference: irn_rw.npz)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from qaclims.path_index import PathIndex, affinity_labels, edge_to_affinity, image_pair_affinity, search_paths
from refdata import case_names, load_reference


def dense_from_pairs(pairs, aff, n):
    """The reference's dense affinity matrix: 1 on the diagonal, symmetric pair affinities."""
    dense = torch.eye(n, dtype=aff.dtype)
    dense[pairs[0], pairs[1]] = aff
    dense[pairs[1], pairs[0]] = aff
    return dense


@pytest.mark.parametrize("case", case_names(load_reference("irn_rw.npz"), "case"))
def test_dense_affinity_matches_reference(case):
    data = load_reference("irn_rw.npz")
    edge = torch.from_numpy(data[f"{case}/edge"])
    h, w = edge.shape[-2:]
    pairs, aff = image_pair_affinity(edge, int(data[f"{case}/radius"]))
    dense = dense_from_pairs(pairs, aff, h * w)
    expected = data[f"{case}/dense_aff"]
    assert dense.shape == expected.shape
    np.testing.assert_allclose(dense.numpy(), expected, rtol=0, atol=1e-6)


def test_reference_direction_layout():
    # radius 5 (inference) and 10 (IRN training) as in the reference; sorted by path length
    assert len(search_paths(5)) == 34 and len(search_paths(10)) == 152
    lengths = [len(p) for p in search_paths(10)]
    assert lengths == sorted(lengths)
    index = PathIndex(5, (20, 30))
    assert index.crop_size == (16, 22)
    flat = torch.arange(20 * 30).view(20, 30)
    assert torch.equal(index.source_indices, flat[:16, 4:26].reshape(-1))
    for d, (dy, dx) in enumerate(index.directions.tolist()):
        assert torch.equal(index.destination_indices[d], flat[dy:dy + 16, 4 + dx:4 + dx + 22].reshape(-1))


def test_edge_to_affinity_is_path_max():
    torch.manual_seed(1)
    index = PathIndex(3, (7, 9))
    edge = torch.rand(2, 1, 7, 9)
    aff = edge_to_affinity(edge, index)
    (ch, cw), m = index.crop_size, index.margin
    for d, path in enumerate(index.paths):
        stack = torch.stack([edge[:, 0, py:py + ch, m + px:m + px + cw] for py, px in path])
        assert torch.equal(aff[:, d], 1 - stack.amax(0))


def test_affinity_labels_by_hand():
    # radius 2: directions (0, 1), (1, 0), (1, -1), (1, 1); margin 1 -> sources rows 0..1, cols 1..2
    labels = torch.tensor([[[0, 0, 0, 3],
                            [0, 0, 3, 3],
                            [7, 255, 3, 3]]])
    index = PathIndex(2, (3, 4))
    assert index.directions.tolist() == [[0, 1], [1, 0], [1, -1], [1, 1]]
    out = affinity_labels(labels, index)
    assert set(out) == {"bg_pos", "fg_pos", "neg"}
    assert all(v.shape == (1, 4, 2, 2) and v.dtype == torch.bool for v in out.values())
    right, down, down_left, down_right = 0, 1, 2, 3
    # source (0, 1) [bg] -> (0, 2) [bg]: background pair
    assert out["bg_pos"][0, right, 0, 0] and not out["neg"][0, right, 0, 0]
    # source (1, 2) [3] -> (1, 3) [3]: same foreground class
    assert out["fg_pos"][0, right, 1, 1] and not out["bg_pos"][0, right, 1, 1]
    # source (0, 2) [0] -> (0, 3) [3]: different classes
    assert out["neg"][0, right, 0, 1]
    # source (1, 1) [0] -> (2, 0) [7]: different (background vs class)
    assert out["neg"][0, down_left, 1, 0]
    # source (1, 1) [0] -> (2, 1) [255]: ignored, none of the three
    assert not (out["bg_pos"][0, down, 1, 0] or out["fg_pos"][0, down, 1, 0] or out["neg"][0, down, 1, 0])
    # source (1, 2) [3] -> (2, 3) [3]: same class diagonally
    assert out["fg_pos"][0, down_right, 1, 1]
    # the three kinds never overlap
    total = out["bg_pos"].int() + out["fg_pos"].int() + out["neg"].int()
    assert total.max() <= 1


def test_bad_input():
    index = PathIndex(3, (8, 8))
    with pytest.raises(ValueError):
        edge_to_affinity(torch.rand(1, 8, 8), index)
    with pytest.raises(ValueError, match="built for"):
        edge_to_affinity(torch.rand(1, 1, 8, 9), index)
    with pytest.raises(TypeError):
        affinity_labels(torch.rand(1, 8, 8), index)
    with pytest.raises(ValueError):
        affinity_labels(torch.full((1, 8, 8), -1), index)
    with pytest.raises(ValueError):
        PathIndex(1, (8, 8))
    with pytest.raises(ValueError):
        PathIndex(5, (3, 30))


@settings(max_examples=25, deadline=None)
@given(radius=st.integers(2, 5), h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_image_pairs_are_symmetric_neighbourhood(radius, h, w, seed):
    """Every in-map pair within the radius appears once; out-of-map pairs are dropped."""
    edge = torch.rand(h, w, generator=torch.Generator().manual_seed(seed))
    pairs, aff = image_pair_affinity(edge, radius)
    src_y, src_x = pairs[0] // w, pairs[0] % w
    dst_y, dst_x = pairs[1] // w, pairs[1] % w
    dist2 = (dst_y - src_y) ** 2 + (dst_x - src_x) ** 2
    assert (dist2 < radius * radius).all() and (dist2 > 0).all()
    unordered = set(map(tuple, torch.sort(pairs, dim=0).values.T.tolist()))
    assert len(unordered) == pairs.shape[1]
    ys, xs = np.mgrid[:h, :w]
    close = ((ys.reshape(-1, 1) - ys.reshape(1, -1)) ** 2 + (xs.reshape(-1, 1) - xs.reshape(1, -1)) ** 2)
    expected = int(((close > 0) & (close < radius * radius)).sum()) // 2
    assert pairs.shape[1] == expected
    assert ((aff >= 0) & (aff <= 1)).all()
