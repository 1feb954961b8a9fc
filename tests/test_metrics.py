"""pspnet.metrics against per-pixel brute force and hand-made cases (semseg util/util.py semantics)."""

import numpy as np
import pytest
import torch

from pspnet.metrics import SegmentationMetrics, intersection_and_union

IGNORE = 255


def brute_force_areas(pred, target, k, ignore=IGNORE):
    """Per-pixel loop: the definition of docs/semseg_parity.md (metrics), written out."""
    inter, out, tgt = [0] * k, [0] * k, [0] * k
    for p, t in zip(np.asarray(pred).ravel().tolist(), np.asarray(target).ravel().tolist()):
        if t == ignore:
            continue
        tgt[t] += 1
        if p != ignore:
            out[p] += 1
        if p == t:
            inter[t] += 1
    union = [o + t - i for i, o, t in zip(inter, out, tgt)]
    return np.array(inter), np.array(union), np.array(tgt)


def random_case(rng, shape, k, p_ignore=0.2):
    pred = rng.integers(0, k, size=shape)
    target = rng.integers(0, k, size=shape)
    target[rng.random(shape) < p_ignore] = IGNORE
    # correlate a bit so intersections are not tiny
    agree = rng.random(shape) < 0.4
    pred[agree & (target != IGNORE)] = target[agree & (target != IGNORE)]
    return pred, target


@pytest.mark.parametrize("shape", [(37,), (13, 17), (2, 9, 11)])
def test_matches_brute_force_numpy_and_torch(shape):
    rng = np.random.default_rng(sum(shape))
    k = 7
    pred, target = random_case(rng, shape, k)
    expected = brute_force_areas(pred, target, k)
    got = intersection_and_union(pred.astype(np.uint8), target.astype(np.uint8), k)
    for e, g in zip(expected, got):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, e)
    got_t = intersection_and_union(torch.from_numpy(pred), torch.from_numpy(target), k)
    for e, g in zip(expected, got_t):
        assert isinstance(g, torch.Tensor) and g.dtype == torch.int64
        np.testing.assert_array_equal(g.numpy(), e)


def test_matches_semseg_histogram_formula():
    """The np.histogram formulation of semseg's intersectionAndUnion gives the same areas for valid inputs."""
    rng = np.random.default_rng(1)
    k = 11
    pred, target = random_case(rng, (40, 50), k)
    out = pred.reshape(-1).copy()
    tgt = target.reshape(-1)
    out[tgt == IGNORE] = IGNORE
    inter = out[out == tgt]
    area_i, _ = np.histogram(inter, bins=np.arange(k + 1))
    area_o, _ = np.histogram(out, bins=np.arange(k + 1))
    area_t, _ = np.histogram(tgt, bins=np.arange(k + 1))
    got = intersection_and_union(pred, target, k)
    np.testing.assert_array_equal(got[0], area_i)
    np.testing.assert_array_equal(got[1], area_o + area_t - area_i)
    np.testing.assert_array_equal(got[2], area_t)


def test_hand_made_case():
    target = np.array([[0, 0, 1, 1],
                       [2, 2, IGNORE, IGNORE]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 2, 0]])
    inter, union, tgt = intersection_and_union(pred, target, 3)
    # class 0: pred at (0,0),(1,0) [ignored pixels dropped]; target (0,0),(0,1); I=1
    np.testing.assert_array_equal(inter, [1, 2, 1])
    np.testing.assert_array_equal(tgt, [2, 2, 2])
    np.testing.assert_array_equal(union, [3, 3, 2])
    m = SegmentationMetrics(3)
    m.update(pred, target)
    r = m.compute()
    np.testing.assert_allclose(r["iou"], [1 / 3, 2 / 3, 1 / 2])
    np.testing.assert_allclose(r["acc"], [1 / 2, 1, 1 / 2])
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["allacc"] == pytest.approx(4 / 6)


def test_accumulates_sums_not_means():
    """IoU = sum(I) / (sum(U) + 1e-10) over images, not the mean of per-image IoUs (semseg)."""
    rng = np.random.default_rng(2)
    k = 5
    m = SegmentationMetrics(k)
    tot = [np.zeros(k, np.int64) for _ in range(3)]
    for n in range(4):
        pred, target = random_case(rng, (8 + n, 9), k)
        m.update(torch.from_numpy(pred), torch.from_numpy(target))
        for acc, a in zip(tot, brute_force_areas(pred, target, k)):
            acc += a
    r = m.compute()
    np.testing.assert_allclose(r["iou"], tot[0] / (tot[1] + 1e-10))
    np.testing.assert_allclose(r["acc"], tot[0] / (tot[2] + 1e-10))
    assert r["miou"] == pytest.approx(np.mean(tot[0] / (tot[1] + 1e-10)))
    assert r["macc"] == pytest.approx(np.mean(tot[0] / (tot[2] + 1e-10)))
    assert r["allacc"] == pytest.approx(tot[0].sum() / (tot[2].sum() + 1e-10))
    assert r["num_images"] == 4
    m.reset()
    assert m.compute()["area_union"] == [0] * k


def test_absent_class_counts_as_zero_iou():
    m = SegmentationMetrics(3)
    m.update(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64))
    r = m.compute()
    assert r["iou"] == [pytest.approx(1.0), 0.0, 0.0]
    assert r["miou"] == pytest.approx(1 / 3)


def test_all_ignored_and_pred_ignore():
    inter, union, tgt = intersection_and_union(np.array([1, 255, 0]), np.array([255, 1, 255]), 2)
    np.testing.assert_array_equal(inter, [0, 0])
    np.testing.assert_array_equal(union, [0, 1])  # pred==ignore on a valid pixel only adds to the target
    np.testing.assert_array_equal(tgt, [0, 1])


@pytest.mark.parametrize("pred,target,match", [
    (np.zeros(3, np.int64), np.zeros(4, np.int64), "shape"),
    (np.array([0, 3]), np.array([0, 1]), "pred contains value 3"),
    (np.array([0, 1]), np.array([0, 7]), "target contains value 7"),
    (np.array([0, -1]), np.array([0, 1]), "pred contains value -1"),
    (np.array([0.0, 1.0]), np.array([0, 1]), "integer dtype"),
    (torch.tensor([0.0]), torch.tensor([0]), "integer dtype"),
])
def test_bad_inputs(pred, target, match):
    with pytest.raises(ValueError, match=match):
        intersection_and_union(pred, target, 3)


def test_table_and_summary():
    m = SegmentationMetrics(2)
    m.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    text = m.table(["road", "sky"])
    assert "| road" in text and "| sky" in text and "mean" in text and "allAcc" in text
    assert m.summary().startswith("mIoU/mAcc/allAcc ")
    with pytest.raises(ValueError, match="class_names"):
        m.table(["only-one"])
    assert "class_1" in m.table()
