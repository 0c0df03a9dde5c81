"""camcore.targets (validation, class indices, target scores) and camcore.tokens_to_grid, against independent
NumPy oracles, on NumPy, array_api_strict and PyTorch arrays."""
from __future__ import annotations

import itertools

import array_api_strict
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from camcore import tokens_to_grid
from camcore.targets import check_targets, class_indices, target_scores

SETTINGS = settings(max_examples=30, deadline=None)

NAMESPACES = {
    "numpy": np.asarray,
    "array_api_strict": lambda a: array_api_strict.asarray(np.asarray(a)),
    "torch": lambda a: torch.asarray(np.asarray(a)),
}


@pytest.fixture(scope="module", params=list(NAMESPACES))
def to_xp(request):
    return NAMESPACES[request.param]


def back(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------- check_targets
@pytest.mark.parametrize("targets,batch", [(None, 3), (lambda out: out[:, 0], 2)])
def test_check_targets_passes_none_and_callables_through(targets, batch):
    assert check_targets(targets, batch) is targets


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("target", [0, 7, np.int64(3), np.int32(2)])
def test_check_targets_int_is_repeated(target, batch):
    out = check_targets(target, batch)
    assert out == [int(target)] * batch
    assert all(type(t) is int for t in out)


@pytest.mark.parametrize("make", [list, tuple, np.asarray, torch.tensor, array_api_strict.asarray],
                         ids=["list", "tuple", "ndarray", "tensor", "strict"])
def test_check_targets_sequence(make):
    out = check_targets(make([4, 0, 2]), 3)
    assert out == [4, 0, 2]
    assert all(type(t) is int for t in out)


@pytest.mark.parametrize("make", [np.asarray, torch.tensor], ids=["ndarray", "tensor"])
def test_check_targets_zero_d_int_array_is_an_int(make):
    assert check_targets(make(3), 2) == [3, 3]


@pytest.mark.parametrize("targets,batch", [([1, 2], 3), ([1, 2, 3, 4], 3), ([], 1), (np.array([1, 2]), 3),
                                           (torch.tensor([0, 1, 2]), 2)])
def test_check_targets_wrong_length(targets, batch):
    got = len(targets)
    with pytest.raises(ValueError, match=rf"^targets: expected .*{batch} for a batch of {batch}; got {got}\b"):
        check_targets(targets, batch)


@pytest.mark.parametrize("targets", [True, False, np.bool_(True)])
def test_check_targets_bool(targets):
    with pytest.raises(TypeError, match=rf"^targets: expected None, an int .*; got the bool {targets!r}"):
        check_targets(targets, 2)


@pytest.mark.parametrize("targets,name", [(1.0, "float"), (2.5, "float"), ("3", "str"), ({1: 2}, "dict"),
                                          ({1, 2}, "set")])
def test_check_targets_wrong_scalar_type(targets, name):
    with pytest.raises(TypeError, match=rf"^targets: expected None, an int class index.*; got {name}$"):
        check_targets(targets, 2)


@pytest.mark.parametrize("targets,bad", [([1, 2.0], r"2\.0 \(float\)"), ([True, 1], r"True \(bool\)"),
                                         ([1, "2"], r"'2' \(str\)"), ([1, None], r"None \(NoneType\)"),
                                         (np.array([1.0, 2.0]), r"\S*1\.0\S* \(float64\)"),
                                         (np.array([True, False]), r"\S*True\S* \(bool\)"),
                                         (torch.tensor([1.0, 2.0]), r"\S*1\.0\S* \(float\w*\)")])
def test_check_targets_non_int_items(targets, bad):
    """The message names targets, the expectation (one int per sample) and the offending item and its type."""
    with pytest.raises(TypeError, match=rf"^targets: expected one int class index per sample, got {bad} among "):
        check_targets(targets, 2)


@pytest.mark.parametrize("targets", [np.array(1.7), np.float64(2.0), np.array(True), torch.tensor(2.9),
                                     torch.tensor(True)],
                         ids=["ndarray-0d-float", "np.float64", "ndarray-0d-bool", "tensor-0d-float",
                              "tensor-0d-bool"])
def test_check_targets_zero_d_non_int_array_is_rejected(targets):
    """A 0-d float or bool array must be rejected like the Python float / bool it holds (check_targets(2.5)
    and check_targets(True) raise TypeError), not silently truncated to a class index."""
    with pytest.raises(TypeError, match=r"^targets: expected"):
        check_targets(targets, 2)


# ------------------------------------------------------------------------------------------- class_indices
def test_class_indices_none_is_argmax(to_xp):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 6))
    out = class_indices(None, to_xp(logits))
    expected = [max(range(6), key=lambda k: logits[i, k]) for i in range(4)]
    assert back(out).dtype == np.int64
    assert back(out).tolist() == expected


def test_class_indices_list(to_xp):
    out = class_indices([5, 0, 3], to_xp(np.zeros((3, 6))))
    assert back(out).dtype == np.int64
    assert back(out).tolist() == [5, 0, 3]


@pytest.mark.parametrize("targets,k,bad", [([0, 6], 6, 6), ([9, 1], 6, 9), ([-1, 0], 6, -1), ([0, -7], 6, -7)])
def test_class_indices_out_of_range(to_xp, targets, k, bad):
    with pytest.raises(ValueError, match=rf"^targets: class index {bad} is out of range for a model with {k} "
                                         rf"outputs \(expected 0 <= index < {k}\); got \[{targets[0]}, {targets[1]}\]"):
        class_indices(targets, to_xp(np.zeros((2, k))))


def test_check_then_class_indices_negative(to_xp):
    """A negative int passes check_targets (it is an int) but is out of range for class_indices."""
    checked = check_targets(-2, 2)
    with pytest.raises(ValueError, match=r"^targets: class index -2 is out of range .*expected 0 <= index < 4"):
        class_indices(checked, to_xp(np.zeros((2, 4))))


@pytest.mark.parametrize("shape", [(2,), (2, 3, 4), (2, 3, 4, 5)])
@pytest.mark.parametrize("targets", [None, [0, 1]])
def test_class_indices_needs_2d_outputs(to_xp, shape, targets):
    with pytest.raises(ValueError, match=rf"^targets: a class index needs model outputs of shape \(B, num_classes\)"
                                         rf", but the model returned shape {__import__('re').escape(str(shape))}"):
        class_indices(targets, to_xp(np.zeros(shape)))


# ------------------------------------------------------------------------------------------- target_scores
@SETTINGS
@given(b=st.integers(1, 4), k=st.integers(1, 7), seed=st.integers(0, 2**32 - 1),
       mode=st.sampled_from(["none", "int", "list"]))
def test_target_scores_oracle(to_xp, b, k, seed, mode):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, k))
    raw = {"none": None, "int": int(rng.integers(0, k)), "list": rng.integers(0, k, size=b).tolist()}[mode]
    if raw is None:
        expected_idx = [int(np.argmax(logits[i])) for i in range(b)]
    elif isinstance(raw, int):
        expected_idx = [raw] * b
    else:
        expected_idx = raw
    scores, idx = target_scores(check_targets(raw, b), to_xp(logits), b)
    assert back(idx).tolist() == expected_idx
    np.testing.assert_array_equal(back(scores), [logits[i, expected_idx[i]] for i in range(b)])


def test_target_scores_callable(to_xp):
    logits = np.arange(12.0).reshape(3, 4)
    scores, idx = target_scores(lambda out: out[:, 1] * 2, to_xp(logits), 3)
    assert idx is None
    np.testing.assert_array_equal(back(scores), [2.0, 10.0, 18.0])


@pytest.mark.parametrize("fn,shape", [(lambda out: out[:, :1], (3, 1)), (lambda out: out, (3, 4)),
                                      (lambda out: out[:2, 0], (2,)), (lambda out: out[0, 0], ())])
def test_target_scores_callable_wrong_shape(to_xp, fn, shape):
    with pytest.raises(ValueError, match=rf"^targets: the callable must return one score per sample, shape \(3,\); "
                                         rf"it returned \w+ of shape {__import__('re').escape(str(shape))}$"):
        target_scores(fn, to_xp(np.zeros((3, 4))), 3)


def test_target_scores_callable_returning_list():
    with pytest.raises(ValueError, match=r"^targets: the callable must return .*shape \(2,\); it returned list "
                                         r"of shape \(\)$"):
        target_scores(lambda out: [1.0, 2.0], np.zeros((2, 3)), 2)


@pytest.mark.parametrize("targets", [None, [0, 1]])
def test_target_scores_non_array_outputs_with_index_targets(targets):
    with pytest.raises(ValueError, match=r"^targets: the model returned tuple, not one array of logits"):
        target_scores(targets, (np.zeros((2, 3)), np.zeros((2, 3))), 2)
    with pytest.raises(ValueError, match=r"^targets: the model returned dict, not one array of logits"):
        target_scores(targets, {"logits": np.zeros((2, 3))}, 2)


@pytest.mark.parametrize("shape", [(2, 3, 4), (2,)])
def test_target_scores_non_2d_outputs_with_index_targets(to_xp, shape):
    with pytest.raises(ValueError, match=r"^targets: a class index needs model outputs of shape \(B, num_classes\)"):
        target_scores([0, 1], to_xp(np.zeros(shape)), 2)


# ------------------------------------------------------------------------------------------- tokens_to_grid
def o_tokens_to_grid(tokens, prefix, grid):
    """Loop oracle: patch token ``prefix + n`` (n the row-major index on ``grid``) -> position on the grid."""
    b, n, d = tokens.shape
    out = np.zeros((b, d, *grid))
    for i in range(b):
        for pos in itertools.product(*[range(g) for g in grid]):
            flat = 0
            for p, g in zip(pos, grid):
                flat = flat * g + p
            for ch in range(d):
                out[(i, ch, *pos)] = tokens[i, prefix + flat, ch]
    return out


@SETTINGS
@given(b=st.integers(1, 3), d=st.integers(1, 5), prefix=st.sampled_from([0, 1, 2]), side=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1))
def test_tokens_to_grid_square_oracle(to_xp, b, d, prefix, side, seed):
    tokens = np.random.default_rng(seed).normal(size=(b, prefix + side * side, d))
    out = back(tokens_to_grid(to_xp(tokens), prefix_tokens=prefix))
    np.testing.assert_array_equal(out, o_tokens_to_grid(tokens, prefix, (side, side)))
    # the NumPy reshape/transpose formulation as a second oracle
    ref = np.moveaxis(tokens[:, prefix:, :].reshape(b, side, side, d), -1, 1)
    np.testing.assert_array_equal(out, ref)


@SETTINGS
@given(b=st.integers(1, 3), d=st.integers(1, 4), prefix=st.sampled_from([0, 1, 2]),
       grid=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 2**32 - 1))
def test_tokens_to_grid_explicit_grid_oracle(to_xp, b, d, prefix, grid, seed):
    n = prefix + int(np.prod(grid))
    tokens = np.random.default_rng(seed).normal(size=(b, n, d))
    out = back(tokens_to_grid(to_xp(tokens), prefix_tokens=prefix, grid=grid))
    assert out.shape == (b, d, *grid)
    np.testing.assert_array_equal(out, o_tokens_to_grid(tokens, prefix, grid))


def test_tokens_to_grid_default_prefix_is_one():
    tokens = np.arange(2 * 5 * 3, dtype=np.float64).reshape(2, 5, 3)
    np.testing.assert_array_equal(tokens_to_grid(tokens), o_tokens_to_grid(tokens, 1, (2, 2)))


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3, 1), (9,)])
def test_tokens_to_grid_needs_3d(to_xp, shape):
    with pytest.raises(ValueError, match=rf"^tokens_to_grid: expected token activations \(B, N, D\), got shape "
                                         rf"{__import__('re').escape(str(shape))}"):
        tokens_to_grid(to_xp(np.zeros(shape)))


@pytest.mark.parametrize("n,prefix,patches", [(11, 1, 10), (10, 2, 8), (9, 1, 8), (1, 1, 0), (3, 5, -2),
                                              (0, 0, 0)])
def test_tokens_to_grid_not_square(to_xp, n, prefix, patches):
    with pytest.raises(ValueError, match=rf"^tokens_to_grid: {n} tokens minus {prefix} prefix token\(s\) leave "
                                         rf"{patches} patches, not a square grid"):
        tokens_to_grid(to_xp(np.zeros((2, n, 3))), prefix_tokens=prefix)


@pytest.mark.parametrize("n,prefix,grid", [(10, 1, (3, 4)), (13, 1, (2, 2, 2)), (5, 0, (2, 2)), (7, 2, (6,))])
def test_tokens_to_grid_grid_mismatch(to_xp, n, prefix, grid):
    held = int(np.prod(grid))
    with pytest.raises(ValueError, match=rf"^tokens_to_grid: grid {__import__('re').escape(str(grid))} holds "
                                         rf"{held} patches, but there are {n - prefix} \({n} tokens minus {prefix}"):
        tokens_to_grid(to_xp(np.zeros((1, n, 2))), prefix_tokens=prefix, grid=grid)


@pytest.mark.parametrize("prefix", [-1, -3])
def test_tokens_to_grid_negative_prefix_tokens(to_xp, prefix):
    """A negative prefix_tokens is invalid input: it should be refused with tokens_to_grid's own ValueError
    (naming prefix_tokens), not the namespace's reshape error (a RuntimeError for PyTorch)."""
    with pytest.raises(ValueError, match=r"^tokens_to_grid: .*prefix"):
        tokens_to_grid(to_xp(np.zeros((1, 3, 2))), prefix_tokens=prefix)
