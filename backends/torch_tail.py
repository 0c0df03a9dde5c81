"""A PyTorch model split at a layer: run the layers before it once, and only the layers after it per mask.

Ablation-CAM needs the target score with each channel of a layer zeroed: ``C`` forward passes that all share the
layers before the target. :func:`split_at` traces the model with ``torch.fx`` (the target module kept as one
node; a ``torch.export.unflatten`` module of a ``.pt2`` program has its graph already), cuts the graph after the
module's last call and builds two graph modules that share the model's own submodules and parameters (nothing is
copied or changed):

- ``prefix(x) -> (A, *frontier)``: the layer's activations and every other value the rest of the graph reads
  (skip connections, ``x.size(0)``, ...);
- ``tail(A', *frontier) -> outputs``: the rest of the model on replaced activations ``A'``.

:class:`Tail` runs the tail under ``torch.func.vmap`` over a chunk of masks, with the frontier
values unbatched: per-example semantics hold inside the tail (``x.view(bs, -1)`` with ``bs`` from the prefix
stays right), and the prefix runs once per sample instead of once per mask. Models that ``torch.fx`` cannot
trace (data-dependent Python control flow) or whose tail ``vmap`` cannot batch raise here; the adapter then
falls back to full forward passes and says so.
"""
from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["split_at", "Tail"]


class _Tracer(fx.Tracer):
    """The default tracer, except that the target module stays one ``call_module`` node."""

    def __init__(self, target: torch.nn.Module):
        super().__init__()
        self.target = target

    def is_leaf_module(self, m, qualname) -> bool:
        return m is self.target or super().is_leaf_module(m, qualname)


def split_at(model: torch.nn.Module, module: torch.nn.Module) -> tuple[fx.GraphModule, fx.GraphModule, list]:
    """``(prefix, tail, computed)`` graph modules of ``model`` cut after the last call of ``module`` (see the
    module docstring); ``computed[j]`` says whether frontier value ``j`` (after ``A``) is computed (it may be
    changed in place by the tail, so each tail call needs its own copy) rather than a parameter or buffer.
    Raises whatever ``torch.fx`` raises for an untraceable model, or ``RuntimeError`` when the traced graph
    does not call ``module``."""
    program = _program_graph(model)
    graph = _Tracer(module).trace(model) if program is None else program
    nodes = list(graph.nodes)
    calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and model.get_submodule(n.target) is module]
    if not calls:
        raise RuntimeError("the traced graph never calls the layer")
    cut = calls[-1]
    head, rest = nodes[: cut + 1], [n for n in nodes[cut + 1 :] if n.op != "placeholder"]
    in_head = set(head)
    frontier = [nodes[cut]] + [n for n in head if n is not nodes[cut]
                               and any(u not in in_head for u in n.users)]

    prefix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in head:
        env[n] = prefix.node_copy(n, lambda a: env[a])
    prefix.output(tuple(env[n] for n in frontier))
    prefix_module = fx.GraphModule(model, prefix)
    prefix_module.graph.eliminate_dead_code()
    prefix_module.recompile()

    tail = fx.Graph()
    env = {n: tail.placeholder(f"frontier_{i}") for i, n in enumerate(frontier)}
    for n in rest:
        if n.op == "output" and program is not None and isinstance(n.args[0], (tuple, list)) and len(n.args[0]) == 1:
            tail.output(env[n.args[0][0]])  # a program returns its flat outputs: one tensor, as its forward does
        else:
            env[n] = tail.node_copy(n, lambda a: env[a])
    return prefix_module, fx.GraphModule(model, tail), [n.op != "get_attr" for n in frontier[1:]]


def _program_graph(model) -> fx.Graph | None:
    """The graph of a ``torch.export.unflatten`` module (a loaded ``.pt2`` program): its forward flattens its
    inputs with pytrees, which ``torch.fx`` cannot trace, but it runs this graph of its submodules' calls."""
    graph = getattr(model, "graph", None)
    return graph if type(model).__name__ == "UnflattenedModule" and isinstance(graph, fx.Graph) else None


class Tail:
    """The model's outputs with a layer's activations multiplied by masks, computing only the layers after it.

    ``tail(x, masks)``: ``x`` is one sample (``(1, C, *S)``), ``masks`` ``(M, *shape)`` broadcasting against its
    activations ``(C, *s)``; returns the outputs batched as ``(M, ...)``. The prefix runs once per sample (kept
    while the same ``x`` object comes back); the tail runs under ``torch.func.vmap`` over the masks."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Module):
        self.prefix, self.tail, self._computed = split_at(model, module)
        self._sample: tuple | None = None

    def __call__(self, x, masks):
        if self._sample is None or self._sample[0] is not x:
            self._sample = (x, *self.prefix(x))
        _, act, *frontier = self._sample
        # a fresh copy of each computed value per call: the tail may change them in place (x += skip)
        frontier = [f.clone() if computed and isinstance(f, torch.Tensor) else f
                    for f, computed in zip(frontier, self._computed)]
        out = torch.func.vmap(lambda mask: self.tail(act * mask, *frontier))(masks)
        return _merge_example_dim(out)  # every output leaf is (M, 1, ...): one example per mask


def _merge_example_dim(tree):
    if isinstance(tree, torch.Tensor):
        return tree.flatten(0, 1) if tree.ndim >= 2 else tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_merge_example_dim(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _merge_example_dim(v) for k, v in tree.items()}
    return tree
