"""The adapter contract (docs/adapters.md), checked the same way on every backend kind: PyTorch, Keras 3
(TensorFlow), Flax linen ``(module, variables)``, Flax nnx and a ``(features, head)`` pair of JAX functions.

Every kind holds the same small CNN with the same weights (``contract_models``); every expected value comes from
the float64 NumPy oracle of that network (hand-written forward pass and chain rule), never from camcore. Only the
public adapter API is used. After every test (also one whose calls raised) the model must be exactly as it was.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import contract_models as cm
from contract_models import B, C2, H, K, W, Linear, to_numpy

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("flax")

import camcore  # noqa: E402
from camcore.backends import adapter_for  # noqa: E402

P = cm.weights()
ORACLE = cm.Oracle(P)
X = cm.inputs()  # (B, 3, H, W) float32, channels-first
M = 4
RNG = np.random.default_rng(7)
INPUT_MASKS = RNG.uniform(size=(M, 1, H, W)).astype(np.float32)
SAMPLE_MASKS = RNG.uniform(size=(B, M, 1, H, W)).astype(np.float32)
CHANNEL_MASKS = (RNG.uniform(size=(M, C2, 1, 1)) > 0.4).astype(np.float32)
SAMPLE_CHANNEL_MASKS = RNG.uniform(size=(B, M, C2, 1, 1)).astype(np.float32)
TARGETS = {"list": [2, 0, 1], "int": 1, "none": None, "callable": Linear((-0.5, 0.0, 1.0))}

_BUILT: dict = {}
_ADAPTERS: dict = {}


def built(name):
    if name not in _BUILT:
        _BUILT[name] = cm.build(name, P)
    return _BUILT[name]


def adapter(kind):
    """One adapter per kind for the whole session (its compiled graphs are reused); fresh ones where it matters."""
    if kind.name not in _ADAPTERS:
        _ADAPTERS[kind.name] = adapter_for(kind.model, model_mode="eval", data_format=None)
    return _ADAPTERS[kind.name]


@pytest.fixture(params=cm.KINDS)
def kind(request):
    return built(request.param)


@pytest.fixture(autouse=True)
def model_untouched(request):
    """The model is unchanged by whatever the test called (weights, flags, hooks, patched calls, submodules)."""
    if "kind" not in request.fixturenames:
        yield
        return
    k = request.getfixturevalue("kind")
    snap = k.snapshot()
    yield
    k.assert_untouched(snap)


def close(actual, expected, rtol=1e-4):
    """Within ``rtol`` of the expected values, relative to their largest magnitude (float32 against float64)."""
    expected = np.asarray(expected, np.float64)
    actual = to_numpy(actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def native_masks(kind, masks):
    """Masks are channels-first for every kind; given as the framework's own array type."""
    if kind.name == "torch":
        import torch

        return torch.from_numpy(masks)
    if kind.name == "keras":
        return masks
    import jax.numpy as jnp

    return jnp.asarray(masks)


def cast(kind, x, dtype):
    if kind.name == "torch":
        import torch

        return x.to({"int": torch.int64, "uint8": torch.uint8}[dtype])
    import numpy

    arr = np.asarray(x).astype({"int": numpy.int32, "uint8": numpy.uint8}[dtype])
    if kind.name == "keras":
        return arr
    import jax.numpy as jnp

    return jnp.asarray(arr)


# ------------------------------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("targets", list(TARGETS))
def test_oracle_gradient_matches_finite_differences(targets):
    t = TARGETS[targets]
    out, a, g = ORACLE.act_grad(X, t)
    coef = ORACLE.coef(out, t)  # the classes stay fixed while A moves
    score = lambda a_: float((ORACLE.head(a_) * coef).sum())  # noqa: E731
    rng = np.random.default_rng(3)
    eps = 1e-6
    idx = [tuple(int(rng.integers(s)) for s in a.shape) for _ in range(60)]
    idx = [i for i in idx if abs(a[i]) > 1e-3][:30]  # away from relu's kink
    assert len(idx) >= 20
    for i in idx:
        up, down = a.copy(), a.copy()
        up[i] += eps
        down[i] -= eps
        fd = (score(up) - score(down)) / (2 * eps)
        assert fd == pytest.approx(g[i], rel=1e-6, abs=1e-9), i
    assert np.abs(g).max() > 0 and (g == 0).any()  # relu cuts part of A: a non-trivial gradient


def test_oracle_network_is_not_degenerate():
    out = ORACLE.logits(X)
    assert len(set(out.argmax(1).tolist())) >= 1 and np.ptp(out) > 0.1
    a = ORACLE.features(X)
    assert 0.2 < (a > 0).mean() < 0.8


# ------------------------------------------------------------------------------------- activations_and_grads
@pytest.mark.parametrize("targets", list(TARGETS))
def test_activations_and_grads_match_oracle(kind, targets):
    t = TARGETS[targets]
    out, a, g = ORACLE.act_grad(X, t)
    outputs, acts, grads = adapter(kind).activations_and_grads(kind.x(), [kind.layer], t)
    assert len(acts) == 1 and len(grads) == 1
    close(outputs, out)
    close(acts[0], a)  # channels-first (B, C, H, W) for every kind
    close(grads[0], g)


def test_activations_and_grads_gradients_false(kind):
    _, a, _ = ORACLE.act_grad(X, None)
    outputs, acts, grads = adapter(kind).activations_and_grads(kind.x(), [kind.layer], [0, 1, 2], gradients=False)
    assert grads == [None]
    close(acts[0], a)
    close(outputs, ORACLE.logits(X))


def test_activations_and_grads_per_sample_rows(kind):
    """Row b of the gradient is dy_b/dA_b: the batch gives each sample's own result."""
    ad = adapter(kind)
    _, _, grads = ad.activations_and_grads(kind.x(), [kind.layer], [2, 0, 1])
    for b, t in enumerate([2, 0, 1]):
        _, _, alone = ad.activations_and_grads(kind.x(X[b : b + 1]), [kind.layer], t)
        close(to_numpy(grads[0])[b : b + 1], to_numpy(alone[0]), rtol=1e-5)


# ------------------------------------------------------------------------------------------- forward_masked
MASK_CASES = [("shared", t) for t in TARGETS] + [("per-sample", "list"), ("per-sample", "none")]


@pytest.mark.parametrize("masks,targets", MASK_CASES)
def test_forward_masked_input_matches_oracle(kind, masks, targets):
    t = TARGETS[targets]
    mk = INPUT_MASKS if masks == "shared" else SAMPLE_MASKS
    info = {}
    got = adapter(kind).forward_masked(kind.x(), native_masks(kind, mk), at="input", targets=t, batch_size=3,
                                       info=info)
    assert tuple(got.shape) == (B, M)
    close(got, ORACLE.masked_input(X, mk, t))
    assert info.get("path") in ("full", "tail", "compiled")


@pytest.mark.parametrize("masks,targets", MASK_CASES)
def test_forward_masked_layer_matches_oracle(kind, masks, targets):
    t = TARGETS[targets]
    mk = CHANNEL_MASKS if masks == "shared" else SAMPLE_CHANNEL_MASKS
    info = {}
    got = adapter(kind).forward_masked(kind.x(), native_masks(kind, mk), at=kind.layer, targets=t, batch_size=3,
                                       info=info)
    assert tuple(got.shape) == (B, M)
    close(got, ORACLE.masked_layer(X, mk, t))
    assert info.get("path") in ("full", "tail", "compiled")


def test_forward_masked_all_ones_is_the_plain_forward(kind):
    ad = adapter(kind)
    out = ORACLE.logits(X)
    for at, shape in [("input", (1, 1, H, W)), (kind.layer, (1, C2, 1, 1))]:
        got = ad.forward_masked(kind.x(), native_masks(kind, np.ones(shape, np.float32)), at=at, targets=[2, 0, 1])
        close(to_numpy(got)[:, 0], out[np.arange(B), [2, 0, 1]])


@pytest.mark.parametrize("at", ["input", "layer"])
def test_forward_masked_independent_of_batch_size(kind, at):
    layer = "input" if at == "input" else kind.layer
    mk = INPUT_MASKS if at == "input" else CHANNEL_MASKS
    expected = (ORACLE.masked_input if at == "input" else ORACLE.masked_layer)(X, mk, None)
    results = []
    for bs in (1, 3, 64):
        got = adapter(kind).forward_masked(kind.x(), native_masks(kind, mk), at=layer, targets=None, batch_size=bs)
        close(got, expected)
        results.append(to_numpy(got))
    close(results[0], results[2], rtol=1e-6)
    close(results[1], results[2], rtol=1e-6)


@pytest.mark.parametrize("at", ["input", "layer"])
def test_forward_masked_probability_is_softmax_of_logits(kind, at):
    layer = "input" if at == "input" else kind.layer
    mk = INPUT_MASKS if at == "input" else CHANNEL_MASKS
    oracle = ORACLE.masked_input if at == "input" else ORACLE.masked_layer
    ad = adapter(kind)
    for t in ([2, 0, 1], None, 1):
        got = ad.forward_masked(kind.x(), native_masks(kind, mk), at=layer, targets=t, probability=True)
        probs = oracle(X, mk, t, probability=True)
        assert np.all((probs > 0) & (probs < 1))
        close(got, probs)
        assert str(getattr(got, "dtype", "")).endswith("float32")
    # a callable target's scores are used as they are
    t = TARGETS["callable"]
    close(ad.forward_masked(kind.x(), native_masks(kind, mk), at=layer, targets=t, probability=True),
          oracle(X, mk, t))


# ------------------------------------------------------------------------------------------ layers, inputs
def test_layer_names_resolve_default_spatial(kind):
    ad = adapter_for(kind.model, model_mode="eval", data_format=None)
    resolved = ad.resolve_layer(kind.layer)
    assert isinstance(resolved, tuple) and resolved[0] == kind.layer
    assert ad.default_layer(kind.x()) == kind.default
    names = ad.layer_names()
    assert kind.layer in names and set(kind.names) <= set(names)
    assert tuple(ad.spatial_shape(kind.x())) == (H, W)
    assert tuple(ad.spatial_shape(kind.x(X[:1]))) == (H, W)


def _bad_layer(kind):
    return ("feature", "'features'") if kind.name == "pair" else ("conv_2", "'conv2'")


def test_unknown_layer_lists_closest_names(kind):
    bad, closest = _bad_layer(kind)
    ad = adapter_for(kind.model, model_mode="eval", data_format=None)
    ad.default_layer(kind.x())  # a Flax linen adapter learns parameter-free submodules from its first trace
    with pytest.raises(ValueError, match="layer") as err:
        ad.resolve_layer(bad)
    assert closest in str(err.value) and repr(bad) in str(err.value)


@pytest.mark.parametrize("call", ["activations_and_grads", "forward_masked", "explain"])
def test_unknown_layer_in_contract_calls(kind, call):
    bad, closest = _bad_layer(kind)
    ad = adapter_for(kind.model, model_mode="eval", data_format=None)  # fresh: no trace before the call
    with pytest.raises(ValueError, match="layer") as err:
        if call == "activations_and_grads":
            ad.activations_and_grads(kind.x(), [bad], [0, 1, 2])
        elif call == "forward_masked":
            ad.forward_masked(kind.x(), native_masks(kind, CHANNEL_MASKS), at=bad, targets=1)
        else:
            camcore.explain(kind.model, kind.x(), method="gradcam", layer=bad)
    assert closest in str(err.value)


def test_check_inputs(kind):
    ad = adapter(kind)
    x = kind.x()
    ad.check_inputs(x)  # fine
    with pytest.raises(TypeError, match=r"inputs: expected a floating-point .*got dtype"):
        ad.check_inputs(cast(kind, x, "int"))
    with pytest.raises(ValueError, match=r"inputs: expected a non-empty batch .*got shape \(0, "):
        ad.check_inputs(x[:0])
    foreign = np.asarray(X) if kind.name == "torch" else np.asarray(x).tolist()  # not the framework's array type
    with pytest.raises(TypeError, match=r"inputs: expected a .*got (ndarray|list)"):
        ad.check_inputs(foreign)


def test_bad_inputs_through_the_contract_calls(kind):
    ad = adapter(kind)
    x = kind.x()
    masks = native_masks(kind, INPUT_MASKS)
    with pytest.raises(TypeError, match=r"inputs: expected a floating-point .*got dtype"):
        camcore.explain(kind.model, cast(kind, x, "int"), method="gradcam", layer=kind.layer)
    with pytest.raises(TypeError, match=r"inputs: expected a floating-point .*got dtype"):
        ad.forward_masked(cast(kind, x, "uint8"), masks)
    for layer in (kind.layer, None):  # with the default layer, the inputs are checked first
        with pytest.raises(ValueError, match=r"inputs: expected a non-empty batch .*got shape \(0, "):
            camcore.explain(kind.model, x[:0], method="gradcam", layer=layer)
    foreign = np.asarray(X) if kind.name == "torch" else np.asarray(x).tolist()
    with pytest.raises(TypeError, match=r"inputs: expected a .*got (ndarray|list)"):
        camcore.explain(kind.model, foreign, method="gradcam", layer=kind.layer)


BAD_MASKS = {  # (at, channels-first mask shape): wrong rank, wrong batch, not broadcasting
    "input-no-channel-axis": ("input", (M, H, W)),
    "input-wrong-batch": ("input", (B + 1, 2, 1, H, W)),
    "input-smaller-spatial": ("input", (M, 1, H // 2, W // 2)),
    "input-two-channels": ("input", (M, 2, H, W)),
    "layer-no-spatial-axis": ("layer", (M, C2, 1)),
    "layer-wrong-batch": ("layer", (B + 1, 2, C2, 1, 1)),
    "layer-wrong-channels": ("layer", (M, 3, 1, 1)),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_forward_masked_bad_mask_shape(kind, case):
    at, shape = BAD_MASKS[case]
    with pytest.raises(ValueError, match="masks: "):
        adapter(kind).forward_masked(kind.x(), native_masks(kind, np.ones(shape, np.float32)),
                                     at="input" if at == "input" else kind.layer, targets=1)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_forward_masked_bad_batch_size(kind, batch_size):
    with pytest.raises(ValueError, match=r"batch_size: expected a positive int, got"):
        adapter(kind).forward_masked(kind.x(), native_masks(kind, INPUT_MASKS), targets=1, batch_size=batch_size)


def test_linear_classifier(kind):
    ad = adapter_for(kind.model, model_mode="eval", data_format=None)
    if kind.fc is None:
        with pytest.raises(ValueError, match="cam_weights"):
            ad.linear_classifier()
        return
    name, w, b = ad.linear_classifier()
    assert name == kind.fc
    close(w, P["wf"], rtol=0)  # (K, C): the dense layer's weights, whatever the framework's layout
    close(b, P["bf"], rtol=0)
    assert tuple(to_numpy(w).shape) == (K, C2)


# ------------------------------------------------------------------------------ the model is left alone
class TargetError(KeyError):
    pass


def _raising(out):
    raise TargetError("no such head")


def test_raising_target_leaves_model_untouched(kind):
    """A callable target that raises: the error comes out; the autouse check then finds the model unchanged."""
    ad = adapter(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an eager fallback may be announced first
        with pytest.raises(TargetError):
            ad.activations_and_grads(kind.x(), [kind.layer], _raising)
        with pytest.raises(TargetError):
            ad.forward_masked(kind.x(), native_masks(kind, INPUT_MASKS), targets=_raising)
        with pytest.raises(TargetError):
            ad.forward_masked(kind.x(), native_masks(kind, CHANNEL_MASKS), at=kind.layer, targets=_raising)
        with pytest.raises(TargetError):
            camcore.explain(kind.model, kind.x(), method="gradcam", layer=kind.layer, targets=_raising)
    # and the adapter still works afterwards
    _, acts, grads = ad.activations_and_grads(kind.x(), [kind.layer], [2, 0, 1])
    close(grads[0], ORACLE.act_grad(X, [2, 0, 1])[2])


def test_every_contract_call_leaves_model_untouched(kind):
    """One of each contract call on one adapter (the autouse check compares the model before and after)."""
    ad = adapter(kind)
    x = kind.x()
    ad.activations_and_grads(x, [kind.layer], None)
    ad.activations_and_grads(x, [kind.layer], 1, gradients=False)
    ad.forward_masked(x, native_masks(kind, INPUT_MASKS), targets=None, batch_size=2)
    ad.forward_masked(x, native_masks(kind, CHANNEL_MASKS), at=kind.layer, targets=[0, 1, 2], batch_size=2)
    ad.default_layer(x)
    ad.layer_names()
    ad.linear_classifier() if kind.fc else None
    camcore.explain(kind.model, x, method="eigencam", layer=kind.layer)
    if kind.name == "torch":  # no hook left on any module (also checked by model_checks.assert_untouched)
        assert all(not m._forward_hooks for m in kind.model.modules())


# ------------------------------------------------------------------------------------- explain end to end
_MAPS: dict = {}

METHOD_OPTIONS = {"gradcam": {}, "scorecam": {"progress": False}, "ablationcam": {"progress": False}}


def maps_of(kind, method, targets):
    key = (kind.name, method, str(targets))
    if key not in _MAPS:
        _MAPS[key] = to_numpy(camcore.explain(kind.model, kind.x(), method=method, layer=kind.layer,
                                              targets=targets, **METHOD_OPTIONS[method]))
    return _MAPS[key]


@pytest.mark.parametrize("targets", ["list", "none"])
def test_gradcam_matches_oracle(kind, targets):
    t = TARGETS[targets]
    cams = maps_of(kind, "gradcam", t)
    assert cams.shape == (B, H, W)
    close(cams, ORACLE.gradcam(X, t))


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_explain_agrees_across_kinds(kind, method):
    ref = maps_of(built("torch"), method, [2, 0, 1])
    got = maps_of(kind, method, [2, 0, 1])
    assert got.shape == (B, H, W) and np.isfinite(got).all()
    assert got.max() == pytest.approx(1.0) and got.min() >= 0  # a real (non-constant) normalised map
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_explainer_second_call_equals_first(kind, method):
    with camcore.Explainer(kind.model, method=method, layer=kind.layer, **METHOD_OPTIONS[method]) as explainer:
        first = to_numpy(explainer(kind.x(), targets=[2, 0, 1]))
        traces = explainer.adapter.traces()
        second = to_numpy(explainer(kind.x(), targets=[2, 0, 1]))
        assert explainer.adapter.traces() == traces  # the second call compiles nothing new
    np.testing.assert_allclose(second, first, rtol=0, atol=1e-6)
    np.testing.assert_allclose(first, maps_of(kind, method, [2, 0, 1]), rtol=0, atol=1e-5)
