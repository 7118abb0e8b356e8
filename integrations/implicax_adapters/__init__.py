"""What the Flax and Haiku DEQ adapters share, on implicax's public API only."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

import implicax

__all__ = ["check_diagnostics", "deq_diagnostics", "deq_initial_state", "naming_the_cell"]


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


def check_diagnostics(penalty_samples: Any, radius_steps: Any) -> tuple[int, int]:
    """The DEQ layers' penalty_samples and radius_steps, checked: whole numbers, 0 for off."""
    for name, value in (("penalty_samples", penalty_samples), ("radius_steps", radius_steps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"DEQ: {name} must be a whole number ≥ 0 (0: off), got {value!r}.")
    return int(penalty_samples), int(radius_steps)


def deq_diagnostics(
    fn: Any, z: Any, params: Any, key: jax.Array, penalty_samples: int, radius_steps: int
) -> dict[str, jax.Array]:
    """What a DEQ layer reports at its solution z* on request: ``"jacobian_penalty"``
    (`implicax.jacobian_penalty`, differentiable through the cell's arguments, at z* held
    constant) and ``"spectral_radius"`` (`implicax.spectral_radius`, for monitoring), each
    only when its count is nonzero."""
    z = jax.lax.stop_gradient(z)
    penalty_key, radius_key = jax.random.split(key)
    out = {}
    if penalty_samples:
        out["jacobian_penalty"] = implicax.jacobian_penalty(
            fn, z, params, penalty_key, samples=penalty_samples
        )
    if radius_steps:
        out["spectral_radius"] = implicax.spectral_radius(
            fn, z, params, radius_key, steps=radius_steps
        )
    return out


@contextlib.contextmanager
def naming_the_cell(cell: Any) -> Iterator[None]:
    """Re-raise the solve's "fn(x, params) must ..." TypeError as one about the DEQ's cell
    and its state z (the solve names fn and x0, which the user did not write)."""
    try:
        yield
    except TypeError as error:
        if "fn(x, params) must" not in str(error):
            raise
        name = getattr(cell, "__name__", None) or type(cell).__name__
        detail = str(error).split("fn(x, params) must", 1)[1].replace("x0", "z")
        raise TypeError(
            f"DEQ: cell {name} must{detail} A DEQ iterates z = cell(z, x), so the cell must "
            "return a state like z; z0=None starts from zeros like x: pass z0 when the "
            "state's shape differs from x's."
        ) from None


def _check_floating(tree: Any, name: str, hint: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} must hold floating-point arrays (the solution keeps its dtype); at "
                f"{jax.tree_util.keystr(path) or '(root)'} got {dtype}. {hint}"
            )
