"""Solver configurations: immutable dataclasses that are also pytrees.

A solver's tolerances and step limit are its pytree leaves and everything else (history
lengths, damping, callables) is static. So `rtol`, `atol` and `max_steps` may be traced arrays:
passed into a jitted function, a new value reuses the compiled code. Nested solvers (Newton's
linear solver) are children, so their limits are leaves too.
"""

from __future__ import annotations

import dataclasses
import numbers
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


def check_tolerance(owner: str, field: str, value: Any) -> Any:
    """A tolerance is None, a finite number ≥ 0 (returned as a Python float; NumPy scalars
    accepted), or a scalar floating array (returned as is, checked when run)."""
    if value is None:
        return None
    if is_array(value):
        if value.shape != () or not jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
            raise TypeError(f"{owner}: {field} must be a scalar float array, got {value!r}.")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {field} must be a float or None, got {value!r}.")
    number = float(value)
    if not np.isfinite(number) or number < 0:
        raise ValueError(f"{owner}: {field} must be finite and >= 0, got {value!r}.")
    return number


# Step counters are int32 (on every backend, with or without x64).
_MOST_STEPS = 2**31 - 1


def check_step_limit(owner: str, value: Any, allow_none: bool = False) -> Any:
    """max_steps is an int in [1, 2**31 − 1] (returned as a Python int; NumPy integers
    accepted) or a scalar integer array (returned as is); None where the solver scales it."""
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{owner}: max_steps must be an int, got None.")
    if is_array(value):
        if value.shape != () or not jax.numpy.issubdtype(value.dtype, jax.numpy.integer):
            raise TypeError(f"{owner}: max_steps must be a scalar integer array, got {value!r}.")
        return value
    if isinstance(value, bool):
        raise TypeError(f"{owner}: max_steps must be an int, got {value!r}.")
    try:
        steps = operator.index(value)
    except TypeError:
        none = " or None" if allow_none else ""
        raise TypeError(f"{owner}: max_steps must be an int{none}, got {value!r}.") from None
    if not 1 <= steps <= _MOST_STEPS:
        raise ValueError(
            f"{owner}: max_steps must be between 1 and 2**31 - 1 (steps are counted in int32), "
            f"got {steps}."
        )
    return steps


def _real(owner: str, field: str, value: Any, kind: str) -> float:
    """A Python float from a Python or NumPy real number; TypeError for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or is_array(value):
        raise TypeError(f"{owner}: {field} must be {kind}, got {value!r}.")
    return float(value)


def check_fraction(owner: str, field: str, value: Any) -> float:
    """A number in (0, 1], as a Python float (NumPy scalars accepted)."""
    number = _real(owner, field, value, "a float in (0, 1]")
    if not 0 < number <= 1:
        raise ValueError(f"{owner}: {field} must be a float in (0, 1], got {value!r}.")
    return number


def check_nonnegative(owner: str, field: str, value: Any) -> float:
    """A finite number ≥ 0, as a Python float (NumPy scalars accepted)."""
    number = _real(owner, field, value, "a float >= 0")
    if not (np.isfinite(number) and number >= 0):
        raise ValueError(f"{owner}: {field} must be a finite float >= 0, got {value!r}.")
    return number


def check_positive_int(owner: str, field: str, value: Any) -> int:
    """An int ≥ 1, as a Python int (NumPy integers accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or is_array(value):
        raise TypeError(f"{owner}: {field} must be an int >= 1, got {value!r}.")
    if value < 1:
        raise ValueError(f"{owner}: {field} must be an int >= 1, got {value!r}.")
    return int(value)


def set_checked(solver: Any, field: str, value: Any) -> None:
    """Store a normalised option on a frozen dataclass (in ``__post_init__``)."""
    object.__setattr__(solver, field, value)


def check_instance(owner: str, field: str, value: Any) -> None:
    """A class where a solver is expected is a TypeError (classes are callable, so it would
    otherwise pass for a user's callable solver and fail much later)."""
    if isinstance(value, type):
        raise TypeError(
            f"{owner}: {field} must be a solver instance or a callable, got the class "
            f"{value.__name__}; pass an instance: {field}={value.__name__}()."
        )


def check_function_and_tolerances(wrapper: Any, signature: str) -> None:
    """The fields of a wrapper of a user's solver (`CallableSolver`, `CallableLinearSolver`):
    `function` an instance, callable as `signature`; `rtol` and `atol` tolerances."""
    owner = type(wrapper).__name__
    check_instance(owner, "function", wrapper.function)
    if not callable(wrapper.function):
        raise TypeError(
            f"{owner}: function must be callable as {signature}, got {wrapper.function!r}."
        )
    set_checked(wrapper, "rtol", check_tolerance(owner, "rtol", wrapper.rtol))
    set_checked(wrapper, "atol", check_tolerance(owner, "atol", wrapper.atol))


def check_callable(owner: str, field: str, value: Any, signature: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{owner}: {field} must be None or a callable {signature}, got {value!r}.")


def holds_functions(solver: Any) -> bool:
    """Whether a solver configuration holds functions of the user's (a callable solver, a
    callable linear solver, a preconditioner), directly or in a nested solver."""
    if not dataclasses.is_dataclass(solver):
        return False
    for field in dataclasses.fields(solver):
        value = getattr(solver, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if holds_functions(value):
                return True
        elif callable(value):
            return True
    return False
