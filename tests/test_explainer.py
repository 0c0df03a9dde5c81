"""``camcore.Explainer``: a persistent explain whose compiled graphs survive across calls, on every backend; the
model is never changed between or after calls; calls from several threads on one model are serialised."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import camcore
from model_checks import assert_untouched, snapshot


def test_explainer_equals_explain_and_builds_the_tail_once(effnet, photo_batch):
    x = photo_batch[:2]
    snap = snapshot(effnet)
    with camcore.Explainer(effnet, method="ablationcam", layer="_conv_head", progress=False) as explainer:
        first = explainer(x, targets=[281, 967])
        assert explainer.adapter.traces() == 1  # the torch.fx split, shared by both samples
        info: dict = {}
        second = explainer(x.flip(0), targets=[967, 281], info=info)
        assert explainer.adapter.traces() == 1 and info["path"] == "tail"  # nothing built again
    torch.testing.assert_close(second, first.flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(first, camcore.explain(effnet, x, method="ablationcam", layer="_conv_head",
                                                      targets=[281, 967], progress=False), atol=1e-6, rtol=0)
    assert_untouched(effnet, snap)
    with pytest.raises(RuntimeError, match="Explainer: this Explainer is closed"):
        explainer(x)


def test_explainer_checks_its_arguments_once_at_construction(effnet):
    with pytest.raises(ValueError, match=r"layer: no layer named '_conv_hed'"):
        camcore.Explainer(effnet, method="gradcam", layer="_conv_hed")
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'top_k' for method 'gradcam'"):
        camcore.Explainer(effnet, method="gradcam", top_k=3)
    with pytest.raises(ValueError, match=r"batch_size: expected None \(chosen by camcore\) or a positive int, got 0"):
        camcore.Explainer(effnet, method="scorecam", batch_size=0)


def test_default_layer_is_picked_on_the_first_call_and_kept(effnet, photo_batch):
    explainer = camcore.Explainer(effnet, method="gradcam")
    maps = explainer(photo_batch[:1])
    assert explainer._names == ["_swish"]  # the last feature map of EfficientNet-Lite0
    torch.testing.assert_close(maps, camcore.explain(effnet, photo_batch[:1], method="gradcam", layer="_swish"))


def test_a_second_keras_call_traces_nothing():
    pytest.importorskip("keras")
    from keras_models import functional

    case = functional()
    explainer = camcore.Explainer(case.model, method="ablationcam", layer=case.cam_layer, progress=False)
    first = explainer(case.x, targets=[1, 2])
    traced = explainer.adapter.traces()
    assert traced >= 1  # the chunk graph (the activations come from the capture pass: no probe graph)
    second = explainer(case.x, targets=[1, 2])
    assert explainer.adapter.traces() == traced
    np.testing.assert_allclose(second, first, atol=1e-6)
    assert "call" not in case.model.get_layer(case.cam_layer).__dict__


def test_a_second_jax_call_compiles_nothing():
    pytest.importorskip("flax")
    import jax.numpy as jnp
    from flax import linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.Conv(6, (3, 3), name="conv")(x))
            return nn.Dense(4, name="fc")(jnp.mean(x, axis=(1, 2)))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    module = Net()
    variables = module.init(__import__("jax").random.key(0), x)
    explainer = camcore.Explainer((module, variables), method="ablationcam", layer="conv", progress=False)
    first = explainer(x, targets=[1, 3])
    compiled = explainer.adapter.traces()
    assert compiled >= 1  # the chunk function (no probe: the capture pass holds the activations)
    second = explainer(x, targets=[1, 3])
    assert explainer.adapter.traces() == compiled  # today's explain rebuilt them every call
    np.testing.assert_allclose(np.asarray(second), np.asarray(first), atol=1e-6)


# ------------------------------------------------------------------------------------------- threads
def _threads(fn, n=2, calls=6):
    errors: list = []

    def work(k):
        try:
            for j in range(calls):
                fn(k, j)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_threads_sharing_a_torch_model_get_right_maps_and_leave_it_untouched():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 3)).train()  # in training mode
    xs = [torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    want = [camcore.explain(net, x, method="gradcam", layer="3", targets=1) for x in xs]
    snap = snapshot(net)

    def call(k, j):
        got = camcore.explain(net, xs[k], method="gradcam" if j % 2 else "ablationcam", layer="3", targets=1,
                              **({} if j % 2 else {"progress": False}))
        if j % 2:
            torch.testing.assert_close(got, want[k], atol=1e-6, rtol=0)

    _threads(call)
    assert_untouched(net, snap)


def test_threads_sharing_a_keras_model_leave_its_layers_unpatched():
    pytest.importorskip("keras")
    from keras_models import functional

    case = functional()
    want = camcore.explain(case.model, case.x, method="gradcam", layer="relu1", targets=1)

    def call(k, j):
        np.testing.assert_allclose(camcore.explain(case.model, case.x, method="gradcam", layer="relu1", targets=1),
                                   want, atol=1e-6)

    _threads(call)
    assert "call" not in case.model.get_layer("relu1").__dict__
    np.testing.assert_allclose(np.asarray(case.model(case.x, training=False)).shape, (2, 10))


def test_threads_calling_one_torch_adapter_directly_leave_the_model_untouched():
    """The engine takes the model's lock too: threads that share one adapter (no Explainer, no explain) and a model
    in training mode with model_mode="as-is" get the single-threaded results, and the flags and batch-norm
    buffers come back."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3)).train()
    from camcore.backends import adapter_for

    ad = adapter_for(net)  # model_mode="eval": each call switches the model to eval and back
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    want = ad.activations_and_grads(x, ["2"], [0, 2])
    masks = torch.rand(3, 6, 1, 1, generator=torch.Generator().manual_seed(3))
    want_masked = ad.forward_masked(x, masks, at="2", targets=[0, 2])
    snap = snapshot(net)

    def call(k, j):
        if (k + j) % 2:
            _, acts, grads = ad.activations_and_grads(x, ["2"], [0, 2])
            torch.testing.assert_close(acts[0], want[1][0], atol=0, rtol=0)
            torch.testing.assert_close(grads[0], want[2][0], atol=1e-7, rtol=0)
        else:
            torch.testing.assert_close(ad.forward_masked(x, masks, at="2", targets=[0, 2]), want_masked, atol=1e-6,
                                       rtol=0)

    _threads(call, n=3)
    assert_untouched(net, snap)
    assert net.training and all(m.training for m in net.modules())


def test_threads_sharing_a_flax_nnx_model_get_right_maps():
    nnx = pytest.importorskip("flax.nnx")
    import jax.numpy as jnp

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.fc = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.bn(self.conv(x)))
            return self.fc(jnp.mean(h, axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    before = jnp.asarray(model.bn.mean[...]).copy()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    want = np.asarray(camcore.explain(model, x, method="gradcam", layer="conv", targets=[0, 2]))

    def call(k, j):
        np.testing.assert_allclose(np.asarray(camcore.explain(model, x, method="gradcam", layer="conv",
                                                              targets=[0, 2])), want, atol=1e-6)

    _threads(call, calls=3)
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), np.asarray(before))


# -------------------------------------------------------------------------------- several methods
def test_a_list_of_methods_shares_one_capture_and_equals_each_alone(effnet, photo_batch):
    """``method=[...]``: a dict of maps from one forward and backward pass (the model runs once), each equal to
    its method alone; each method takes its own options."""
    x = photo_batch[:2]
    methods = ["gradcam", "gradcam++", "eigencam", "ablationcam"]
    calls = []
    handle = effnet.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    try:
        got = camcore.explain(effnet, x, method=methods, layer="_conv_head", targets=[281, 967], eps=1e-7,
                              progress=False)
    finally:
        handle.remove()
    assert calls == [2] and list(got) == methods  # one capture pass; Ablation-CAM's tail does not call the model
    for method in methods:
        opts = {"eps": 1e-7} if method == "gradcam++" else {"progress": False} if method == "ablationcam" else {}
        alone = camcore.explain(effnet, x, method=method, layer="_conv_head", targets=[281, 967], **opts)
        torch.testing.assert_close(got[method], alone, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'top_k' for method 'gradcam', 'eigencam'"):
        camcore.explain(effnet, x, method=["gradcam", "eigencam"], top_k=3)
    with pytest.raises(ValueError, match=r"counterfactual: 'eigencam' uses no gradient"):
        camcore.explain(effnet, x, method=["gradcam", "eigencam"], counterfactual=True)
    with pytest.raises(ValueError, match=r"method: expected a method name or a non-empty list"):
        camcore.Explainer(effnet, method=[])
