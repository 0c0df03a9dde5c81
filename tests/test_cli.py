"""The ``camcore`` command, driven as a user drives it: in a subprocess, on saved models of every kind it reads
(Keras ``.keras``, ``torch.export`` ``.pt2``, TorchScript, ONNX from PyTorch and from Keras through tf2onnx, a
``module:function`` entry point returning a Flax model) and real photos written as PNG and JPEG files.

Each loader is checked by value: the maps ``camcore explain`` writes equal ``camcore.explain`` on the original
model object in this process. Every bad argument gives one line on stderr and exit status 2, no traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import camcore

SIZE = 64
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def camcore_cli(*args, cwd=None, check_rc=0, script=False):
    """Run ``python -m camcore ARGS`` (``script``: the ``camcore`` console script, which has no working folder on
    ``sys.path``) as a user would; returns the completed process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    command = [str(Path(sys.executable).parent / "camcore")] if script else [sys.executable, "-m", "camcore"]
    done = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    if check_rc is not None:
        assert done.returncode == check_rc, (done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    return done


class Net(torch.nn.Module):
    """A small CNN: two conv + ReLU stages, global average pooling, a linear classifier of 10 classes."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


ENTRY_POINTS = '''
import numpy as np


def flax_model():
    """A Flax linen CNN and its variables, seeded: the same model on every call."""
    import jax
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
            x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(x))
            return nn.Dense(10, name="fc")(x.mean(axis=(1, 2)))

    module = Net()
    return module, module.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))


def broken():
    raise RuntimeError("no weights here")


def lazy():
    """A model built by a module of the working folder that is imported only now, while the model is built."""
    import entry_helper

    return entry_helper.make()
'''
ENTRY_HELPER = '''
def make():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory, photos):
    """Two real photos as PNG and JPEG, an unreadable "image", and every kind of saved model."""
    from matplotlib import image

    d = tmp_path_factory.mktemp("cli")
    image.imsave(d / "chelsea.png", photos[0])
    image.imsave(d / "coffee.jpg", (photos[1] * 255).astype(np.uint8), format="jpeg")
    (d / "broken.png").write_bytes(b"not a png at all")
    (d / "model.h5").write_bytes(b"\x89HDF\r\n")
    torch.save({"w": torch.zeros(2)}, d / "weights.pth")
    (d / "entry.py").write_text(ENTRY_POINTS)
    (d / "entry_helper.py").write_text(ENTRY_HELPER)
    (d / "labels.txt").write_text("\n".join(f"thing {i}" for i in range(10)))
    (d / "twice.txt").write_text("\n".join(f"thing {min(i, 8)}" for i in range(10)))  # "thing 8" twice
    (d / "copy").mkdir()
    image.imsave(d / "copy" / "chelsea.png", photos[0])
    rgba = np.concatenate([photos[2], np.linspace(0, 1, photos[2].shape[1])[None, :, None].repeat(224, 0)], axis=2)
    image.imsave(d / "translucent.png", rgba)  # a fading alpha: composited over white
    from PIL import Image

    Image.fromarray((photos[3][..., 0] * 65535).astype(np.uint16)).save(d / "gray16.png")  # 16-bit gray
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.zeros(2, 3, SIZE, SIZE)
    program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(program, d / "net.pt2")
    torch.export.save(torch.export.export(net, (x[:1],)), d / "static.pt2")
    torch.jit.trace(net, x[:1]).save(str(d / "net.ts"))
    torch.onnx.export(net, (x[:1],), str(d / "net.onnx"), dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    keras = _keras_model(d)
    return {"dir": d, "torch": net, "keras": keras}


def _keras_model(d: Path):
    """A small Keras CNN saved as .keras, and the same model through tf2onnx as an ONNX file (channels-last)."""
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv2")(h)
    outputs = keras.layers.Dense(10, name="fc")(keras.layers.GlobalAveragePooling2D(name="gap")(h))
    model = keras.Model(inputs, outputs)
    model.save(d / "net.keras")
    signature = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="input"),)
    tf2onnx.convert.from_function(tf.function(lambda t: model(t, training=False)), input_signature=signature,
                                  opset=17, output_path=str(d / "keras.onnx"))
    w = model.get_layer("conv2").get_weights()  # a broken conversion: two output channels of conv2 swapped
    w[0][..., [3, 5]] = w[0][..., [5, 3]]
    w[1][[3, 5]] = w[1][[5, 3]]
    model.get_layer("conv2").set_weights(w)
    model.save(d / "swapped.keras")
    return keras.saving.load_model(d / "net.keras")


def _inputs(d: Path, first=True):
    """The CLI's preprocessing of the two image files, written here independently: PIL's bilinear resize to
    64 x 64 (anti-aliased), then the ImageNet mean and std."""
    from PIL import Image

    out = [np.asarray(Image.open(d / name).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR),
                      np.float32) for name in ("chelsea.png", "coffee.jpg")]
    x = (np.stack(out) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if first else x, dtype=np.float32)


# ------------------------------------------------------------------------------------- explain, per kind
@pytest.mark.parametrize("kind", ["pt2", "torchscript", "onnx", "keras", "keras-onnx", "entry-point"])
def test_explain_reads_every_model_kind_and_its_maps_are_the_models(files, kind, tmp_path):
    d = files["dir"]
    model_arg = {"pt2": "net.pt2", "torchscript": "net.ts", "onnx": "net.onnx", "keras": "net.keras",
                 "keras-onnx": "keras.onnx", "entry-point": "entry:flax_model"}[kind]
    layer = {"pt2": "features.2", "torchscript": "features/2/Conv", "onnx": "features/features/2/Conv",
             "keras": "conv2", "entry-point": "conv2"}.get(kind)  # keras-onnx: the default, conv2's ReLU
    args = ["explain", model_arg, "chelsea.png", "coffee.jpg", "--method", "gradcam", "--size", SIZE,
            "--out", tmp_path] + (["--layer", layer] if layer else [])
    done = camcore_cli(*args, cwd=d)
    assert (tmp_path / "chelsea_gradcam.png").is_file() and (tmp_path / "coffee_gradcam.png").is_file()
    saved = np.load(tmp_path / "gradcam.npz")
    assert saved["maps"].shape == (2, SIZE, SIZE) and list(saved["images"]) == ["chelsea", "coffee"]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("chelsea: ", "coffee: "))]
    for line, stem in zip(lines, ("chelsea", "coffee"), strict=True):
        assert line.startswith(f"{stem}: class ") and ": score " in line and "p=" in line, done.stdout
    # the same maps from the original model object, in this process
    targets = saved["targets"].tolist()
    if kind in ("pt2", "torchscript", "onnx"):
        ref = camcore.explain(files["torch"], torch.from_numpy(_inputs(d)), method="gradcam",
                              layer="features.2", targets=targets).numpy()
    elif kind in ("keras", "keras-onnx"):
        ref = np.asarray(camcore.explain(files["keras"], _inputs(d, first=False), method="gradcam",
                                         layer="conv2", targets=targets))
    else:
        sys.path.insert(0, str(d))
        try:
            import entry
        finally:
            sys.path.remove(str(d))
        ref = np.asarray(camcore.explain(entry.flax_model(), _inputs(d, first=False),
                                         method="gradcam", layer="conv2", targets=targets))
    assert np.abs(saved["maps"] - ref).max() < 2e-3, kind


def test_explain_by_class_name_and_gradient_free_and_guided(files, tmp_path):
    d = files["dir"]
    done = camcore_cli("explain", "net.pt2", "chelsea.png", "--method", "scorecam", "--size", SIZE, "--target", "3",
                       "--out", tmp_path, cwd=d)
    assert done.stdout.startswith("chelsea: class 3: score ")
    done = camcore_cli("explain", "net.pt2", "translucent.png", "gray16.png", "--method", "guided-backprop",
                       "--size", SIZE, "--target", "Thing 7", "--labels", "labels.txt", "--out", tmp_path, cwd=d)
    assert done.stdout.startswith("translucent: thing 7 (class 7): score ")
    assert np.load(tmp_path / "guided-backprop.npz")["maps"].shape == (2, 3, SIZE, SIZE)


# ------------------------------------------------------------------------------- the other subcommands
def test_layers_lists_the_feature_maps_with_shapes_for_every_backend(files):
    d = files["dir"]
    torch_out = camcore_cli("layers", "net.pt2", "--size", SIZE, "--all", cwd=d).stdout
    rows = {ln.split()[0]: ln for ln in torch_out.splitlines()[1:] if ln.startswith("  ")}
    assert "(1, 16, 32, 32)" in rows["features.2"] and rows["features.0"].endswith("CAM layer")
    # the default: the last layer call that outputs a feature map, the Sequential after its last ReLU
    assert rows["features"].endswith("default CAM layer") and rows["features.3"].endswith(" CAM layer")
    assert rows["fc"].split()[1:] == ["(1,", "10)"]  # listed with --all, not a CAM layer
    keras_out = camcore_cli("layers", "net.keras", "--size", SIZE, cwd=d).stdout
    assert "channels_last" in keras_out and "conv2" in keras_out and "(1, 16, 32, 32)" in keras_out
    flax_out = camcore_cli("layers", "entry:flax_model", "--size", SIZE, cwd=d).stdout
    assert "conv1" in flax_out and "(1, 8, 64, 64)" in flax_out
    # the console script; the entry point imports entry_helper (of the working folder) while it builds the model
    lazy_out = camcore_cli("layers", "entry:lazy", "--size", SIZE, cwd=d, script=True).stdout
    assert [ln.split()[0] for ln in lazy_out.splitlines() if ln.endswith("default CAM layer")] == ["1"]


def test_compare_writes_the_report_with_every_method_and_metric(files, tmp_path):
    d = files["dir"]
    done = camcore_cli("compare", "net.keras", "chelsea.png", "coffee.jpg", "--methods", "gradcam", "ablationcam",
                       "guided-gradcam", "--layer", "conv2", "--size", SIZE, "--steps", 4, "--out", tmp_path, cwd=d)
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 2 * 4  # 2 images x (photo + 3 methods)
    for method in ("gradcam", "ablationcam", "guided-gradcam"):
        assert method in page and f"{method}: " in done.stdout
    assert "deletion AUC" in page and "insertion AUC" in page and "average drop" in page


def test_consistency_of_a_keras_model_and_its_onnx_conversion(files, tmp_path):
    d = files["dir"]
    done = camcore_cli("consistency", "net.keras", "keras.onnx", "chelsea.png", "coffee.jpg", "--size", SIZE,
                       "--methods", "gradcam", "layercam", "--out", tmp_path, cwd=d)
    assert "PASSED" in done.stdout and "no divergence" in done.stdout
    assert "conv2" in done.stdout  # the Keras layer the maps were compared at
    assert "Cross-framework consistency" in (tmp_path / "report.html").read_text()
    broken = camcore_cli("consistency", "net.keras", "swapped.keras", "chelsea.png", "--size", SIZE,
                         "--layers", "conv2", "conv2", "--out", tmp_path, cwd=d, check_rc=1)
    assert "FAILED" in broken.stdout and "first diverges" in broken.stdout and "'conv2'" in broken.stdout


def test_demo_on_one_backend_writes_labelled_pictures_and_the_report(tmp_path):
    done = camcore_cli("demo", "--backend", "torch", "--methods", "gradcam", "guided-gradcam", "--out", tmp_path)
    for cls in ("tabby cat", "espresso", "barbell", "missile"):
        assert cls in done.stdout
    assert "total " in done.stdout
    assert len(list((tmp_path / "torch").glob("*_gradcam.png"))) == 4
    assert (tmp_path / "torch" / "guided-gradcam.png").is_file()
    assert (tmp_path / "report.html").read_text().count("data:image/jpeg;base64,") == 4 * 3


def test_help_of_every_subcommand():
    assert "demo" in camcore_cli("--help").stdout
    for command in ("demo", "explain", "compare", "layers", "consistency"):
        assert "--verbose" in camcore_cli(command, "--help").stdout


# ---------------------------------------------------------------------------------------- bad arguments
BAD = {
    "missing model file": (["explain", "nope.keras", "chelsea.png", "--method", "gradcam"],
                           "MODEL: no such file: 'nope.keras'"),
    "unknown model kind": (["explain", "model.h5", "chelsea.png", "--method", "gradcam"],
                           "MODEL: 'model.h5' is a model file of an unknown kind (.h5); expected a .keras file"),
    "unknown method": (["explain", "net.pt2", "chelsea.png", "--method", "gradcan"],
                       "argument --method: invalid choice: 'gradcan'"),
    "unknown layer": (["explain", "net.pt2", "chelsea.png", "--method", "gradcam", "--layer", "features.9",
                       "--size", str(SIZE)], "features.9"),
    "unreadable image": (["explain", "net.pt2", "broken.png", "--method", "gradcam"],
                         "IMAGE: cannot read 'broken.png' as an image (PNG or JPEG)"),
    "missing image": (["explain", "net.pt2", "cat.png", "--method", "gradcam"], "IMAGE: no such file: 'cat.png'"),
    "static batch": (["explain", "static.pt2", "chelsea.png", "--method", "gradcam", "--size", str(SIZE)],
                     "exported with a static batch size of 1"),
    "missing entry point": (["layers", "entry:nothing"], "module 'entry' has no function 'nothing'"),
    "raising entry point": (["layers", "entry:broken"], "entry:broken() raised RuntimeError: no weights here"),
    "unknown class name": (["explain", "net.pt2", "chelsea.png", "--method", "gradcam", "--size", str(SIZE),
                            "--target", "cat"], "--target: 'cat' is not a class index"),
    "ambiguous class name": (["explain", "net.pt2", "chelsea.png", "--method", "gradcam", "--size", str(SIZE),
                              "--labels", "twice.txt", "--target", "thing 8"],
                             "--target: 'thing 8' names classes 8, 9; give the index"),
    "layer of an input gradient": (["explain", "net.pt2", "chelsea.png", "--method", "guided-backprop", "--layer",
                                    "features.2"], "--layer: 'guided-backprop' is a gradient with respect to the "
                                                   "inputs and takes no layer"),
    "top-k of a gradient method": (["explain", "net.pt2", "chelsea.png", "--method", "gradcam", "--top-k", "8"],
                                   "--top-k: only the Score-CAM family (scorecam, sscam, iscam) takes it"),
    "images of one name": (["explain", "net.pt2", "chelsea.png", "copy/chelsea.png", "--method", "gradcam"],
                           "share the name 'chelsea', so their pictures would overwrite each other"),
    "out is a file": (["explain", "net.pt2", "chelsea.png", "--method", "gradcam", "--out", "labels.txt"],
                      "--out: 'labels.txt' exists and is not a folder"),
    "steps of zero": (["compare", "net.pt2", "chelsea.png", "--steps", "0"],
                      "argument --steps: expected a positive integer, got '0'"),
    "state dict file": (["layers", "weights.pth"], "a .pth file usually holds a state dict"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_argument_is_one_clear_line_and_status_2(files, case):
    args, message = BAD[case]
    done = camcore_cli(*args, cwd=files["dir"], check_rc=2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    if case == "unknown layer":
        assert "features.2" in lines[0]  # the nearest real names


def test_verbose_shows_the_traceback(files):
    done = camcore_cli("explain", "net.pt2", "broken.png", "--method", "gradcam", "--verbose", cwd=files["dir"],
                       check_rc=2)
    assert "Traceback" in done.stderr and "camcore: error: IMAGE: cannot read" in done.stderr
