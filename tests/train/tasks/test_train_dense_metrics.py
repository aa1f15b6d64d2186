"""The streaming task metrics against values computed by hand, and streaming = one shot."""
import math

import pytest
import torch

from gradops.train.tasks.dense import (Attribute, Depth, Normals, Segmentation,
                                       mean_over_attributes)


def test_segmentation_confusion_matrix_by_hand():
    seg = Segmentation("seg", 3)
    # 2 images of 2x2 pixels; -1 ignored
    y = torch.tensor([[[0, 0], [1, -1]], [[2, 2], [1, -1]]])
    p = torch.tensor([[[0, 1], [1, 2]], [[2, 0], [1, 0]]])
    m = seg.metrics_of(p, y)
    # valid pairs (true, pred): (0,0) (0,1) (1,1) (2,2) (2,0) (1,1): 4 of 6 right
    assert float(m["pixel_acc"]) == pytest.approx(4 / 6)
    # class 0: tp 1, fp 1 (2->0), fn 1 (0->1): 1/3; class 1: tp 2, fp 1, fn 0: 2/3;
    # class 2: tp 1, fp 0, fn 1: 1/2
    assert float(m["miou"]) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_segmentation_streams_over_batches_and_skips_absent_classes():
    seg = Segmentation("seg", 4)     # class 3 never occurs: not in the mean
    y = torch.tensor([[[0, 0], [1, -1]], [[2, 2], [1, -1]]])
    p = torch.tensor([[[0, 1], [1, 2]], [[2, 0], [1, 0]]])
    state = seg.metric_state("cpu")
    seg.update(state, p[:1], y[:1])
    seg.update(state, p[1:], y[1:])
    m = seg.finish(state)
    assert float(m["miou"]) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert float(m["pixel_acc"]) == pytest.approx(4 / 6)


def test_segmentation_loss_ignores_minus_one():
    seg = Segmentation("seg", 2)
    out = torch.zeros(1, 2, 1, 2)
    out[0, 0, 0, 0] = 2.0                       # pixel 0: logits (2, 0), label 0
    y = torch.tensor([[[0, -1]]])
    want = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(seg.loss(out, y)) == pytest.approx(want)
    assert float(seg.loss(out, torch.full_like(y, -1))) == 0.0   # nothing valid: empty sum


def test_depth_pools_over_valid_pixels_of_the_split():
    d = Depth("depth")
    y1 = torch.tensor([[[[1.0, 0.0], [2.0, 4.0]]]])   # one invalid pixel
    p1 = torch.tensor([[[[1.5, 9.0], [1.0, 4.0]]]])
    y2 = torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])   # one valid pixel
    p2 = torch.tensor([[[[5.0, 5.0], [5.0, 3.0]]]])
    state = d.metric_state("cpu")
    d.update(state, p1, y1)
    d.update(state, p2, y2)
    m = d.finish(state)
    # valid errors: 0.5, 1.0, 0.0, 1.0 -> abs 2.5 / 4; relative 0.5, 0.5, 0, 0.5 -> 1.5 / 4
    assert float(m["abs_err"]) == pytest.approx(2.5 / 4)
    assert float(m["rel_err"]) == pytest.approx(1.5 / 4)
    # the per-batch average of MTAN's code would give (1.5/3 + 1/1) / 2 = 0.75 instead
    assert float(d.loss(p1, y1)) == pytest.approx(1.5 / 3)


def _normal_map(vectors):
    """[B, 3, 1, W] from a list (batch) of lists of 3-vectors."""
    return torch.tensor(vectors, dtype=torch.float32).permute(0, 2, 1).unsqueeze(2)


def test_normals_angles_by_hand():
    n = Normals("normal")
    deg = math.radians
    # ground truth all +z; predictions at 0, 10, 20, 45, 90 degrees (unnormalised), one invalid
    preds = [[0, 0, 2.0], [math.sin(deg(10)), 0, math.cos(deg(10))],
             [0, 3 * math.sin(deg(20)), 3 * math.cos(deg(20))],
             [1.0, 0, 1.0], [0, -1.0, 0], [1.0, 1.0, 1.0]]
    gts = [[0, 0, 1.0]] * 5 + [[0, 0, 0.0]]
    m = n.metrics_of(_normal_map([preds]), _normal_map([gts]))
    angles = [0, 10, 20, 45, 90]
    assert float(m["mean"]) == pytest.approx(sum(angles) / 5, abs=1e-3)
    assert float(m["median"]) == pytest.approx(20, abs=0.01)
    assert float(m["within_11_25"]) == pytest.approx(2 / 5)
    assert float(m["within_22_5"]) == pytest.approx(3 / 5)
    assert float(m["within_30"]) == pytest.approx(3 / 5)
    # loss: 1 - cos over the 5 valid pixels
    want = sum(1 - math.cos(deg(a)) for a in angles) / 5
    assert float(n.loss(_normal_map([preds]), _normal_map([gts]))) == pytest.approx(want,
                                                                                    abs=1e-6)


def test_normals_median_of_an_even_count_streams():
    n = Normals("normal")
    deg = math.radians
    state = n.metric_state("cpu")
    for a in (5.0, 40.0, 15.0, 60.0):     # one pixel per batch; lower median is 15
        v = [[math.sin(deg(a)), 0, math.cos(deg(a))]]
        n.update(state, _normal_map([v]), _normal_map([[[0, 0, 1.0]]]))
    m = n.finish(state)
    assert float(m["median"]) == pytest.approx(15.0, abs=0.01)
    assert float(m["mean"]) == pytest.approx(30.0, abs=1e-3)


def test_attribute_counts_by_hand_and_means():
    a = Attribute("smiling")
    state = a.metric_state("cpu")
    a.update(state, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0]))
    a.update(state, torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    m = a.finish(state)
    # tp 2, fp 1, fn 1, tn 1
    assert float(m["accuracy"]) == pytest.approx(3 / 5)
    assert float(m["f1"]) == pytest.approx(4 / 6)
    assert float(a.predict(torch.tensor([[0.3], [-0.2]]))[0]) == 1.0
    none = a.metrics_of(torch.zeros(3), torch.zeros(3))
    assert float(none["f1"]) == 0.0 and float(none["accuracy"]) == 1.0
    assert mean_over_attributes({"a": {"accuracy": 0.5, "f1": 0.2},
                                 "b": {"accuracy": 1.0, "f1": 0.4}}) == pytest.approx(
        {"accuracy": 0.75, "f1": 0.3})
    with pytest.raises(ValueError, match="different metrics"):
        mean_over_attributes({"a": {"accuracy": 0.5}, "b": {"f1": 0.4}})


def test_bad_shapes_and_sizes_name_the_task():
    with pytest.raises(ValueError, match="n_out must be 3"):
        Normals("normal", 2)
    with pytest.raises(ValueError, match=r"Depth\('depth'\)"):
        Depth("depth").loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 2, 2))
    assert math.isnan(float(Depth("depth").metrics_of(torch.ones(1, 1, 1, 1),
                                                      torch.zeros(1, 1, 1, 1))["abs_err"]))
