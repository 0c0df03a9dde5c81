"""What a persistent ``camcore.Explainer`` saves: graphs traced and time, first call vs second, on every backend.

    python benchmarks/bench_explainer_traces.py [--frameworks torch,keras,jax] [--top-k 8]

The pretrained EfficientNet-Lite0 (PyTorch) and camcore's Keras 3 and Flax linen ports of it, one real photo,
Ablation-CAM at ``_conv_head`` and Score-CAM (``top_k``) at ``_blocks.15``. For each: the graphs the adapter
traced or compiled (``adapter.traces()``: torch.fx tails, ``tf.function`` traces, ``jax.jit`` compilations) and
the wall time of a first and a second call of one ``Explainer``, and of a second one-shot ``camcore.explain``
(a fresh adapter: what it retraces is what the Explainer keeps).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torchvision  # noqa: F401  (before any TensorFlow import, see docs/adapters.md)
import torch

CASES = [("ablationcam", "_conv_head", {}), ("scorecam", "_blocks.15", {"top_k": None})]


def ports(frameworks, model, x):
    """``framework -> (model, inputs, layer name)`` for the requested frameworks."""
    out = {}
    if "torch" in frameworks:
        out["torch"] = (model, x, lambda n: n)
    nhwc = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
    if "keras" in frameworks:
        from camcore.ports import keras_efficientnet_lite

        out["keras"] = (keras_efficientnet_lite(model), nhwc, lambda n: n)
    if "jax" in frameworks:
        import jax.numpy as jnp
        from camcore.ports import flax_efficientnet_lite, flax_path

        out["jax"] = (flax_efficientnet_lite(model), jnp.asarray(nhwc), flax_path)
    return out


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="torch,keras,jax")
    parser.add_argument("--top-k", type=int, default=8)
    args = parser.parse_args(argv)
    import camcore
    from camcore.demo import load_model, load_photo, to_tensor

    model, x = load_model(), to_tensor([load_photo("chelsea")])
    print(f"EfficientNet-Lite0, 1 photo, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"  {'framework':9s} {'method':12s} {'layer':11s} {'traces 1st':>10s} {'2nd':>4s} {'one-shot 2nd':>12s}"
          f" {'time 1st':>9s} {'2nd':>7s} {'one-shot 2nd':>12s}")
    for fw, (m, inputs, name) in ports(args.frameworks.split(","), model, x).items():
        for method, layer, opts in CASES:
            opts = {k: args.top_k if k == "top_k" else v for k, v in opts.items()}
            kw = dict(method=method, layer=name(layer), progress=False, **opts)
            with camcore.Explainer(m, **kw) as explainer:
                t1 = timed(lambda: explainer(inputs, targets=[281]))
                n1 = explainer.adapter.traces()
                t2 = timed(lambda: explainer(inputs, targets=[281]))
                n2 = explainer.adapter.traces() - n1
            camcore.explain(m, inputs, targets=[281], **kw)  # warm: the same shapes, a fresh adapter below
            fresh = camcore.Explainer(m, **kw)
            t3 = timed(lambda: fresh(inputs, targets=[281]))
            n3 = fresh.adapter.traces()
            print(f"  {fw:9s} {method:12s} {layer:11s} {n1:10d} {n2:4d} {n3:12d} {t1:8.2f}s {t2:6.2f}s {t3:11.2f}s")


if __name__ == "__main__":
    main()
