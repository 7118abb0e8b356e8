"""Regression tests for real problem structure: pytree leaves the differentiated inputs do not
reach, undifferentiated inputs, and dtype promotion. Each case crashed or did needless work
before its fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicax
from implicax.testing import check_derivatives

# --- a leaf whose residual does not depend on the differentiated inputs ---------------------


def _blocks(v, lam):
    """u·(1 + λ) = 1 and 2w = 1: only u depends on λ."""
    return {"u": v["u"] * (1 + lam) - 1.0, "w": v["w"] * 2.0 - 1.0}


V0 = {"u": jnp.zeros(3), "w": jnp.zeros(2)}


def _total(lam):
    v = implicax.root_solve(_blocks, V0, lam)
    return v["u"].sum() + v["w"].sum()  # 3 / (1 + λ) + 1


TRANSFORMS = {
    "grad": (jax.grad, 1),
    "jacrev": (jax.jacrev, 1),
    "jacfwd": (jax.jacfwd, 1),
    "hessian": (jax.hessian, 2),
    "jacfwd-jacrev": (lambda f: jax.jacfwd(jax.jacrev(f)), 2),
    "jacrev-jacfwd": (lambda f: jax.jacrev(jax.jacfwd(f)), 2),
    "jacrev-jacrev-jacrev": (lambda f: jax.jacrev(jax.jacrev(jax.jacrev(f))), 3),
    "jacfwd-hessian": (lambda f: jax.jacfwd(jax.hessian(f)), 3),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_leaf_the_inputs_do_not_reach_in_every_mode(name):
    transform, order = TRANSFORMS[name]
    lam = 0.5
    # d^k/dλ^k 3/(1 + λ) = 3·(−1)^k·k! / (1 + λ)^(k+1)
    expected = 3 * (-1) ** order * np.prod(np.arange(1, order + 1)) / (1 + lam) ** (order + 1)
    np.testing.assert_allclose(transform(_total)(lam), expected, rtol=1e-10)


def _ridge_optimality(wb, params):
    """Gradient of ½‖Xw + b − y‖² + ½λ‖w‖²: the bias b is not penalised."""
    lam, X, y = params
    r = X @ wb["w"] + wb["b"] - y
    return {"w": X.T @ r + lam * wb["w"], "b": jnp.sum(r)}


def _ridge_data():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.standard_normal((8, 3))), jnp.asarray(rng.standard_normal(8))


def test_ridge_with_an_unpenalised_bias_matches_the_normal_equations():
    X, y = _ridge_data()
    wb0 = {"w": jnp.zeros(3), "b": jnp.zeros(())}

    def solved(lam):
        wb = implicax.root_solve(_ridge_optimality, wb0, (lam, X, y))
        return jnp.concatenate([wb["w"], wb["b"][None]])

    def closed_form(lam):
        A = jnp.concatenate([X, jnp.ones((8, 1))], axis=1)
        penalty = jnp.diag(jnp.array([1.0, 1.0, 1.0, 0.0])) * lam
        return jnp.linalg.solve(A.T @ A + penalty, A.T @ y)

    lam = 0.7
    for transform in (jax.jacrev, jax.jacfwd, lambda f: jax.jacrev(jax.jacrev(f))):
        np.testing.assert_allclose(transform(solved)(lam), transform(closed_form)(lam), rtol=1e-8)
    check_derivatives(lambda lam: solved(lam), (jnp.asarray(lam),), order=2, transforms=("none",))


def test_the_gradient_with_respect_to_one_of_two_hyperparameters():
    def fn(v, params):
        a, b = params
        return {"p": v["p"] * (1 + a) - 1.0, "q": v["q"] * (2 + b) - v["p"]}

    v0 = {"p": jnp.zeros(2), "q": jnp.zeros(2)}

    def loss(a, b):
        v = implicax.root_solve(fn, v0, (a, b))
        return jnp.sum(v["p"]) + jnp.sum(v["q"])  # 2/(1+a) + 2/((1+a)(2+b))

    a, b = 0.3, 0.4
    expected_a = -2 / (1 + a) ** 2 - 2 / ((1 + a) ** 2 * (2 + b))
    expected_b = -2 / ((1 + a) * (2 + b) ** 2)
    np.testing.assert_allclose(jax.grad(loss, argnums=0)(a, b), expected_a, rtol=1e-10)
    np.testing.assert_allclose(jax.grad(loss, argnums=1)(a, b), expected_b, rtol=1e-10)
    # Only b: p's residual does not depend on it.
    np.testing.assert_allclose(
        jax.jacrev(jax.grad(loss, argnums=1), argnums=1)(a, b),
        4 / ((1 + a) * (2 + b) ** 3),
        rtol=1e-10,
    )


def test_undifferentiated_inputs_cost_no_derivative_work():
    """A parameter that is not differentiated never has its tangent formed."""
    seen = []

    @jax.custom_jvp
    def tap(w):
        return w

    @tap.defjvp
    def _tap_jvp(primals, tangents):
        seen.append(True)
        return tap(primals[0]), tangents[0]

    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.standard_normal((4, 4))) * 0.2
    x = jnp.asarray(rng.standard_normal(4))
    fn = lambda z, p: jnp.tanh(tap(p[0]) @ z + p[1])  # noqa: E731
    loss = lambda W, x: jnp.sum(implicax.fixed_point_solve(fn, jnp.zeros(4), (W, x)))  # noqa: E731

    jax.grad(loss, argnums=1)(W, x)
    jax.jacfwd(loss, argnums=1)(W, x)
    jax.hessian(loss, argnums=1)(W, x)
    assert not seen
    jax.grad(loss, argnums=0)(W, x)  # the check itself works: differentiating W forms it
    assert seen


# --- strict dtype promotion (optimistix's and equinox's test setting) ------------------------


@pytest.fixture
def strict():
    with jax.numpy_dtype_promotion("strict"):
        yield


STRICT_SOLVERS = {
    "FixedPointIteration": (implicax.FixedPointIteration(max_steps=400), implicax.BiCGStab()),
    "Anderson": (implicax.Anderson(), implicax.GMRES()),
    "Broyden": (implicax.Broyden(), implicax.CG()),
    "Newton": (implicax.Newton(), implicax.Dense()),
    "Neumann": (implicax.FixedPointIteration(max_steps=400), implicax.Neumann()),
}


def _affine(v, p):
    """v = ½·v + p, leafwise in each leaf's dtype: v* = 2p, ∂v*/∂p = 2."""
    return jax.tree.map(lambda a, b: 0.5 * a + b, v, p)


@pytest.mark.parametrize("name", list(STRICT_SOLVERS))
@pytest.mark.parametrize(
    "dtypes", [("float32",), ("float64",), ("bfloat16",), ("float32", "float64", "bfloat16")]
)
def test_strict_promotion(strict, name, dtypes):
    solver, linear_solver = STRICT_SOLVERS[name]
    p = {f"leaf{i}": jnp.full((3,), 0.25 * (i + 1), d) for i, d in enumerate(dtypes)}
    v0 = jax.tree.map(jnp.zeros_like, p)

    def loss(p):
        v = implicax.fixed_point_solve(_affine, v0, p, solver=solver, linear_solver=linear_solver)
        return sum(jnp.sum(leaf.astype(jnp.float64)) for leaf in jax.tree.leaves(v))

    # bfloat16 sets the default tolerance (eps**(2/3) = 0.04 on the step): a few percent.
    rtol = 0.1 if "bfloat16" in dtypes else 1e-4
    for leaf, dtype in zip(jax.tree.leaves(v0), dtypes):
        assert leaf.dtype == jnp.dtype(dtype)
    expected = sum(6 * 0.25 * (i + 1) for i in range(len(dtypes)))
    np.testing.assert_allclose(loss(p), expected, rtol=rtol)
    for g in jax.tree.leaves(jax.grad(loss)(p)):
        np.testing.assert_allclose(g.astype(jnp.float64), 2.0, rtol=rtol)
    tangent = jax.tree.map(jnp.ones_like, p)
    np.testing.assert_allclose(jax.jvp(loss, (p,), (tangent,))[1], 2.0 * 3 * len(dtypes), rtol=rtol)


def test_strict_promotion_root_solve_float64(strict):
    # Before: TypePromotionError from jnp.promote_types(dtype, jnp.float32) in every float64 solve.
    f = lambda x, c: x**2 - c  # noqa: E731
    x = implicax.root_solve(f, jnp.float64(1.0), jnp.float64(2.0))
    np.testing.assert_allclose(x, np.sqrt(2.0), rtol=1e-12)
    np.testing.assert_allclose(
        jax.hessian(lambda c: implicax.root_solve(f, jnp.float64(1.0), c))(jnp.float64(2.0)),
        -0.25 * 2.0**-1.5,
        rtol=1e-9,
    )


# --- eager calls: no recompilation, and no stale values ----------------------------------------


@pytest.fixture
def compilations():
    """A list that grows by one per XLA compilation while the test runs."""
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


def _sine_map(x, p):
    return 0.5 * jnp.sin(x) + p


def _square_root(x, c):
    return x**2 - c


EAGER = {
    "fixed_point_solve": lambda: implicax.fixed_point_solve(_sine_map, jnp.zeros(3), jnp.ones(3)),
    "root_solve": lambda: implicax.root_solve(_square_root, jnp.ones(()), jnp.float64(2.0)),
    "grad": lambda: jax.grad(lambda c: implicax.root_solve(_square_root, jnp.ones(()), c))(2.0),
    "hessian": lambda: jax.hessian(lambda c: implicax.root_solve(_square_root, jnp.ones(()), c))(
        2.0
    ),
    "vmap": lambda: jax.vmap(lambda p: implicax.fixed_point_solve(_sine_map, jnp.zeros(3), p))(
        jnp.ones((2, 3))
    ),
}


@pytest.mark.parametrize("name", list(EAGER))
def test_repeated_eager_calls_do_not_recompile(compilations, name):
    # Before: every call compiled its loops again (0.1 s to 5 s per call).
    first = EAGER[name]()
    assert compilations, "the first call compiles"
    del compilations[:]
    again = EAGER[name]()
    assert compilations == []
    np.testing.assert_array_equal(again, first)


def test_eager_calls_see_changed_globals_and_closed_over_arrays():
    # Before: jax.make_jaxpr cached fn's trace by identity, so later calls silently used the
    # values of the first (x = 2.2 three times).
    values = {"shift": 0.1, "scale": jnp.ones(3)}
    fn = lambda x, p: 0.5 * x + values["shift"] + values["scale"] * p  # noqa: E731
    solve = lambda: implicax.fixed_point_solve(fn, jnp.zeros(3), 1.0)  # noqa: E731
    np.testing.assert_allclose(solve(), 2.2, rtol=1e-9)
    values["shift"] = 0.2
    np.testing.assert_allclose(solve(), 2.4, rtol=1e-9)
    values["scale"] = 2 * jnp.ones(3)
    np.testing.assert_allclose(solve(), 4.4, rtol=1e-9)


def test_a_callable_solver_reading_a_changed_global_is_retraced():
    steps = {"n": 1}

    def few_steps(f, x0, p):
        return jax.lax.fori_loop(0, steps["n"], lambda _, x: f(x, p), x0)

    fn = lambda x, p: 0.5 * x + p  # noqa: E731
    solve = lambda: implicax.fixed_point_solve(  # noqa: E731
        fn, jnp.zeros(()), 1.0, solver=few_steps, on_failure="ignore"
    )
    np.testing.assert_allclose(solve(), 1.0)
    steps["n"] = 2
    np.testing.assert_allclose(solve(), 1.5)


@pytest.mark.parametrize("solver", [implicax.FixedPointIteration(), implicax.Anderson()])
def test_a_forward_call_traces_fn_once(solver):
    traces = []

    def fn(x, p):
        traces.append(None)
        return 0.5 * x + p

    implicax.fixed_point_solve(fn, jnp.zeros(3), jnp.ones(3), solver=solver)
    assert len(traces) == 1


def test_the_documented_error_bound_of_a_slow_contraction():
    # docs/failures.md: the error can be rho / (1 - rho) times the last step, converged or not.
    rho = 0.9999
    solver = implicax.FixedPointIteration(max_steps=100_000)
    x, stats = implicax.fixed_point_solve(
        lambda x, p: rho * x + p,
        jnp.float32(0),
        jnp.float32(1 - rho),
        solver=solver,
        return_stats=True,
    )
    assert bool(stats.converged) and abs(float(x) - 1.0) > 0.3  # converged, yet far off
    assert abs(float(x) - 1.0) <= rho / (1 - rho) * float(stats.residual_norm) * 1.1


# --- reports a user can act on ---------------------------------------------------------------


def _diverging(x, p):
    return 2 * x + p


def test_a_warning_points_at_the_call_of_the_solve():
    # Before: every warning pointed at implicax's own source line.
    with pytest.warns(RuntimeWarning, match="forward solve did not converge") as record:
        implicax.fixed_point_solve(_diverging, jnp.zeros(2), 1.0)
    assert record[0].filename == __file__
    line = record[0].lineno
    with open(__file__) as source:
        assert "implicax.fixed_point_solve(_diverging" in source.read().splitlines()[line - 1]


def test_raise_outside_jit_is_a_solve_error_naming_the_call(caplog):
    # Before: jax.errors.JaxRuntimeError "INTERNAL: CpuCallback error ..." and a logged traceback.
    with pytest.raises(implicax.SolveError, match=r"forward solve did not converge.*test_robust"):
        implicax.fixed_point_solve(_diverging, jnp.zeros(2), 1.0, on_failure="raise")
    assert not [r for r in caplog.records if r.name == "jax._src.callback"]


def test_raise_inside_jit_carries_the_message():
    solve = jax.jit(
        lambda p: implicax.fixed_point_solve(_diverging, jnp.zeros(2), p, on_failure="raise")
    )
    with pytest.raises(jax.errors.JaxRuntimeError, match="SolveError: implicax: the forward solve"):
        jax.block_until_ready(solve(1.0))


def _steps_of_gradient_descent(fn, x0, p, steps=20):
    x = x0
    for _ in range(steps):
        x = x - 0.1 * fn(x, p)
    return x


def _square_root(x, p):
    return x**2 - p


def test_a_callable_solver_stopped_early_is_not_converged():
    # Before: "converged" meant finite, so a loop that left a residual of 2e-3 passed.
    x, stats = implicax.root_solve(
        _square_root, jnp.ones(()), 2.0, solver=_steps_of_gradient_descent,
        on_failure="ignore", return_stats=True,
    )  # fmt: skip
    assert abs(float(x**2 - 2.0)) > 1e-3
    assert not bool(stats.converged) and not bool(stats.diverged) and int(stats.steps) == -1
    np.testing.assert_allclose(stats.residual_norm, abs(float(x**2 - 2.0)), rtol=1e-12)
    with pytest.warns(RuntimeWarning, match=r"forward solve did not converge \(residual 0\.00"):
        implicax.root_solve(_square_root, jnp.ones(()), 2.0, solver=_steps_of_gradient_descent)


def test_a_callable_solver_meets_the_tolerance_it_is_given():
    # max|F(x)| <= atol + rtol·max|F(x0)| = 1e-2 + 1e-2·1 passes; 1e-4 does not.
    loose = implicax.CallableSolver(_steps_of_gradient_descent, rtol=1e-2)
    _, stats = implicax.root_solve(_square_root, jnp.ones(()), 2.0, solver=loose, return_stats=True)
    assert bool(stats.converged)
    tight = implicax.CallableSolver(_steps_of_gradient_descent, rtol=1e-4)
    _, stats = implicax.root_solve(
        _square_root, jnp.ones(()), 2.0, solver=tight, on_failure="ignore", return_stats=True
    )
    assert not bool(stats.converged)

    # A fixed point: |x_i − g(x)_i| <= atol + rtol·|x_i|; x = 3.99 for x = x/2 + 2 leaves 0.005.
    def near(fn, x0, p):
        return jnp.full_like(x0, 3.99)

    for rtol, converged in ((1e-2, True), (1e-4, False)):
        _, stats = implicax.fixed_point_solve(
            lambda x, p: 0.5 * x + p, jnp.zeros(3), 2.0,
            solver=implicax.CallableSolver(near, rtol=rtol, atol=0.0),
            on_failure="ignore", return_stats=True,
        )  # fmt: skip
        assert bool(stats.converged) is converged
    # An exact answer passes the default tolerance, and its derivative is the implicit one.
    exact = lambda fn, x0, p: jnp.sqrt(p) * jnp.ones_like(x0)  # noqa: E731
    grad = jax.grad(lambda p: implicax.root_solve(_square_root, jnp.ones(()), p, solver=exact))
    np.testing.assert_allclose(grad(2.0), 0.5 / np.sqrt(2.0), rtol=1e-12)


def test_a_callable_solvers_tolerance_may_be_traced():
    solve = jax.jit(
        lambda rtol: implicax.root_solve(
            _square_root, jnp.ones(()), 2.0, return_stats=True, on_failure="ignore",
            solver=implicax.CallableSolver(_steps_of_gradient_descent, rtol=rtol),
        )[1].converged
    )  # fmt: skip
    assert bool(solve(jnp.float64(1e-2))) and not bool(solve(jnp.float64(1e-4)))


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ((3,), TypeError, "function must be callable"),
        ((implicax.Anderson,), TypeError, r"pass an instance: function=Anderson\(\)"),
        ((_square_root, -1.0), ValueError, "rtol must be finite and >= 0"),
        ((_square_root, None, "0.1"), TypeError, "atol must be a float or None"),
    ],
)
def test_callable_solver_options_are_checked(bad, error, match):
    with pytest.raises(error, match=match):
        implicax.CallableSolver(*bad)


def _one_richardson_step(matvec, b):
    return b  # x = b: for A = I − J, the residual is J·b


def test_a_callable_linear_solver_is_checked_on_its_true_residual():
    # Before: converged meant finite, so a poor adjoint passed as the derivative.
    def loss(p, linear_solver):
        cell = lambda x, p: 0.5 * x + p  # noqa: E731  (A = 0.5·I; x = b leaves 0.5·|b|)
        return jnp.sum(
            implicax.fixed_point_solve(cell, jnp.zeros(3), p, linear_solver=linear_solver)
        )

    with pytest.warns(RuntimeWarning, match=r"adjoint linear solve did not converge \(residual"):
        jax.grad(loss)(1.0, _one_richardson_step)
    loose = implicax.CallableLinearSolver(_one_richardson_step, rtol=0.6)  # 0.5·‖b‖ passes
    np.testing.assert_allclose(jax.grad(loss)(1.0, loose), 3.0)  # 3·x̄ with x = b: off by 2×
    exact = lambda matvec, b: implicax.GMRES()(matvec, b)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(1.0, exact), 6.0, rtol=1e-10)  # 3 / (1 − 0.5)
    with pytest.raises(ValueError, match="rtol must be finite and >= 0"):
        implicax.CallableLinearSolver(_one_richardson_step, rtol=-1.0)


_LINEAR = jnp.array([[0.5, 0.3], [-0.2, 0.4]])


def _contraction_total(p, **kwargs):
    cell = lambda x, p: jnp.tanh(_LINEAR @ x) + p  # noqa: E731
    return implicax.fixed_point_solve(cell, jnp.zeros(2), p, **kwargs).sum()


def test_forward_and_derivative_failures_have_separate_policies(recwarn):
    # A deliberately truncated backward solve need not silence forward failures.
    truncated = implicax.GMRES(restart=1, max_steps=1)
    policy = {"forward": "raise", "derivative": "ignore"}
    jax.grad(_contraction_total)(jnp.ones(2), linear_solver=truncated, on_failure=policy)
    assert not recwarn.list
    with pytest.raises(implicax.SolveError, match="forward solve"):
        _contraction_total(jnp.ones(2), solver=implicax.FixedPointIteration(max_steps=2),
                           on_failure=policy)  # fmt: skip
    # And the other way round: a forward solve left to "ignore", its derivative raising.
    policy = {"forward": "ignore", "derivative": "raise"}
    grad = jax.grad(_contraction_total)
    with pytest.raises(jax.errors.JaxRuntimeError, match="adjoint linear solve did not converge"):
        jax.block_until_ready(grad(jnp.ones(2), linear_solver=truncated, on_failure=policy))
    # A phase left out is "warn".
    with pytest.warns(RuntimeWarning, match="tangent linear solve did not converge"):
        jax.jvp(
            lambda p: _contraction_total(p, linear_solver=truncated, on_failure={"forward": "raise"}),
            (jnp.ones(2),), (jnp.ones(2),),
        )  # fmt: skip


@pytest.mark.parametrize(
    "policy, match",
    [
        ({"backward": "ignore"}, r"unknown keys \['backward'\]"),
        ({"forward": "explode"}, "on_failure must be one of"),
        (("raise", "ignore"), "on_failure must be one of"),
    ],
)
def test_a_bad_policy_mapping_is_a_clear_error(policy, match):
    with pytest.raises(ValueError, match=match):
        implicax.fixed_point_solve(_diverging, jnp.zeros(2), 1.0, on_failure=policy)


def test_a_solve_carries_its_name_into_reports():
    with pytest.warns(RuntimeWarning, match="the forward solve of 'encoder' did not converge"):
        implicax.fixed_point_solve(_diverging, jnp.zeros(2), 1.0, name="encoder")
    with pytest.raises(implicax.SolveError, match="the forward solve of 'encoder'"):
        implicax.fixed_point_solve(
            _diverging, jnp.zeros(2), 1.0, name="encoder", on_failure="raise"
        )
    with pytest.warns(RuntimeWarning, match="adjoint linear solve of 'deq' did not converge"):
        jax.grad(_contraction_total)(
            jnp.ones(2), linear_solver=implicax.GMRES(restart=1, max_steps=1), name="deq"
        )
    with pytest.raises(TypeError, match="name must be a string or None"):
        implicax.fixed_point_solve(_diverging, jnp.zeros(2), 1.0, name=3)


@jax.custom_jvp
def _wrong_in_y(x, y):
    return jnp.sin(x) * y


@_wrong_in_y.defjvp
def _(primals, tangents):
    (x, y), (dx, dy) = primals, tangents
    return _wrong_in_y(x, y), jnp.cos(x) * y * dx + 1.1 * jnp.sin(x) * dy  # 10% off in y


def _wrong_second_order(x):
    return _wrong_first_order(x)


@jax.custom_jvp
def _wrong_first_order(x):
    return jnp.sin(x)


@_wrong_first_order.defjvp
def _(primals, tangents):
    # Right first derivative; its own derivative is 2·(−sin x) instead of −sin x.
    (x,), (dx,) = primals, tangents
    return jnp.sin(x), _cos_with_wrong_derivative(x) * dx


@jax.custom_jvp
def _cos_with_wrong_derivative(x):
    return jnp.cos(x)


@_cos_with_wrong_derivative.defjvp
def _(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.cos(x), -2 * jnp.sin(x) * dx


def test_check_derivatives_says_which_argument_order_mode_and_transform_failed():
    x = jnp.linspace(0.1, 1.0, 3)
    with pytest.raises(AssertionError, match=r"first derivative of f with respect to args\[1\] "
                       r"in fwd mode .* under transform 'jit'"):  # fmt: skip
        check_derivatives(_wrong_in_y, (x, x), transforms=("jit",))
    with pytest.raises(AssertionError, match=r"with respect to args\[1\] in rev mode .* 'vmap'"):
        check_derivatives(_wrong_in_y, (x, x), modes=("rev",), transforms=("vmap",))
    with pytest.raises(AssertionError, match=r"second derivative of f with respect to args\[0\]"):
        check_derivatives(_wrong_second_order, (x,), order=2, transforms=("none",))
    check_derivatives(_wrong_second_order, (x,), order=1, transforms=("none",))  # passes


# --- fax's solver contracts (implicax.compat) ---------------------------------------------------

pytestmark_fax = pytest.mark.filterwarnings("ignore:implicax.compat.* is deprecated")


def _fax_iterate(param_func, x0, params, steps=400):
    """A fax-style solver: iterate param_func(params) from x0."""
    step = param_func(params)
    return jax.lax.fori_loop(0, steps, lambda _, x: step(x), x0)


def _newton_sqrt(target):
    return lambda x: x - (x**2 - target) / (2 * x)  # fixed point sqrt(target)


@pytestmark_fax
def test_compat_two_phase_solve_calls_fax_solvers_with_three_arguments():
    from implicax.compat import two_phase_solve

    calls = []

    def forward(param_func, x0, params):
        calls.append("forward")
        return _fax_iterate(param_func, x0, params, steps=30)

    def backward(param_func, x0, params):
        calls.append("backward")
        return _fax_iterate(param_func, x0, params)

    target = jnp.array([0.3, 2.0, 7.0])
    solve = lambda t, solvers: two_phase_solve(_newton_sqrt, jnp.ones(3), t, solvers)  # noqa: E731
    np.testing.assert_allclose(solve(target, [forward]), np.sqrt(target), rtol=1e-12)
    assert calls == ["forward"]
    # None is the default solver; the second entry solves the derivative's fixed point.
    grad = jax.grad(lambda t: jnp.sum(solve(t, [None, backward])))(target)
    np.testing.assert_allclose(grad, 0.5 / np.sqrt(target), rtol=1e-10)
    assert calls[0] == "forward" and set(calls[1:]) == {"backward"}


@pytestmark_fax
def test_compat_two_phase_solve_second_order_under_vmap():
    from implicax.compat import two_phase_solve

    def damped_sqrt(target):
        return lambda x: x + 0.1 * (target - x**2)

    solve = lambda t: two_phase_solve(damped_sqrt, t, t)  # noqa: E731
    t = jnp.array([0.2, 0.8, 3.0, 6.0])
    np.testing.assert_allclose(jax.vmap(jax.grad(jax.grad(solve)))(t), -0.25 * t**-1.5, rtol=1e-7)
    np.testing.assert_allclose(jax.vmap(jax.jacfwd(solve))(t), 0.5 * t**-0.5, rtol=1e-8)


@pytestmark_fax
def test_compat_root_solve_with_a_tuple_returning_rev_solver():
    from implicax.compat import root_solve

    func = lambda x, c: x**3 - c  # noqa: E731

    def solver(x0, c):
        return _fax_iterate(lambda c: lambda x: x - (x**3 - c) / (3 * x**2), x0, c, steps=60)

    def solve(c, rev_solver=None):
        return root_solve(func, jnp.ones(2), c, solver, rev_solver)

    c = jnp.array([2.0, 9.0])
    np.testing.assert_allclose(solve(c), np.cbrt(c), rtol=1e-12)
    for rev_solver in (None, jax.scipy.sparse.linalg.gmres):
        g = jax.grad(lambda c, r=rev_solver: jnp.sum(solve(c, r)))(c)
        np.testing.assert_allclose(g, c ** (-2 / 3) / 3, rtol=1e-9)
    hess = jax.jacfwd(jax.grad(lambda c: jnp.sum(solve(c))))(c)
    np.testing.assert_allclose(np.diag(hess), -2 / 9 * c ** (-5 / 3), rtol=1e-8)
