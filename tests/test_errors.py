"""Bad input gives a clear error at trace time that names the problem."""

import jax
import jax.numpy as jnp
import pytest

import implicax

ENTRY_POINTS = [implicax.root_solve, implicax.fixed_point_solve]


def good(x, p):
    return jnp.tanh(x * p)


@pytest.mark.parametrize("solve", ENTRY_POINTS)
class TestBadInput:
    def test_structure_mismatch(self, solve):
        with pytest.raises(TypeError, match="same pytree structure as x0"):
            solve(lambda x, p: (x, x), jnp.zeros(2), 1.0)

    def test_shape_mismatch(self, solve):
        with pytest.raises(TypeError, match=r"at \['b'\] got shape \(3,\), expected \(2,\)"):
            solve(lambda x, p: {"a": x["a"], "b": jnp.zeros(3)}, {"a": 0.0, "b": jnp.zeros(2)}, 1.0)

    def test_dtype_mismatch(self, solve):
        with pytest.raises(TypeError, match="got float64, expected float32"):
            solve(lambda x, p: x.astype(jnp.float64), jnp.zeros(2, jnp.float32), 1.0)

    def test_integer_x0(self, solve):
        with pytest.raises(TypeError, match="x0 must hold floating-point arrays.*int32"):
            solve(good, jnp.zeros(2, jnp.int32), 1.0)

    def test_empty_x0(self, solve):
        with pytest.raises(ValueError, match="at least one array"):
            solve(good, {}, 1.0)

    def test_non_callable_fn(self, solve):
        with pytest.raises(TypeError, match="fn must be callable"):
            solve(jnp.ones(2), jnp.zeros(2), 1.0)

    def test_bad_solver(self, solve):
        with pytest.raises(TypeError, match="solver must be an implicax solver"):
            solve(good, jnp.zeros(2), 1.0, solver="anderson")

    def test_bad_linear_solver(self, solve):
        with pytest.raises(TypeError, match="linear_solver must be an implicax linear solver"):
            solve(good, jnp.zeros(2), 1.0, linear_solver="gmres")

    def test_bad_failure_policy(self, solve):
        with pytest.raises(ValueError, match="on_failure must be one of"):
            solve(good, jnp.zeros(2), 1.0, on_failure="explode")

    def test_errors_are_raised_under_jit(self, solve):
        with pytest.raises(TypeError, match="same pytree structure"):
            jax.jit(lambda x0: solve(lambda x, p: [x], x0, 1.0))(jnp.zeros(2))


ALL_SOLVERS = [
    implicax.FixedPointIteration,
    implicax.Anderson,
    implicax.Broyden,
    implicax.Newton,
    implicax.CG,
    implicax.GMRES,
    implicax.BiCGStab,
    implicax.Neumann,
]


@pytest.mark.parametrize("cls", ALL_SOLVERS)
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rtol": -1e-3}, ValueError, "rtol must be finite and >= 0"),
        ({"atol": float("nan")}, ValueError, "atol must be finite and >= 0"),
        ({"rtol": "small"}, TypeError, "rtol must be a float"),
        ({"max_steps": 0}, ValueError, "max_steps must be >= 1"),
        ({"max_steps": 2.5}, TypeError, "max_steps must be an int"),
        ({"tolerance": 1e-3}, TypeError, "unexpected keyword argument 'tolerance'"),
    ],
)
def test_invalid_solver_options(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: implicax.Anderson(history=0), "history must be an int >= 1"),
        (lambda: implicax.Anderson(damping=1.5), r"damping must be a float in \(0, 1\]"),
        (lambda: implicax.Anderson(regularization=-1.0), "regularization must be >= 0"),
        (lambda: implicax.Broyden(history=-2), "history must be an int >= 1"),
        (lambda: implicax.FixedPointIteration(damping=0.0), "damping must be a float"),
        (lambda: implicax.GMRES(restart=0), "restart must be an int >= 1"),
        (lambda: implicax.Newton(damping=2.0), "damping must be a float"),
    ],
)
def test_invalid_method_specific_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_newton_rejects_a_non_callable_linear_solver():
    with pytest.raises(TypeError, match="linear_solver must be"):
        implicax.Newton(linear_solver=3)


def test_solvers_are_immutable():
    solver = implicax.Anderson()
    with pytest.raises(AttributeError):
        solver.history = 3  # type: ignore[misc]


def test_callable_solver_output_is_checked():
    with pytest.raises(TypeError, match="the solver's output must have the shapes of x0"):
        implicax.fixed_point_solve(good, jnp.zeros(2), 0.5, solver=lambda fn, x0, p: jnp.zeros(3))
