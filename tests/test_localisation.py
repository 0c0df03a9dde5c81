"""camcore.localisation against independent references: hand-made maps with known boxes, a breadth-first search
written here, scipy.ndimage.label (test-only), hand-computed IoUs and pointing-game cases."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from camcore.localisation import __all__ as public
from camcore.localisation import (
    box_iou,
    boxes_from_cam,
    energy_pointing_game,
    localisation_accuracy,
    pointing_game,
)


# ---------------------------------------------------------------------------------------- reference BFS
def bfs_box(cam: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """The CAM paper's box by a plain breadth-first search over 4-neighbours, pixel by pixel."""
    top = cam.max()
    if top <= 0:
        return (0, 0, 0, 0)
    keep = cam >= threshold * top
    h, w = cam.shape
    seen = np.zeros_like(keep)
    best = None  # (size, holds_max, -first_index) compared as a tuple, and the box
    for y in range(h):
        for x in range(w):
            if not keep[y, x] or seen[y, x]:
                continue
            queue, pixels = deque([(y, x)]), []
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                pixels.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and keep[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            ys, xs = zip(*pixels)
            key = (len(pixels), any(cam[p] == top for p in pixels), -(y * w + x))
            box = (min(xs), min(ys), max(xs) + 1, max(ys) + 1)
            if best is None or key > best[0]:
                best = (key, box)
    return best[1]


def blob_map(h, w, *rects):
    """A map with rectangles ``(x0, y0, x1, y1, value)`` (end-exclusive) on zero."""
    m = np.zeros((h, w))
    for x0, y0, x1, y1, v in rects:
        m[y0:y1, x0:x1] = v
    return m


# ------------------------------------------------------------------------------------------ boxes_from_cam
def test_public_names():
    assert sorted(public) == sorted(["boxes_from_cam", "box_iou", "localisation_accuracy", "pointing_game",
                                     "energy_pointing_game"])


def test_one_rectangle_gives_its_box():
    m = blob_map(20, 30, (4, 3, 17, 11, 1.0))
    b = boxes_from_cam(m[None])
    assert b.dtype == np.int64 and b.shape == (1, 4)
    assert b.tolist() == [[4, 3, 17, 11]]


def test_single_pixel_and_full_map():
    assert boxes_from_cam(blob_map(5, 6, (2, 3, 3, 4, 1.0))[None]).tolist() == [[2, 3, 3, 4]]
    assert boxes_from_cam(np.ones((2, 5, 6))).tolist() == [[0, 0, 6, 5]] * 2


def test_larger_of_two_blobs_wins_even_when_dimmer():
    # the small blob holds the maximum; the large one (dimmer but above 20% of it) is the largest component
    m = blob_map(32, 32, (1, 1, 4, 4, 1.0), (10, 12, 30, 25, 0.5))
    assert boxes_from_cam(m[None]).tolist() == [[10, 12, 30, 25]]
    # below the threshold the large blob disappears and the small one remains
    assert boxes_from_cam(m[None], threshold=0.6).tolist() == [[1, 1, 4, 4]]


def test_blob_touching_the_borders():
    m = blob_map(16, 20, (12, 9, 20, 16, 2.0), (0, 0, 3, 2, 2.0))  # bottom-right corner; a small top-left one
    assert boxes_from_cam(m[None]).tolist() == [[12, 9, 20, 16]]
    m = blob_map(16, 20, (0, 0, 20, 3, 1.0))  # the whole top band
    assert boxes_from_cam(m[None]).tolist() == [[0, 0, 20, 3]]


def test_threshold_on_a_plateau_and_a_ramp():
    # row profile: a ramp 0.0, 0.1, ..., 0.9 over columns 0..9, then a plateau at 1.0 over columns 10..14
    row = np.r_[np.arange(10) / 10, np.ones(5)]
    m = np.tile(row, (6, 1))
    m[:, 15:] = 0  # (no extra columns; explicit for clarity)
    # keep >= 0.2 * 1.0: columns 2..14 (0.2 itself is kept: 2/10 == 0.2 * 1.0 exactly)
    assert boxes_from_cam(m[None], threshold=0.2).tolist() == [[2, 0, 15, 6]]
    assert boxes_from_cam(m[None], threshold=0.55).tolist() == [[6, 0, 15, 6]]
    assert boxes_from_cam(m[None], threshold=1.0).tolist() == [[10, 0, 15, 6]]
    assert boxes_from_cam(m[None], threshold=0.0).tolist() == [[0, 0, 15, 6]]
    # the threshold is relative to each map's own maximum: scaling a map changes nothing
    assert boxes_from_cam(np.stack([m, 7 * m]), 0.55).tolist() == [[6, 0, 15, 6]] * 2


def test_diagonal_contact_is_not_connected():
    # a 3-pixel diagonal chain (3 components of 1 pixel under 4-connectivity) and an L of 2 pixels elsewhere
    m = np.zeros((8, 8))
    m[0, 0] = m[1, 1] = m[2, 2] = 1.0
    m[5, 5] = m[5, 6] = 1.0
    assert boxes_from_cam(m[None]).tolist() == [[5, 5, 7, 6]]
    # a checkerboard: every pixel alone; ties go to the maximal pixel, then to the first in raster order
    board = (np.indices((6, 6)).sum(0) % 2 == 0).astype(float)
    assert boxes_from_cam(board[None]).tolist() == [[0, 0, 1, 1]]
    board[3, 1] = 2.0  # (3 + 1) % 2 == 0: a kept pixel, now the unique maximum
    assert boxes_from_cam(board[None]).tolist() == [[1, 3, 2, 4]]


def test_ties_between_equal_components():
    # two 2x2 blobs of equal size: the one with the maximum wins; with equal maxima, the first in raster order
    m = blob_map(10, 10, (6, 1, 8, 3, 1.0), (1, 6, 3, 8, 1.0))
    assert boxes_from_cam(m[None]).tolist() == [[6, 1, 8, 3]]
    m[7, 2] = 1.5
    assert boxes_from_cam(m[None]).tolist() == [[1, 6, 3, 8]]


def test_u_shape_and_spiral_are_one_component():
    # the two arms of a U only meet at the bottom: labels must propagate around it
    m = blob_map(12, 12, (1, 1, 3, 10, 1.0), (8, 1, 10, 10, 1.0), (1, 9, 10, 11, 1.0), (5, 0, 6, 4, 0.9))
    assert boxes_from_cam(m[None]).tolist() == [[1, 1, 10, 11]]
    # a serpentine over the whole map: one component of about half the pixels
    s = np.zeros((15, 15))
    s[::2] = 1
    for i in range(1, 15, 2):
        s[i, -1 if (i // 2) % 2 == 0 else 0] = 1
    s[14, 7] = 0  # cut the last row: its right part is separate but small
    assert boxes_from_cam(s[None]).tolist() == [list(bfs_box(s, 0.2))] == [[0, 0, 15, 15]]


def test_non_positive_maps_give_the_empty_box():
    maps = np.stack([np.zeros((5, 7)), -np.ones((5, 7)), blob_map(5, 7, (1, 1, 2, 2, 1.0))])
    assert boxes_from_cam(maps).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2]]
    assert boxes_from_cam(np.zeros((0, 4, 4))).shape == (0, 4)


def test_maps_of_a_batch_are_independent():
    # map 0's blob ends on its last row and map 1's starts on its first row, same columns: not one component
    a = blob_map(6, 6, (0, 3, 6, 6, 1.0))
    b = blob_map(6, 6, (0, 0, 6, 2, 1.0), (0, 4, 2, 5, 1.0))
    assert boxes_from_cam(np.stack([a, b])).tolist() == [[0, 3, 6, 6], [0, 0, 6, 2]]


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.int8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                  elements=st.integers(-1, 3)),
       st.sampled_from([0.0, 0.2, 0.34, 0.5, 0.67, 1.0]))
def test_boxes_match_a_reference_bfs(cam, threshold):
    cam = cam.astype(np.float64)
    assert tuple(boxes_from_cam(cam[None], threshold)[0].tolist()) == bfs_box(cam, threshold)


def test_boxes_match_scipy_label():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    maps = np.concatenate([ndimage.gaussian_filter(rng.normal(size=(6, 64, 80)), (0, s, s)) for s in (1, 3, 6)])
    blocky = rng.random((4, 32, 40)).repeat(2, axis=1).repeat(2, axis=2)  # plateaus of 2x2 pixels: many ties
    maps = np.concatenate([maps, blocky, rng.random((4, 64, 80))])
    for threshold in (0.2, 0.5, 0.8):
        expected = []
        for m in maps:
            labels, n = ndimage.label(m >= threshold * m.max())  # default structure: 4-connectivity in 2-D
            sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            peaked = np.isin(np.arange(1, n + 1), labels[m == m.max()])
            # largest, then holding the maximum, then the lowest label (scipy numbers in raster order)
            k = 1 + np.lexsort((np.arange(n), ~peaked, -sizes))[0]
            ys, xs = np.nonzero(labels == k)
            expected.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert boxes_from_cam(maps, threshold).tolist() == expected


# --------------------------------------------------------------------------------------------------- box_iou
def test_box_iou_hand_computed():
    a = np.array([[0, 0, 10, 10],   # identical
                  [0, 0, 10, 10],   # disjoint
                  [0, 0, 10, 10],   # touching edge: no overlap
                  [0, 0, 10, 10],   # nested 5x5 inside: 25 / 100
                  [0, 0, 4, 4],     # overlap 2x2: 4 / (16 + 16 - 4)
                  [0, 0, 4, 2],     # overlap 2x1 with 4x2 shifted: 2 / (8 + 8 - 2)
                  [3, 3, 3, 8],     # empty (zero width) vs a box containing it
                  [2, 2, 2, 2]])    # empty vs itself
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [10, 0, 20, 10], [2, 3, 7, 8], [2, 2, 6, 6], [2, 1, 6, 3],
                  [0, 0, 10, 10], [2, 2, 2, 2]])
    expected = [1.0, 0.0, 0.0, 0.25, 4 / 28, 2 / 14, 0.0, 0.0]
    out = box_iou(a, b)
    assert out.dtype == np.float64 and out.shape == (8,)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(box_iou(b, a), expected, rtol=0, atol=1e-15)  # symmetric
    assert not np.isnan(out).any()


def test_box_iou_broadcasts_a_single_box():
    out = box_iou([0, 0, 2, 2], [[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 4, 4]])
    np.testing.assert_allclose(out, [1.0, 1 / 7, 0.25])
    assert box_iou([0, 0, 2, 2], [1, 0, 3, 2]).shape == ()
    assert float(box_iou([0, 0, 2, 2], [1, 0, 3, 2])) == pytest.approx(2 / 6)
    np.testing.assert_allclose(box_iou([[0.5, 0.5, 1.5, 1.5]], [0, 0, 1, 1]), [0.25 / 1.75])  # float boxes


# ------------------------------------------------------------------------------------- localisation_accuracy
def test_localisation_accuracy():
    m1 = blob_map(20, 20, (2, 2, 12, 12, 1.0))           # predicted box = gt: IoU 1
    m2 = blob_map(20, 20, (2, 2, 12, 12, 1.0))           # vs gt (2, 2, 12, 7): IoU 50/100 = 0.5, counts
    m3 = blob_map(20, 20, (2, 2, 12, 12, 1.0))           # vs gt (2, 2, 12, 6): IoU 40/100 < 0.5
    m4 = np.zeros((20, 20))                              # empty predicted box: IoU 0
    gt = [[2, 2, 12, 12], [2, 2, 12, 7], [2, 2, 12, 6], [0, 0, 20, 20]]
    out = localisation_accuracy(np.stack([m1, m2, m3, m4]), gt)
    assert out.dtype == np.bool_ and out.tolist() == [True, True, False, False]
    assert localisation_accuracy(np.stack([m1, m2, m3, m4]), gt, iou=0.4).tolist() == [True, True, True, False]


# -------------------------------------------------------------------------------------------- pointing games
def test_pointing_game_inside_near_and_far():
    h, w = 60, 60
    box = [20, 20, 30, 30]  # pixels 20..29
    maps, boxes = [], []
    for y, x in [(25, 25),          # inside
                 (29, 29),          # last pixel inside (end-exclusive box)
                 (25, 44),          # 15 px right of column 29: distance 15, within
                 (25, 45),          # 16 px: beyond
                 (40, 40),          # diagonal: sqrt(11^2 + 11^2) = 15.56 > 15
                 (39, 38)]:         # sqrt(10^2 + 9^2) = 13.45 <= 15
        m = np.full((h, w), 0.1)
        m[y, x] = 1.0
        maps.append(m)
        boxes.append(box)
    out = pointing_game(np.stack(maps), boxes)
    assert out.dtype == np.bool_ and out.tolist() == [True, True, True, False, False, True]
    assert pointing_game(np.stack(maps), boxes, tolerance=0).tolist() == [True, True, False, False, False, False]
    assert pointing_game(np.stack(maps), boxes, tolerance=16).tolist() == [True, True, True, True, True, True]


def test_pointing_game_ties_and_empty_box():
    m = np.zeros((40, 40))
    m[2, 2] = m[22, 22] = 1.0  # two maximal pixels: one far away, one inside the box
    assert pointing_game(m[None], [[20, 20, 25, 25]]).tolist() == [True]
    assert pointing_game(m[None], [[35, 0, 40, 5]], tolerance=3).tolist() == [False]
    assert pointing_game(np.zeros((1, 10, 10)), [[3, 3, 5, 5]]).tolist() == [False]  # constant: points nowhere
    assert pointing_game(m[None], [[22, 22, 22, 23]]).tolist() == [False]  # empty box: never hit


def test_energy_pointing_game_hand_made():
    m = np.array([[0, 1, 2, 0],
                  [3, 4, 0, 0],
                  [0, 0, 0, 10]], dtype=float)  # total 20
    out = energy_pointing_game(np.stack([m, m, m, np.zeros_like(m)]),
                               [[0, 0, 2, 2], [1, 0, 3, 1], [0, 0, 0, 3], [0, 0, 4, 3]])
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [8 / 20, 3 / 20, 0.0, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(energy_pointing_game(m[None], [[0, 0, 4, 3]]), [1.0])


# --------------------------------------------------------------------------------------------------- torch
def test_torch_tensors_give_the_same_results():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    maps = np.abs(rng.normal(size=(3, 16, 18))).astype(np.float32)
    maps[1] = 0
    boxes = np.array([[0, 0, 8, 8], [2, 3, 10, 12], [5, 5, 18, 16]])
    t = torch.tensor(maps, requires_grad=True) * 1  # a non-leaf tensor in a graph: must be detached
    tb = torch.tensor(boxes)
    assert boxes_from_cam(t).tolist() == boxes_from_cam(maps).tolist()
    assert localisation_accuracy(t, tb).tolist() == localisation_accuracy(maps, boxes).tolist()
    assert pointing_game(t, tb).tolist() == pointing_game(maps, boxes).tolist()
    np.testing.assert_array_equal(energy_pointing_game(t, tb), energy_pointing_game(maps, boxes))
    np.testing.assert_array_equal(box_iou(tb.float(), tb.flip(0)), box_iou(boxes, boxes[::-1]))
    bf = torch.tensor([[[0, 1, 0], [1, 2, 1], [0, 0, 0]]], dtype=torch.bfloat16)  # NumPy has no bfloat16
    assert boxes_from_cam(bf, 0.5).tolist() == [[0, 0, 3, 2]]
    assert isinstance(boxes_from_cam(t), np.ndarray)


# -------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, error, match", [
    (lambda: boxes_from_cam(np.zeros((4, 4))), ValueError,
     r"cams: expected maps \(B, H, W\).*got shape \(4, 4\).*cams\[None\]"),
    (lambda: boxes_from_cam(np.zeros((1, 0, 4))), ValueError, r"cams: expected maps \(B, H, W\) with H, W >= 1"),
    (lambda: boxes_from_cam(np.full((1, 3, 3), np.nan)), ValueError, r"cams: expected finite maps"),
    (lambda: boxes_from_cam(np.zeros((1, 3, 3)), threshold=1.5), ValueError,
     r"threshold: expected a number in \[0, 1\], got 1.5"),
    (lambda: boxes_from_cam(np.zeros((1, 3, 3)), threshold=-0.1), ValueError, r"threshold"),
    (lambda: boxes_from_cam(np.zeros((1, 3, 3)), threshold="0.2"), TypeError, r"threshold: expected a real number"),
    (lambda: boxes_from_cam(np.zeros((1, 3, 3), complex)), TypeError, r"cams: expected real numbers"),
    (lambda: boxes_from_cam(object()), TypeError, r"cams: expected real numbers"),
    (lambda: localisation_accuracy(np.zeros((3, 8, 8)), np.zeros((2, 4))), ValueError,
     r"boxes: expected \(B, 4\) boxes \(x0, y0, x1, y1\) with x0 <= x1 and y0 <= y1 for 3 maps, got shape \(2, 4\)"),
    (lambda: pointing_game(np.zeros((1, 8, 8)), [[4, 0, 2, 8]]), ValueError,
     r"boxes: .*0 <= x0 <= x1 <= 8.*box 0 is \(4, 0, 2, 8\)"),
    (lambda: pointing_game(np.zeros((1, 8, 8)), [[0, 0, 9, 8]]), ValueError, r"boxes: .*x1 <= 8 \(the width\)"),
    (lambda: energy_pointing_game(np.zeros((1, 8, 8)), [[0, 0, 2.5, 8]]), ValueError, r"boxes: expected integer pixel"),
    (lambda: localisation_accuracy(np.zeros((1, 8, 8)), [[0, 0, 2, 2]], iou=0), ValueError,
     r"iou: expected a number in \(0, 1\]"),
    (lambda: pointing_game(np.zeros((1, 8, 8)), [[0, 0, 2, 2]], tolerance=-1), ValueError,
     r"tolerance: expected a number in \[0, inf\)"),
    (lambda: pointing_game(np.zeros((1, 8, 8)), [[0, 0, 2, 2]], tolerance=float("inf")), ValueError,
     r"tolerance: expected a finite"),
    (lambda: energy_pointing_game(-np.ones((1, 4, 4)), [[0, 0, 2, 2]]), ValueError,
     r"cams: expected non-negative maps"),
    (lambda: box_iou(np.zeros((2, 3)), np.zeros((2, 4))), ValueError,
     r"a: expected \(N, 4\) boxes.*got shape \(2, 3\)"),
    (lambda: box_iou(np.zeros((2, 4)), [[2, 0, 1, 1]]), ValueError,
     r"b: expected boxes .* x0 <= x1 .* box 0 is \(2.0, 0.0, 1.0, 1.0\)"),
    (lambda: box_iou(np.zeros((2, 4)), np.zeros((3, 4))), ValueError,
     r"a, b: expected \(N, 4\) and \(N, 4\).*\(2, 4\) and \(3, 4\)"),
    (lambda: box_iou([0, 0, np.inf, 1], [0, 0, 1, 1]), ValueError, r"a: expected finite"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
