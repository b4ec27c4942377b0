"""qaclims.refine: dense CRF, IR labels, the random walk (sparse vs dense) and its labels (irn_rw.npz, crf.npz)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from qaclims.bench import COLUMNS
from qaclims.refine import (bench_random_walk, crf_labels, dense_affinity, ir_labels, random_walk, random_walk_dense,
                            rw_labels, transition_stencil)
from refdata import case_names, load_reference

RW_CASES = case_names(load_reference("irn_rw.npz"), "case")
CRF_CASES = case_names(load_reference("crf.npz"), "case")


def rw_case(case):
    data = load_reference("irn_rw.npz")
    get = lambda field: data[f"{case}/{field}"]  # noqa: E731
    params = dict(beta=float(get("beta")), exp_times=int(get("exp_times")), radius=int(get("radius")))
    return get, params


def relative_error(got, expected):
    expected = np.asarray(expected)
    return np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("case", RW_CASES)
def test_random_walk_matches_reference(case):
    get, params = rw_case(case)
    edge, cams = torch.from_numpy(get("edge")), torch.from_numpy(get("cams"))
    expected = get("rw")[:, 0]
    sparse = random_walk(cams, edge, **params)
    assert sparse.dtype == torch.float32 and sparse.shape == expected.shape
    assert relative_error(sparse, expected) <= 1e-4
    assert relative_error(random_walk_dense(cams, edge, **params), expected) <= 1e-4
    # the sparse walk in float64 is the exact maths: it meets the reference's own float64 run closely
    sparse64 = random_walk(cams.double(), edge.double(), **params)
    assert relative_error(sparse64, get("rw_f64")[:, 0]) <= 1e-6
    assert np.abs(dense_affinity(edge, params["radius"]).numpy() - get("dense_aff")).max() <= 1e-6


@pytest.mark.parametrize("case", RW_CASES)
def test_rw_labels_match_reference(case):
    get, params = rw_case(case)
    keys, orig_size, threshold = get("keys"), tuple(int(s) for s in get("orig_size")), float(get("sem_seg_bg_thres"))
    expected = get("label")
    from_reference = rw_labels(torch.from_numpy(get("rw")[:, 0]), keys, orig_size, threshold)
    assert from_reference.dtype == torch.int64 and np.array_equal(from_reference.numpy(), expected)
    walked = random_walk(torch.from_numpy(get("cams")), torch.from_numpy(get("edge")), **params)
    ours = rw_labels(walked, keys, orig_size, threshold).numpy()
    # exact, except possibly at near-ties of the reference's planes (background plane included)
    planes = np.concatenate([np.full((1, *orig_size), threshold, np.float32), get("rw_up")])
    top2 = np.sort(planes, axis=0)[-2:]
    near_tie = (top2[1] - top2[0]) < 1e-4
    assert np.array_equal(ours[~near_tie], expected[~near_tie])
    assert (ours != expected).sum() <= max(3, expected.size // 1000)


@pytest.mark.parametrize("case", CRF_CASES)
def test_crf_matches_reference(case):
    data = load_reference("crf.npz")
    get = lambda field: data[f"{case}/{field}"]  # noqa: E731
    out = crf_labels(get("img"), get("labels_in"), int(get("n_labels")), int(get("t")), float(get("gt_prob")))
    assert out.dtype == np.int64 and np.array_equal(out, get("labels_out"))


def test_ir_labels_by_hand():
    # two CAMs on a 2 x 6 strip, no CRF: fg at >= 0.3 (strict >), bg when both CAMs <= 0.1, else uncertain
    cams = np.array([[[0.0, 0.1, 0.2, 0.3, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]],
                     [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.05, 0.15, 0.31, 0.4, 0.2, 0.0]]], np.float32)
    image = np.zeros((2, 6, 3), np.uint8)
    out = ir_labels(image, cams, keys=[2, 7], crf=False)
    assert out.dtype == np.uint8
    # ties go to background: exactly 0.3 (float32) is not foreground, exactly 0.1 is background
    assert out.tolist() == [[0, 0, 255, 255, 3, 3], [0, 255, 8, 8, 255, 0]]
    record = {"keys": np.array([2, 7]), "high_res": cams, "cam": cams[:, :, ::4]}
    assert np.array_equal(ir_labels(image, record, crf=False), out)
    with pytest.raises(ValueError):
        ir_labels(image, cams)  # keys missing
    with pytest.raises(ValueError):
        ir_labels(image, record, keys=[2, 7])
    with pytest.raises(ValueError):
        ir_labels(np.zeros((3, 6, 3), np.uint8), cams, keys=[2, 7])


def test_ir_labels_with_crf_on_a_clean_image():
    # a bright square on a dark image; the CAM is a blurred, shifted square: the CRF pulls fg/bg onto the square
    image = np.full((40, 40, 3), 20, np.uint8)
    image[10:30, 10:30] = (220, 200, 30)
    cam = torch.zeros(1, 1, 40, 40)
    cam[..., 13:30, 13:30] = 1.0
    cam = F.avg_pool2d(cam, 9, stride=1, padding=4)[0].numpy()
    out = ir_labels(image, cam, keys=[4])
    assert set(np.unique(out)) <= {0, 5, 255}
    assert (out[12:28, 12:28] == 5).all() and (out[:6] == 0).all() and (out[:, :6] == 0).all()


def test_random_walk_bad_input():
    with pytest.raises(ValueError):
        random_walk(torch.rand(4, 4), torch.rand(4, 4))
    with pytest.raises(ValueError):
        random_walk(torch.rand(1, 4, 4), torch.rand(4, 5))
    with pytest.raises(ValueError):
        random_walk(torch.rand(1, 4, 4), torch.rand(4, 4), exp_times=-1)
    with pytest.raises(ValueError):
        random_walk(torch.rand(1, 4, 4), torch.rand(4, 4), beta=0)
    with pytest.raises(ValueError):
        rw_labels(torch.rand(1, 4, 4), [0], (17, 16))
    with pytest.raises(ValueError):
        crf_labels(np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 3), n_labels=3)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(0, 3), h=st.integers(1, 10), w=st.integers(1, 10), radius=st.integers(2, 5),
       exp_times=st.integers(0, 6), beta=st.sampled_from([1.0, 3.0, 10.0]), seed=st.integers(0, 2**16))
def test_sparse_equals_dense(k, h, w, radius, exp_times, beta, seed):
    generator = torch.Generator().manual_seed(seed)
    cams = torch.rand(k, h, w, generator=generator, dtype=torch.float64)
    edge = torch.rand(h, w, generator=generator, dtype=torch.float64) ** 2
    sparse = random_walk(cams, edge, beta, exp_times, radius)
    dense = random_walk_dense(cams, edge, beta, exp_times, radius)
    assert sparse.shape == dense.shape == (k, h, w)
    assert torch.allclose(sparse, dense, rtol=1e-9, atol=1e-12)
    offsets, weights = transition_stencil(edge, beta, radius)
    assert torch.allclose(weights.sum(0), torch.ones(h, w, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 4), h=st.integers(1, 8), w=st.integers(1, 8), threshold=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), data=st.data())
def test_rw_labels_values(k, h, w, threshold, seed, data):
    generator = torch.Generator().manual_seed(seed)
    rw = torch.rand(k, h, w, generator=generator) * data.draw(st.sampled_from([0.0, 1e-3, 1.0, 50.0]))
    keys = sorted(data.draw(st.lists(st.integers(0, 79), min_size=k, max_size=k, unique=True)))
    height, width = data.draw(st.integers(4 * h - 3, 4 * h)), data.draw(st.integers(4 * w - 3, 4 * w))
    out = rw_labels(rw, keys, (height, width), threshold)
    assert out.shape == (height, width) and out.dtype == torch.int64
    assert set(out.unique().tolist()) <= {0} | {key + 1 for key in keys}


def test_bench_quick():
    rows = bench_random_walk(quick=True)
    assert rows and all(set(COLUMNS) <= set(row) for row in rows)
    assert all(row["same_output"] for row in rows)
    assert all(row["seconds"] > 0 for row in rows)
