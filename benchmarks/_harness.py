"""Measurement helpers shared by the benchmark problems.

Every candidate is a pair of pure functions of the same inputs: ``forward(*args)`` (the solve,
returning ``(solution, forward_steps)``) and ``value_and_grad(*args)`` (loss and gradients, or a
whole training step). Each is compiled once with ``jax.jit(...).lower(*args).compile()`` (timed:
that is the compile time, tracing and lowering included), and the same ``jax.jit`` functions are
then called warm, as a user calls them, round-robin over all candidates (so that drifts in
machine load hit them alike), each call ended by ``jax.block_until_ready``. Not the compiled
executables themselves: JAX dispatches those on a slower Python path when they contain a host
callback, which a user's jitted call does not take.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


@dataclasses.dataclass
class Candidate:
    """One way of computing the solve and its gradient.

    Attributes:
        name: short label (table row).
        family: "plain", "unrolled", "direct", "implicax", "jaxopt" or "optimistix".
        settings: the solver settings, stated in the report.
        forward: ``forward(*args) -> (solution, steps)``, or None.
        value_and_grad: ``value_and_grad(*args) -> (loss, grads)`` (or a training step whose
            output holds them; see ``grads_of``), or None.
        memory: ``memory(steps) -> function of args`` whose compiled temp size is the memory at
            that iteration budget (max_steps, or the unroll length), or None.
        backward_steps: ``backward_steps(*args) -> int`` (matrix-vector products of the adjoint
            solve), or None.
        in_targets: whether this row enters the target checks as implicax / anchor.
    """

    name: str
    family: str
    settings: str
    forward: Callable | None = None
    value_and_grad: Callable | None = None
    memory: Callable[[int], Callable] | None = None
    backward_steps: Callable | None = None
    note: str = ""


@dataclasses.dataclass
class Result:
    name: str
    family: str
    settings: str
    compile_s: float | None = None
    forward_compile_s: float | None = None
    forward_ms: float | None = None
    forward_ms_min: float | None = None
    vg_ms: float | None = None
    vg_ms_min: float | None = None
    forward_steps: int | None = None
    backward_steps: int | None = None
    residual: float | None = None
    converged: bool | None = None
    loss: float | None = None
    grad_error: float | None = None
    memory: dict[int, int] = dataclasses.field(default_factory=dict)
    note: str = ""
    error: str = ""


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def compile_fn(fn: Callable, args: tuple, repeats: int = 1) -> tuple[Callable, float]:
    """Compile ``fn`` for ``args``; return (jitted fn, seconds of the fastest of `repeats`).

    Each repeat starts from cleared JAX caches with a fresh jit wrapper, so nothing traced or
    compiled before is reused (`repeats=0`, quick mode: one compile, caches kept). The jitted
    function returned reuses the last compilation: its first call only retraces.
    """
    best = float("inf")
    for _ in range(max(repeats, 1)):
        if repeats:
            jax.clear_caches()
        wrapper = jax.jit(lambda *a: fn(*a))
        start = time.perf_counter()
        wrapper.lower(*args).compile()
        best = min(best, time.perf_counter() - start)
    return wrapper, best


def temp_bytes(fn: Callable, args: tuple) -> int:
    """XLA's temporary buffer size for the compiled ``fn`` (live intermediates, excluding the
    arguments and outputs): the part of peak memory that a solve or its backward pass adds."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)


def round_robin(calls: dict[Any, tuple[Callable, tuple]], rounds: int, reps: int) -> dict:
    """Time every call ``reps`` times per round, for ``rounds`` rounds, interleaved.

    Returns {key: array of per-call seconds}. Each call is warmed up once first.
    """
    for fn, args in calls.values():
        block(fn(*args))
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, (fn, args) in calls.items():
            for _ in range(reps):
                start = time.perf_counter()
                block(fn(*args))
                times[key].append(time.perf_counter() - start)
    return {key: np.asarray(value) for key, value in times.items()}


def relative_error(value: Any, reference: Any) -> float:
    """‖value − reference‖₂ / ‖reference‖₂ over all leaves, in float64 on the host."""
    flat = np.asarray(ravel_pytree(jax.tree.map(np.asarray, value))[0], np.float64)
    ref = np.asarray(ravel_pytree(jax.tree.map(np.asarray, reference))[0], np.float64)
    return float(np.linalg.norm(flat - ref) / np.linalg.norm(ref))


def to_int(x: Any) -> int | None:
    if x is None:
        return None
    value = int(np.max(np.asarray(x)))
    return value if value >= 0 else None


def run_candidates(
    candidates: list[Candidate],
    args: tuple,
    *,
    reference_grads: Any,
    grads_of: Callable[[Any], Any] = lambda out: out[1],
    residual_of: Callable[[Any], float] | None = None,
    loss_of: Callable[[Any], Any] = lambda out: out[0],
    rounds: int,
    reps: int,
    compile_repeats: int = 1,
    memory_steps: tuple[int, ...] = (),
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Compile, check and time every candidate on the same ``args``."""
    results = []
    executables: dict[tuple[int, str], tuple[Callable, tuple]] = {}
    for index, cand in enumerate(candidates):
        started = time.perf_counter()
        res = Result(cand.name, cand.family, cand.settings, note=cand.note)
        results.append(res)
        try:
            with warnings.catch_warnings():
                # A solve that misses its tolerance is reported in the table (converged = no);
                # implicax's on_failure="warn" would also print a RuntimeWarning per call.
                warnings.simplefilter("ignore", RuntimeWarning)
                if cand.value_and_grad is not None:
                    exe, res.compile_s = compile_fn(cand.value_and_grad, args, compile_repeats)
                    out = block(exe(*args))
                    res.loss = float(np.asarray(loss_of(out)))
                    if reference_grads is not None:
                        res.grad_error = relative_error(grads_of(out), reference_grads)
                    executables[(index, "vg")] = (exe, args)
                if cand.forward is not None:
                    exe, res.forward_compile_s = compile_fn(cand.forward, args, 1)
                    solution, steps = block(exe(*args))
                    res.forward_steps = to_int(steps)
                    if residual_of is not None:
                        res.residual, res.converged = residual_of(solution)
                    executables[(index, "fwd")] = (exe, args)
                if cand.backward_steps is not None:
                    res.backward_steps = to_int(jax.jit(cand.backward_steps)(*args))
                for steps in memory_steps if cand.memory is not None else ():
                    res.memory[steps] = temp_bytes(cand.memory(steps), args)
        except Exception as exc:  # a failing candidate is reported, not fatal
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log(f"  ! {cand.name}: {res.error}")
            executables = {k: v for k, v in executables.items() if k[0] != index}
        log(f"  {cand.name}: compiled and checked in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        times = round_robin(executables, rounds, reps)
    log(f"  timing: {time.perf_counter() - started:.1f} s")
    for (index, kind), seconds in times.items():
        res = results[index]
        median, best = float(np.median(seconds)) * 1e3, float(np.min(seconds)) * 1e3
        if kind == "vg":
            res.vg_ms, res.vg_ms_min = median, best
        else:
            res.forward_ms, res.forward_ms_min = median, best
    return results


def max_residual(fn: Callable, params: Any, rtol: float, atol: float):
    """(max_i |fn(z)_i − z_i|, converged by the elementwise test) as a host check."""

    def check(z):
        fz = fn(z, params)
        diff = jnp.abs(fz - z)
        return jnp.max(diff), jnp.max(diff / (atol + rtol * jnp.abs(fz))) <= 1

    def residual_of(z):
        r, ok = jax.jit(check)(z)
        return float(r), bool(ok)

    return residual_of
