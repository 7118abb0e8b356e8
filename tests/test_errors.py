"""Bad input gives a clear error that names the problem: at trace time for malformed input
(structure, shape, dtype, non-callables, invalid options), as a reported solve failure for
non-finite values (which are only known at run time).

The matrix: every public entry point (root_solve, fixed_point_solve, compat.two_phase_solve,
testing.check_derivatives, testing.check_against_unrolled and the DEQ layers of the Flax linen,
Flax NNX and Haiku adapters) × mismatched structure, shape and dtype, integer input, NaN/inf
input, non-callable function and invalid option, one test per row. Integer input to a DEQ
layer without z0 is tested with each adapter (test_flax_linen.py, test_flax_nnx.py,
test_haiku.py: test_integer_input_needs_z0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicax
from implicax.compat import two_phase_solve
from implicax.testing import check_against_unrolled, check_derivatives

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
        ({"max_steps": 0}, ValueError, r"max_steps must be between 1 and 2\*\*31 - 1"),
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
        (
            lambda: implicax.Anderson(regularization=-1.0),
            "regularization must be a finite float >= 0",
        ),
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


# --- Non-finite input: a reported failure, never a silent answer ------------------------------


@pytest.mark.parametrize("solve", ENTRY_POINTS)
@pytest.mark.parametrize("where", ["x0", "params"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_input_is_a_reported_failure(solve, where, value):
    # good(x, p) = tanh(x·p) is bounded, so at x = inf the residual is finite: the solution
    # itself must be finite for the solve to count as converged.
    x0 = jnp.array([0.0, value]) if where == "x0" else jnp.zeros(2)
    params = jnp.array([0.5, value]) if where == "params" else jnp.full(2, 0.5)
    with pytest.warns(RuntimeWarning, match="forward solve did not converge"):
        _, stats = solve(good, x0, params, return_stats=True)
    assert not bool(stats.converged)
    assert np.all(np.isnan(solve(good, x0, params, on_failure="nan")))


@pytest.mark.parametrize("solve", ENTRY_POINTS)
def test_non_finite_input_raises_with_raise_policy(solve):
    with pytest.raises(RuntimeError, match="forward solve did not converge"):
        jax.block_until_ready(
            solve(good, jnp.zeros(2), jnp.array([0.5, np.nan]), on_failure="raise")
        )


@pytest.mark.parametrize("solve", ENTRY_POINTS)
def test_non_finite_params_give_nan_gradient(solve):
    def loss(p):
        return jnp.sum(solve(good, jnp.zeros(2), p, on_failure="nan"))

    assert np.all(np.isnan(jax.grad(loss)(jnp.array([0.5, np.nan]))))


def test_callable_solver_returning_inf_is_not_converged():
    with pytest.warns(RuntimeWarning, match="forward solve did not converge"):
        _, stats = implicax.root_solve(
            good, jnp.zeros(2), 0.5, solver=lambda fn, x0, p: x0 + jnp.inf, return_stats=True
        )
    assert not bool(stats.converged)


# --- implicax.compat.two_phase_solve ----------------------------------------------------------


def half_tanh(p):
    return lambda x: 0.5 * jnp.tanh(x) + p


@pytest.mark.filterwarnings("ignore:implicax.compat.two_phase_solve is deprecated")
class TestTwoPhaseSolve:
    def test_structure_mismatch(self):
        with pytest.raises(TypeError, match="same pytree structure as x0"):
            two_phase_solve(lambda p: lambda x: (x, x), jnp.zeros(2), 1.0)

    def test_shape_mismatch(self):
        with pytest.raises(TypeError, match=r"got shape \(3,\), expected \(2,\)"):
            two_phase_solve(lambda p: lambda x: jnp.zeros(3), jnp.zeros(2), 1.0)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="got float32, expected float64"):
            two_phase_solve(lambda p: lambda x: x.astype(jnp.float32), jnp.zeros(2), 1.0)

    def test_integer_init_xs(self):
        with pytest.raises(TypeError, match="x0 must hold floating-point arrays.*int32"):
            two_phase_solve(half_tanh, jnp.zeros(2, jnp.int32), 1.0)

    def test_nan_params(self):
        with pytest.warns(RuntimeWarning, match="forward solve did not converge"):
            x = two_phase_solve(half_tanh, jnp.zeros(2), jnp.array([0.1, np.nan]))
        assert not np.all(np.isfinite(x))

    def test_non_callable_param_func(self):
        with pytest.raises(TypeError, match="param_func must be callable"):
            two_phase_solve(jnp.ones(2), jnp.zeros(2), 1.0)

    def test_param_func_returning_an_array(self):
        with pytest.raises(TypeError, match=r"param_func\(params\) must return a callable"):
            two_phase_solve(lambda p: p * jnp.ones(2), jnp.zeros(2), 1.0)

    @pytest.mark.parametrize(
        "solvers, match",
        [
            ("fixed_point", "solvers must be a sequence of callables"),
            ([3], r"solvers\[0\] is 3"),
            (lambda x, p: x, r"got one callable .*; pass \[solver\]"),
            (7, "solvers must be a sequence of callables"),
        ],
    )
    def test_invalid_solvers(self, solvers, match):
        with pytest.raises(TypeError, match=match):
            two_phase_solve(half_tanh, jnp.zeros(2), 1.0, solvers=solvers)

    def test_solver_output_is_checked(self):
        with pytest.raises(TypeError, match="the solver's output must have the shapes of x0"):
            two_phase_solve(half_tanh, jnp.zeros(2), 1.0, solvers=[lambda f, x, p: jnp.zeros(3)])


# --- implicax.testing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: check_derivatives(3, (1.0,)), TypeError, "f must be callable"),
        (lambda: check_derivatives(jnp.sin, 1.0), TypeError, r"args must be a tuple.*write \(x,\)"),
        (
            lambda: check_derivatives(jnp.sin, ({"a": 1.0, "b": 2},)),
            TypeError,
            r"args\[0\]\['b'\] has dtype int",
        ),
        (
            lambda: check_derivatives(jnp.sin, (jnp.array([1.0, np.nan]),)),
            ValueError,
            r"args\[0\] is not finite",
        ),
        (lambda: check_derivatives(jnp.sin, (np.inf,)), ValueError, "not finite"),
        (
            lambda: check_derivatives(jnp.sin, (1.0,), order=0),
            ValueError,
            "order must be an int >= 1",
        ),
        (lambda: check_derivatives(jnp.sin, (1.0,), modes="rev"), TypeError, r"write \('rev',\)"),
        (lambda: check_derivatives(jnp.sin, (1.0,), modes=()), ValueError, "modes is empty"),
        (lambda: check_derivatives(jnp.sin, (1.0,), modes=("bwd",)), ValueError, "unknown modes"),
        (
            lambda: check_derivatives(jnp.sin, (1.0,), transforms=("xmap",)),
            ValueError,
            "unknown transforms",
        ),
        (
            lambda: check_derivatives(jnp.sin, (1.0,), atol=-1.0),
            ValueError,
            "atol must be a finite float >= 0",
        ),
        (
            lambda: check_derivatives(jnp.sin, (1.0,), eps=0.0),
            ValueError,
            "eps must be a finite float > 0",
        ),
    ],
)
def test_check_derivatives_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_check_derivatives_fails_on_a_non_finite_value():
    # NaN finite differences would compare equal to NaN derivatives: the check must not pass.
    with pytest.raises(AssertionError, match="output is not finite"):
        check_derivatives(lambda x: jnp.log(x - 2.0), (1.0,), transforms=("none",))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: check_against_unrolled(3, jnp.zeros(2), 0.5), TypeError, "fn must be callable"),
        (
            lambda: check_against_unrolled(lambda x, p: (x, x), jnp.zeros(2), 0.5),
            TypeError,
            "same pytree structure as x0",
        ),
        (
            lambda: check_against_unrolled(lambda x, p: jnp.zeros(3), jnp.zeros(2), 0.5),
            TypeError,
            "must have the shapes of x0",
        ),
        (
            lambda: check_against_unrolled(lambda x, p: x.astype(jnp.float32), jnp.zeros(2), 0.5),
            TypeError,
            "got float32, expected float64",
        ),
        (
            lambda: check_against_unrolled(good, jnp.zeros(2, jnp.int32), 0.5),
            TypeError,
            "x0 must hold floating-point arrays",
        ),
        (
            lambda: check_against_unrolled(good, jnp.zeros(2), (0.5, 2)),
            TypeError,
            r"params\[1\] has dtype int",
        ),
        (
            lambda: check_against_unrolled(good, jnp.zeros(2), {"p": np.nan}),
            ValueError,
            r"params\['p'\] is not finite",
        ),
        (
            lambda: check_against_unrolled(good, jnp.array([0.0, np.inf]), 0.5),
            ValueError,
            "x0 is not finite",
        ),
        (
            lambda: check_against_unrolled(good, jnp.zeros(2), 0.5, steps=0),
            ValueError,
            "steps must be an int >= 1",
        ),
        (
            lambda: check_against_unrolled(good, jnp.zeros(2), 0.5, rtol=-1e-6),
            ValueError,
            "rtol must be a finite float >= 0",
        ),
        (
            lambda: check_against_unrolled(good, jnp.zeros(2), 0.5, solver="anderson"),
            TypeError,
            "solver must be an implicax solver",
        ),
        (
            lambda: check_against_unrolled(good, jnp.zeros(2), 0.5, return_stats=True),
            TypeError,
            "return_stats is not supported",
        ),
    ],
)
def test_check_against_unrolled_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- The DEQ layers of the adapters -----------------------------------------------------------
# Each adapter passes the cell through implicax.fixed_point_solve, whose checks name the
# problem (in its terms: the cell is fn, z0 is x0); the adapters check only the cell itself.

X = np.linspace(-1.0, 1.0, 6).reshape(2, 3)


def _bad_output(z, kind):
    return {
        "ok": z,
        "shape": z[:, :2],
        "structure": (z, z),
        "dtype": z.astype(jnp.float32),
    }[kind]


def _linen_layer(cell_kind, **kwargs):
    nn = pytest.importorskip("flax.linen")
    from implicax_flax import DEQ

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return _bad_output(0.5 * jnp.tanh(0.1 * nn.Dense(3)(z) + x), cell_kind)

    cell = 3 if cell_kind == "non-callable" else Cell()
    return lambda z0=None: DEQ(cell, **kwargs).init(jax.random.key(0), X, z0)


def _nnx_layer(cell_kind, **kwargs):
    nnx = pytest.importorskip("flax.nnx")
    from implicax_flax.nnx import DEQ

    class Cell(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

        def __call__(self, z, x):
            return _bad_output(0.5 * jnp.tanh(0.1 * self.linear(z) + x), cell_kind)

    def run(z0=None):
        cell = 3 if cell_kind == "non-callable" else Cell()
        return DEQ(cell, **kwargs)(X, z0)

    return run


def _haiku_layer(cell_kind, **kwargs):
    hk = pytest.importorskip("haiku")
    from implicax_haiku import DEQ

    def cell(z, x):
        return _bad_output(0.5 * jnp.tanh(0.1 * hk.Linear(3)(z) + x), cell_kind)

    def run(z0=None):
        chosen = 3 if cell_kind == "non-callable" else cell
        return hk.transform(lambda x: DEQ(chosen, **kwargs)(x, z0)).init(jax.random.key(0), X)

    return run


@pytest.mark.parametrize(
    "layer", [_linen_layer, _nnx_layer, _haiku_layer], ids=["linen", "nnx", "haiku"]
)
class TestDEQBadInput:
    def test_non_callable_cell(self, layer):
        with pytest.raises(TypeError, match="DEQ: cell must be"):
            layer("non-callable")()

    def test_cell_output_structure(self, layer):
        with pytest.raises(
            TypeError, match="DEQ: cell .* must have the same pytree structure as z"
        ):
            layer("structure")()

    def test_cell_output_shape(self, layer):
        with pytest.raises(TypeError, match=r"got shape \(2, 2\), expected \(2, 3\)"):
            layer("shape")()

    def test_cell_output_dtype(self, layer):
        with pytest.raises(TypeError, match="got float32, expected float64"):
            layer("dtype")()

    def test_integer_z0(self, layer):
        with pytest.raises(TypeError, match="[xz]0 must hold floating-point arrays.*int32"):
            layer("ok")(jnp.zeros((2, 3), jnp.int32))

    def test_nan_z0_is_a_reported_failure(self, layer):
        # The report names the layer (linen: its path; Haiku: its module name; NNX: its class).
        with pytest.warns(RuntimeWarning, match="forward solve of '(DEQ|deq)' did not converge"):
            jax.block_until_ready(layer("ok")(jnp.full((2, 3), jnp.nan)))

    def test_a_policy_per_phase(self, layer):
        with pytest.raises(ValueError, match="unknown keys"):
            layer("ok", on_failure={"backwards": "ignore"})()
        policy = {"forward": "ignore", "derivative": "raise"}
        jax.block_until_ready(layer("ok", on_failure=policy)(jnp.full((2, 3), jnp.nan)))

    def test_bad_solver(self, layer):
        with pytest.raises(TypeError, match="solver must be an implicax solver"):
            layer("ok", solver="anderson")()

    def test_bad_linear_solver(self, layer):
        with pytest.raises(TypeError, match="linear_solver must be an implicax linear solver"):
            layer("ok", linear_solver="gmres")()

    def test_bad_failure_policy(self, layer):
        with pytest.raises(ValueError, match="on_failure must be one of"):
            layer("ok", on_failure="explode")()


# --- options a user gets wrong in practice ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"solver": implicax.Anderson},
            r"got the class Anderson; pass an instance: solver=Anderson\(\)",
        ),
        ({"linear_solver": implicax.GMRES}, r"pass an instance: linear_solver=GMRES\(\)"),
    ],
)
def test_a_solver_class_instead_of_an_instance(kwargs, match):
    # Before: a class passed for a callable; GMRES failed only when differentiated.
    with pytest.raises(TypeError, match=match):
        implicax.fixed_point_solve(lambda x, p: 0.5 * x + p, jnp.zeros(2), 1.0, **kwargs)
    with pytest.raises(TypeError, match=r"Newton: linear_solver .* pass an instance"):
        implicax.Newton(linear_solver=implicax.CG)


@pytest.mark.parametrize("steps", [2**31, 2**40])
def test_max_steps_beyond_int32_is_rejected(steps):
    # Before: wrapped to 0 steps with x64 on (x0 returned), OverflowError at solve time without.
    with pytest.raises(ValueError, match=r"between 1 and 2\*\*31 - 1"):
        implicax.FixedPointIteration(max_steps=steps)
    implicax.FixedPointIteration(max_steps=2**31 - 1)  # the largest is fine


def test_numpy_scalars_are_valid_options():
    solver = implicax.Anderson(
        damping=np.float32(0.5),
        history=np.int64(3),
        regularization=np.float32(0),
        max_steps=np.int64(99),
    )
    assert (type(solver.damping), type(solver.history)) == (float, int)
    gmres = implicax.GMRES(restart=np.int32(4), rtol=np.float32(1e-8))
    x = implicax.fixed_point_solve(
        lambda x, p: 0.5 * x + p, jnp.zeros(3), jnp.ones(3), solver=solver, linear_solver=gmres
    )
    np.testing.assert_allclose(x, 2.0, rtol=1e-8)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: implicax.FixedPointIteration(damping="0.5"),
            r"damping must be a float in \(0, 1\], got '0.5'",
        ),
        (lambda: implicax.Anderson(history=2.0), "history must be an int >= 1, got 2.0"),
        (lambda: implicax.Anderson(regularization="0"), "regularization must be a float >= 0"),
        (lambda: implicax.Broyden(damping=jnp.float32(0.5)), "damping must be a float"),
    ],
)
def test_options_of_the_wrong_type(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_float8_x0_is_rejected_clearly():
    with pytest.raises(TypeError, match="8-bit .* too coarse"):
        implicax.fixed_point_solve(lambda x, p: 0.5 * x, jnp.zeros(3, jnp.float8_e4m3fn), None)


def test_a_callable_linear_solver_returning_x_and_info():
    def loss(p):
        x = implicax.fixed_point_solve(
            lambda x, p: 0.5 * x + p, jnp.zeros(3), p, linear_solver=jax.scipy.sparse.linalg.cg
        )
        return jnp.sum(x)

    with pytest.raises(TypeError, match=r"returns \(x, info\).*cg\(matvec, b\)\[0\]"):
        jax.grad(loss)(1.0)
