"""Token sequences to feature maps, for transformers (ViT, DeiT, Swin's flattened stages)."""
from __future__ import annotations

import math

from ._xp import array_namespace

__all__ = ["tokens_to_grid"]


def tokens_to_grid(tokens, /, *, prefix_tokens: int = 1, grid: tuple[int, ...] | None = None):
    """``(B, N, D)`` token activations (or gradients) -> channels-first ``(B, D, *grid)`` maps.

    The first ``prefix_tokens`` tokens (the class token; ViT-style models with register or distillation tokens
    have more) are dropped; the remaining ``N - prefix_tokens`` patch tokens are laid out row-major on ``grid``
    (default: the square grid). Use it as ``camcore.explain(..., reshape=tokens_to_grid)`` or, for other
    settings, ``reshape=functools.partial(tokens_to_grid, prefix_tokens=2)``. The reshape is linear, so it is
    applied to activations and gradients alike.
    """
    xp = array_namespace(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"tokens_to_grid: expected token activations (B, N, D), got shape {tuple(tokens.shape)}")
    if not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ValueError(f"tokens_to_grid: prefix_tokens must be an int >= 0, got {prefix_tokens!r}")
    b, n, d = tokens.shape
    patches = n - prefix_tokens
    if grid is None:
        side = math.isqrt(max(patches, 0))
        if side * side != patches or patches == 0:
            raise ValueError(f"tokens_to_grid: {n} tokens minus {prefix_tokens} prefix token(s) leave {patches} "
                             f"patches, not a square grid; pass grid=(h, w) or the right prefix_tokens")
        grid = (side, side)
    if math.prod(grid) != patches:
        raise ValueError(f"tokens_to_grid: grid {tuple(grid)} holds {math.prod(grid)} patches, but there are "
                         f"{patches} ({n} tokens minus {prefix_tokens} prefix token(s))")
    x = xp.reshape(tokens[:, prefix_tokens:, :], (b, *grid, d))
    return xp.permute_dims(x, (0, x.ndim - 1, *range(1, x.ndim - 1)))
