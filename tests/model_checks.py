"""Checks that a torch model is exactly as it was: weights, buffers, flags, grad mode, no hooks left."""
import torch


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_no_hooks(model):
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(m, attr), f"{attr} left on {name or 'the model'}"


def assert_untouched(model, snap):
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), f"{k} changed"
    assert [(n, m.training) for n, m in model.named_modules()] == snap["training"]
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == snap["requires_grad"]
    assert all(p.grad is None for p in model.parameters()), "a parameter has .grad set"
    assert torch.is_grad_enabled() == snap["grad_mode"]
    assert_no_hooks(model)
