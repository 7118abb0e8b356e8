"""What the Flax and Haiku DEQ adapters share, on implicax's public API only."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["deq_initial_state"]


def deq_initial_state(x: Any, z0: Any | None) -> Any:
    """The DEQ adapters' z0: zeros shaped like x, or the given z0.

    Checked to be floating here, because the adapters call the cell on it before the solve,
    whose own layers would fail on integers with an unrelated message.
    """
    if z0 is None:
        _check_floating(x, "DEQ: x", "z0 defaults to zeros like x: pass z0 explicitly.")
        return jax.tree.map(jnp.zeros_like, x)
    _check_floating(z0, "DEQ: z0", "Cast it, e.g. .astype(jnp.float32).")
    return z0


def _check_floating(tree: Any, name: str, hint: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} must hold floating-point arrays (the solution keeps its dtype); at "
                f"{jax.tree_util.keystr(path) or '(root)'} got {dtype}. {hint}"
            )
