"""Solver configurations: immutable dataclasses that are also pytrees.

A solver's tolerances and step limit are its pytree leaves and everything else (history
lengths, damping, callables) is static. So `rtol`, `atol` and `max_steps` may be traced arrays:
passed into a jitted function, a new value reuses the compiled code. Nested solvers (Newton's
linear solver) are children, so their limits are leaves too.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import jax
import numpy as np

DYNAMIC = "implicax_dynamic"


def dynamic_field(default: Any = None) -> Any:
    """A dataclass field that is a pytree leaf (or child) of the solver."""
    return dataclasses.field(default=default, metadata={DYNAMIC: True})


def register(cls: type) -> None:
    """Make instances of the dataclass `cls` pytrees with its dynamic fields as children.

    Unflattening bypasses ``__init__``: JAX rebuilds pytrees with tracers or placeholders as
    leaves, which the validation in ``__post_init__`` must not see.
    """

    def names(kind: bool) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get(DYNAMIC, False) is kind]

    def flatten(solver):
        if not dataclasses.is_dataclass(solver):  # a plain class: the whole object is static
            return (), solver
        return (
            tuple(getattr(solver, n) for n in names(True)),
            tuple(getattr(solver, n) for n in names(False)),
        )

    def unflatten(static, children):
        if not dataclasses.is_dataclass(cls):
            return static
        solver = object.__new__(cls)
        for name, value in zip(names(True), children):
            object.__setattr__(solver, name, value)
        for name, value in zip(names(False), static):
            object.__setattr__(solver, name, value)
        return solver

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)


def is_array(value: Any) -> bool:
    """A JAX array or tracer (a NumPy scalar or Python number is checked by value)."""
    return isinstance(value, jax.Array)


def check_tolerance(owner: str, field: str, value: Any) -> None:
    """A tolerance is None, a finite float ≥ 0, or a scalar floating array (checked when run)."""
    if value is None:
        return
    if is_array(value):
        if value.shape != () or not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
            raise TypeError(f"{owner}: {field} must be a scalar float array, got {value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise TypeError(f"{owner}: {field} must be a float or None, got {value!r}.")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {field} must be finite and >= 0, got {value!r}.")


def check_step_limit(owner: str, value: Any, allow_none: bool = False) -> None:
    """max_steps is an int ≥ 1 or a scalar integer array (None where the solver scales it)."""
    if value is None:
        if allow_none:
            return
        raise TypeError(f"{owner}: max_steps must be an int, got None.")
    if is_array(value):
        if value.shape != () or not jax.numpy.issubdtype(value.dtype, jax.numpy.integer):
            raise TypeError(f"{owner}: max_steps must be a scalar integer array, got {value!r}.")
        return
    if isinstance(value, bool):
        raise TypeError(f"{owner}: max_steps must be an int, got {value!r}.")
    try:
        steps = operator.index(value)
    except TypeError:
        none = " or None" if allow_none else ""
        raise TypeError(f"{owner}: max_steps must be an int{none}, got {value!r}.") from None
    if steps < 1:
        raise ValueError(f"{owner}: max_steps must be >= 1, got {steps}.")


def check_fraction(owner: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{owner}: {field} must be a float in (0, 1], got {value!r}.")


def check_positive_int(owner: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {field} must be an int >= 1, got {value!r}.")


def check_callable(owner: str, field: str, value: Any, signature: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{owner}: {field} must be None or a callable {signature}, got {value!r}.")
