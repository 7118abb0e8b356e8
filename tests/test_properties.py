"""Property tests: random contractions and random root problems over random pytrees and dtypes.

Hypothesis draws the unknowns' pytree (one array, a tuple or a dict; leaf shapes with sizes 1
to 4, scalars included), their dtypes (float32, float64, or one leaf of each), a random
well-posed problem coupling every leaf with every other, and the forward and linear solvers.
Each example checks that the solve converged to a point satisfying the equation, and that its
derivatives, reverse mode (`jax.grad`) and forward mode (`jax.jvp`), agree with

- an independent float64 reference: backpropagation through plain unrolled iteration
  (`lax.fori_loop`) for the fixed point, the implicit function theorem evaluated densely with
  `np.linalg.solve` for the root (float32 and mixed examples are compared with it at float32
  tolerances), and
- central finite differences of the solve itself (float64 examples).

Compilation dominates the run time (about 2 s per example on one CPU core), so each example
compiles one program that returns everything compared (run again at θ ± ε·d for the central
difference), with LLVM optimisation off, and there are few examples: four explicit ones per
test, which together use every forward and every linear solver, and `max_examples` drawn
ones. ``derandomize=True`` draws the same examples on every run. `test_derivatives.py`
covers every forward × linear solver pair on fixed problems.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

import implicax

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True, database=None)

# The programs run for microseconds; LLVM's optimisations would only lengthen compilation.
compile_fast = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

FORWARD = {
    "FixedPointIteration": implicax.FixedPointIteration(max_steps=1000),
    "Anderson": implicax.Anderson(max_steps=500),
    "Broyden": implicax.Broyden(max_steps=500),
    "Newton": implicax.Newton(),
}
# Neumann applies to both problems: both iteration maps x ↦ x − F(x) contract.
LINEAR = {
    "BiCGStab": implicax.BiCGStab(),
    "GMRES": implicax.GMRES(),
    "Dense": implicax.Dense(),
    "Neumann": implicax.Neumann(max_steps=1000),
}
UNROLL = 200  # plain iterations for the references: 0.7**200 is far below float64 precision
EPS = 1e-4  # central-difference step

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
# (solution, derivative) tolerances, by the least precise dtype among the unknowns. The errors
# observed are 10 to 100 times smaller; a derivative off by 0.3% (float32) or 1e-6 (float64)
# fails.
TOLERANCE = {F64: (1e-9, 1e-8), F32: (2e-4, 5e-4)}
# Truncation error O(EPS²) plus the forward solve's error divided by EPS.
CENTRAL_TOLERANCE = 1e-6


def covering(*cases):
    """Explicit examples, run before the drawn ones: together they pair every forward solver
    and every linear solver with some layout, mixed float32/float64 ones included, whatever
    Hypothesis draws."""

    def decorate(test):
        for seed, (layout, forward, linear) in enumerate(cases):
            test = example(layout=layout, seed=seed, forward=forward, linear=linear)(test)
        return test

    return decorate


# --- Random layouts of the unknowns ----------------------------------------------------------


@st.composite
def layouts(draw):
    """A pytree whose leaves are (shape, dtype) pairs: the structure of the unknowns."""
    kind = draw(st.sampled_from(["array", "tuple", "dict"]))
    if kind == "array":
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        return (shape, np.dtype(draw(st.sampled_from(["float32", "float64"]))))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), max_size=2))) for _ in range(2)]
    precision = draw(st.sampled_from(["float32", "float64", "mixed"]))
    dtypes = ["float32", "float64"] if precision == "mixed" else [precision] * 2
    leaves = tuple((shape, np.dtype(dtype)) for shape, dtype in zip(shapes, dtypes))
    return leaves if kind == "tuple" else {"a": leaves[0], "b": leaves[1]}


def _is_layout_leaf(node) -> bool:
    return isinstance(node, tuple) and len(node) == 2 and isinstance(node[1], np.dtype)


class Layout:
    """Conversion between pytrees of a drawn layout and flat vectors."""

    def __init__(self, layout):
        leaves, self.treedef = jax.tree.flatten(layout, is_leaf=_is_layout_leaf)
        self.shapes = [shape for shape, _ in leaves]
        self.dtypes = [dtype for _, dtype in leaves]
        self.sizes = [int(np.prod(shape, dtype=int)) for shape in self.shapes]
        self.size = sum(self.sizes)
        self.precision = max(self.dtypes, key=lambda dtype: np.finfo(dtype).eps)

    def tree(self, flat):
        """The pytree filled from a flat vector, each leaf in its own dtype."""
        leaves, start = [], 0
        for shape, dtype, size in zip(self.shapes, self.dtypes, self.sizes):
            leaves.append(jnp.asarray(flat[start : start + size]).reshape(shape).astype(dtype))
            start += size
        return jax.tree.unflatten(self.treedef, leaves)

    @staticmethod
    def flat(tree, dtype=jnp.float64):
        return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in jax.tree.leaves(tree)])

    def pytree_function(self, flat_function):
        """``(x, θ) ↦ flat_function(x, θ)`` on pytrees of this layout, computed in the widest
        dtype among x's leaves and returned leaf by leaf in each leaf's own dtype."""

        def function(x, theta):
            compute = jnp.result_type(*jax.tree.leaves(x))
            return self.tree(flat_function(self.flat(x, compute), self.flat(theta, compute)))

        return function


def _random_matrix(rng, n, norm):
    r = rng.standard_normal((n, n))
    return norm * r / np.linalg.norm(r, 2)


# --- The comparison shared by both problems --------------------------------------------------


def _check(layout, solve, residual, reference, rng):
    """Compare the solve's solution and derivatives with a float64 reference.

    solve: θ ↦ (x, stats) on pytrees of `layout`; residual: the equation's residual at flat
    float64 (x, θ), zero at the solution; reference: flat float64 (θ, w) ↦ (x*, ∇θ(w·x*)).
    """
    n = layout.size
    theta = layout.tree(rng.standard_normal(n))
    direction = layout.tree(rng.standard_normal(n))
    weights = rng.standard_normal(n)
    w = jnp.asarray(weights)

    def loss(theta):
        return w @ layout.flat(solve(theta)[0])

    @compile_fast
    def compute(theta, direction):
        x, stats = solve(theta)
        return {
            "x": layout.flat(x),
            "loss": w @ layout.flat(x),
            "converged": stats.converged,
            "residual": residual(layout.flat(x), layout.flat(theta)),
            "gradient": layout.flat(jax.grad(loss)(theta)),
            "tangent": jax.jvp(loss, (theta,), (direction,))[1],
        }

    out = jax.device_get(compute(theta, direction))
    x_ref, gradient_ref = reference(np.asarray(layout.flat(theta)), weights)
    solution_tol, derivative_tol = TOLERANCE[layout.precision]

    assert out["converged"]
    np.testing.assert_allclose(out["residual"], 0, atol=solution_tol)
    np.testing.assert_allclose(out["x"], x_ref, rtol=solution_tol, atol=solution_tol)
    np.testing.assert_allclose(
        out["gradient"], gradient_ref, rtol=derivative_tol, atol=derivative_tol
    )
    d = np.asarray(layout.flat(direction))
    slopes = {"jvp": float(out["tangent"]), "grad·d": float(out["gradient"] @ d)}
    for name, slope in slopes.items():
        np.testing.assert_allclose(
            slope, gradient_ref @ d, rtol=derivative_tol, atol=derivative_tol, err_msg=name
        )
    if layout.precision == np.float64:
        step = jax.tree.map(lambda t, v: (EPS * v).astype(t.dtype), theta, direction)
        plus = compute(jax.tree.map(jnp.add, theta, step), direction)["loss"]
        minus = compute(jax.tree.map(jnp.subtract, theta, step), direction)["loss"]
        central = float(plus - minus) / (2 * EPS)
        for name, slope in slopes.items():
            np.testing.assert_allclose(
                slope,
                central,
                rtol=CENTRAL_TOLERANCE,
                atol=CENTRAL_TOLERANCE,
                err_msg=f"{name} against the central difference",
            )


# --- Fixed points ----------------------------------------------------------------------------


@compile_fast
def _unrolled_reference(a, b, c, theta, weights):
    """x* and ∇θ(w·x*) by backpropagation through `UNROLL` plain iterations (float64)."""

    def loss(theta):
        x = jax.lax.fori_loop(
            0, UNROLL, lambda _, x: jnp.tanh(a @ x + b @ theta + c), jnp.zeros_like(theta)
        )
        return weights @ x, x

    (_, x), gradient = jax.value_and_grad(loss, has_aux=True)(theta)
    return x, gradient


@SETTINGS
@covering(
    ({"a": ((2,), F32), "b": ((3, 1), F64)}, "FixedPointIteration", "GMRES"),
    ((((4,), F64), ((), F64)), "Anderson", "Neumann"),
    ((((2, 2), F64), ((3,), F32)), "Broyden", "Dense"),
    (((2, 3), F32), "Newton", "BiCGStab"),
)
@given(
    layout=layouts(),
    seed=st.integers(0, 2**16),
    forward=st.sampled_from(sorted(FORWARD)),
    linear=st.sampled_from(sorted(LINEAR)),
)
def test_random_contraction(layout, seed, forward, linear):
    """x = tanh(A·x + B·θ + c) with ‖A‖₂ = 0.7, a contraction; A and B couple all leaves."""
    layout = Layout(layout)
    rng = np.random.default_rng(seed)
    n = layout.size
    a = _random_matrix(rng, n, 0.7)
    b = rng.standard_normal((n, n)) / np.sqrt(n)
    c = rng.standard_normal(n)

    def flat_map(x, theta):
        dtype = x.dtype
        return jnp.tanh(a.astype(dtype) @ x + b.astype(dtype) @ theta + c.astype(dtype))

    fn = layout.pytree_function(flat_map)

    solve = _solve(implicax.fixed_point_solve, fn, layout, forward, linear)

    def reference(theta, weights):
        return jax.device_get(_unrolled_reference(a, b, c, theta, weights))

    _check(layout, solve, lambda x, theta: x - flat_map(x, theta), reference, rng)


def _solve(entry, fn, layout, forward, linear):
    """θ ↦ (x*, stats) by `entry` from zeros, with the named solvers."""

    def solve(theta):
        return entry(
            fn,
            layout.tree(np.zeros(layout.size)),
            theta,
            solver=FORWARD[forward],
            linear_solver=LINEAR[linear],
            return_stats=True,
        )

    return solve


# --- Roots -----------------------------------------------------------------------------------


@SETTINGS
@covering(
    ((((), F32), ((2, 2), F64)), "FixedPointIteration", "Dense"),
    ({"a": ((4,), F32), "b": ((1, 3), F32)}, "Anderson", "GMRES"),
    ({"a": ((3,), F64), "b": ((2,), F32)}, "Broyden", "BiCGStab"),
    (((4, 2), F64), "Newton", "Neumann"),
)
@given(  # drawn in another order than above, so that the two tests see different examples
    linear=st.sampled_from(sorted(LINEAR)),
    forward=st.sampled_from(sorted(FORWARD)),
    seed=st.integers(0, 2**16),
    layout=layouts(),
)
def test_random_root(layout, seed, forward, linear):
    """F(x) = M·x + 0.1·tanh(x) − (B·θ + c), M = I + S with ‖S‖₂ = 0.3 (nonsymmetric).

    The symmetric part of ∂F/∂x is ⪰ 0.7·I, so the root is unique; x − F(x) is a contraction
    (Lipschitz 0.4), so every forward and linear solver applies. Reference: x* by plain
    iteration of that contraction, and ∇θ(w·x*) = Bᵀ·J⁻ᵀ·w with J = M + 0.1·diag(1 − tanh²x*),
    the implicit function theorem solved densely, all in NumPy float64.
    """
    layout = Layout(layout)
    rng = np.random.default_rng(seed)
    n = layout.size
    m = np.eye(n) + _random_matrix(rng, n, 0.3)
    b = rng.standard_normal((n, n)) / np.sqrt(n)
    c = rng.standard_normal(n)

    def flat_residual(x, theta, xp=jnp):
        dtype = x.dtype
        return m.astype(dtype) @ x + 0.1 * xp.tanh(x) - (b.astype(dtype) @ theta + c.astype(dtype))

    fn = layout.pytree_function(flat_residual)

    solve = _solve(implicax.root_solve, fn, layout, forward, linear)

    def reference(theta, weights):
        x = np.zeros(n)
        for _ in range(UNROLL):
            x = x - flat_residual(x, theta, xp=np)
        jacobian = m + 0.1 * np.diag(1 - np.tanh(x) ** 2)
        return x, b.T @ np.linalg.solve(jacobian.T, weights)

    _check(layout, solve, flat_residual, reference, rng)
