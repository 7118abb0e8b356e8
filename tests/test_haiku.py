"""implicax_haiku.DEQ: derivatives against unrolled iteration and finite differences, chex
variants, vmap / pmap / shard_map / sharded-jit training steps, cells, parameter placement,
random keys, state and dropout.

Compilation dominates the run time, so each test compiles as few programs as it can.
"""

from __future__ import annotations

import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deq_helpers import (
    FAST,
    INEXACT_GRADIENTS,
    PENALTY_SAMPLES,
    PROBE_CASES,
    RADIUS_STEPS,
    UNROLL,
    assert_tree_allclose,
    check_diagnostics,
    check_pmap_step,
    check_probe,
    check_shard_map_step,
    check_sharded_jit_step,
    random_data,
    reference_training,
    symmetric_kernel,
)
from implicax_haiku import DEQ
from jax import lax

import implicax
from implicax.testing import check_derivatives


def small(scale: float = 0.25):
    """Weight initializer with operator norm about 2·scale (the tanh cells contract), drawn with
    NumPy, so that ``init`` needs no random key (and no threefry compilation)."""

    def init(shape, dtype):
        fan_in = int(np.prod(shape[:-1]))
        values = np.random.default_rng(list(shape)).standard_normal(shape)
        return jnp.asarray(scale * values / np.sqrt(fan_in), dtype)

    return init


class Inner(hk.Module):
    def __call__(self, z):
        return hk.Linear(z.shape[-1], w_init=small(), name="mix")(z)


def dense_cell(z, x):
    """z ↦ tanh(Inner(z) + Linear(x)): a function cell with a nested module."""
    return jnp.tanh(Inner()(z) + hk.Linear(z.shape[-1], w_init=small(1.0))(x))


class ConvNormCell(hk.Module):
    """z ↦ LayerNorm(GroupNorm(tanh(Conv(z) + x))) / 2 on images: a module-instance cell."""

    def __call__(self, z, x):
        h = jnp.tanh(hk.Conv2D(z.shape[-1], 3, w_init=small(0.15))(z) + x)
        h = hk.GroupNorm(2)(h)
        return 0.5 * hk.LayerNorm(-1, create_scale=True, create_offset=True)(h)


def _transformed(make_cell, **kwargs) -> hk.Transformed:
    return hk.transform(lambda x: DEQ(make_cell(), **{**FAST, **kwargs})(x))


def _unrolled(make_cell, params, x):
    """Plain iteration of the cell with the DEQ's parameters."""
    cell = hk.transform(lambda z, x: make_cell()(z, x))
    cell_params = {name.removeprefix("deq/cell/"): value for name, value in params.items()}
    step = lambda _, z: cell.apply(cell_params, None, z, x)
    return lax.fori_loop(0, UNROLL, step, jnp.zeros_like(x))


CELLS = {
    "dense-nested": (lambda: dense_cell, (2, 3)),
    "conv-groupnorm-layernorm": (ConvNormCell, (2, 3, 3, 4)),
}


@pytest.mark.parametrize("name", list(CELLS))
def test_matches_unrolled_iteration(name):
    """Value and gradient w.r.t. parameters and input (and, for one cell, the JVP)."""
    make_cell, shape = CELLS[name]
    x, weights = random_data(shape), random_data(shape, seed=2)
    model = _transformed(make_cell)
    params = model.init(None, x)  # deterministic initializers: no key needed
    assert all(name.startswith("deq/cell/") for name in params)
    tangents = (jax.tree.map(np.ones_like, params), random_data(shape, seed=3))

    @jax.jit
    def both(params, x):
        def derivatives(layer):
            loss = lambda p, x: jnp.sum(weights * layer(p, x) ** 2)
            out = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
            if name == "dense-nested":  # forward mode as well
                out = out, jax.jvp(layer, (params, x), tangents)
            return out

        implicit = lambda p, x: model.apply(p, None, x)  # no rng: the cell draws none
        return derivatives(implicit), derivatives(functools.partial(_unrolled, make_cell))

    got, expected = both(params, x)
    assert_tree_allclose(got, expected)


@pytest.mark.parametrize(**INEXACT_GRADIENTS)
def test_inexact_gradient_matches_its_unrolled_definition(solver, steps, damping):
    """linear_solver=PhantomGradient: the gradient of k damped cell steps from z* held fixed;
    JacobianFree: the same with one undamped step."""
    make_cell, shape = CELLS["dense-nested"]
    x, weights = random_data(shape), random_data(shape, seed=2)
    model = _transformed(make_cell, linear_solver=solver)
    params = model.init(None, x)
    cell = hk.transform(lambda z, x: make_cell()(z, x))

    def phantom(params, x):
        z = lax.stop_gradient(_unrolled(make_cell, params, x))
        cell_params = {name.removeprefix("deq/cell/"): value for name, value in params.items()}
        for _ in range(steps):
            z = (1 - damping) * z + damping * cell.apply(cell_params, None, z, x)
        return z

    @jax.jit
    def both(params, x):
        def gradient(layer):
            return jax.grad(lambda p, x: jnp.sum(weights * layer(p, x) ** 2), (0, 1))(params, x)

        return gradient(lambda p, x: model.apply(p, None, x)), gradient(phantom)

    got, expected = both(params, x)
    assert_tree_allclose(got, expected)


def tiny_cell(z, x):
    return jnp.tanh(hk.Linear(z.shape[-1], w_init=small())(z) + x)


def test_derivatives_match_finite_differences_to_third_order():
    solvers = {
        "solver": implicax.FixedPointIteration(max_steps=200),
        "linear_solver": implicax.Dense(),
    }
    model = _transformed(lambda: tiny_cell, **solvers)
    x = random_data((1, 2))
    layer = lambda p, x: model.apply(p, None, x)
    args = (model.init(None, x), x)
    check_derivatives(layer, args, order=3, modes=("fwd", "rev"), transforms=("none",))


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_layer_call(self):
        x = random_data((2, 3))
        model = _transformed(lambda: dense_cell)
        params = model.init(None, x)
        z = self.variant(lambda p, x: model.apply(p, None, x))(params, x)
        cell = hk.transform(dense_cell)
        image = cell.apply({k.removeprefix("deq/cell/"): v for k, v in params.items()}, None, z, x)
        np.testing.assert_allclose(image, z, rtol=1e-9, atol=1e-10)  # a fixed point


def test_vmap_matches_batch():
    x = random_data((4, 3))
    model = _transformed(lambda: dense_cell)
    params = model.init(None, x)

    @jax.jit
    def both(x):
        value_and_grad = jax.value_and_grad(lambda x: jnp.sum(model.apply(params, None, x) ** 2))
        return jax.vmap(value_and_grad)(x), value_and_grad(x)

    (values, grads), (value, grad) = both(x)
    assert_tree_allclose((jnp.sum(values), grads), (value, grad), rtol=1e-8, atol=1e-10)


def net(x):
    """Linear → DEQ → Linear: the model of the training-step tests."""
    h = hk.Linear(3, w_init=small(1.0))(x)
    return hk.Linear(2, w_init=small(1.0))(DEQ(dense_cell, **FAST)(h))


NET = hk.transform(net)


def _net_apply(params, x):
    return NET.apply(params, None, x)


@pytest.fixture(scope="module")
def training():
    """Parameters, a batch, and one reference training step on one device."""
    x, y = random_data((8, 5)), random_data((8, 2), seed=4)
    return reference_training(_net_apply, NET.init(None, x), x, y)


def test_sharded_jit_training_step(training):
    check_sharded_jit_step(_net_apply, training)


def test_pmap_training_step(training):
    check_pmap_step(_net_apply, training)


def test_shard_map_training_step(training):
    check_shard_map_step(_net_apply, training)


def test_parameter_placement_and_reuse():
    def forward(x):
        shared = DEQ(dense_cell, **FAST)
        z = shared(shared(x))  # one instance called twice: one set of parameters
        cell = Inner()  # a module instance created outside the DEQ

        def instance_cell(z, x):
            return jnp.tanh(cell(z) + x)

        return DEQ(instance_cell, **FAST)(z)

    params = jax.eval_shape(hk.transform(forward).init, None, random_data((2, 3)))
    assert set(params) == {"deq/cell/inner/mix", "deq/cell/linear", "deq_1/cell/inner/mix"}


def test_stats_returned():
    x = random_data((2, 3))
    model = hk.transform(lambda x: DEQ(dense_cell)(x, return_stats=True))  # default solvers
    params = model.init(None, x)
    z, stats = jax.jit(lambda p, x: model.apply(p, None, x))(params, x)
    assert isinstance(stats, implicax.SolveStats)
    assert bool(stats.converged) and int(stats.steps) > 0 and float(stats.residual_norm) < 1e-9


def test_rng_drawn_only_when_the_cell_needs_it():
    def forward(x, random_cell):
        def cell(z, x):
            if random_cell:
                z = z + 0.01 * jax.random.normal(hk.next_rng_key(), z.shape, z.dtype)
            return dense_cell(z, x)

        DEQ(cell, **FAST)(x)
        return hk.maybe_next_rng_key()  # the key after the DEQ: did the DEQ draw one?

    model = hk.transform(forward)
    x = random_data((2, 3))
    params = model.init(None, x, False)
    key = jax.random.key(3)
    first_key = hk.transform(lambda: hk.next_rng_key()).apply({}, key)
    run = jax.jit(model.apply, static_argnums=3)
    np.testing.assert_array_equal(
        jax.random.key_data(run(params, key, x, False)), jax.random.key_data(first_key)
    )
    assert not np.array_equal(
        jax.random.key_data(run(params, key, x, True)), jax.random.key_data(first_key)
    )


def dropout_cell(z, x):
    h = hk.Linear(z.shape[-1], w_init=small())(z)
    return jnp.tanh(hk.dropout(hk.next_rng_key(), 0.5, h) + x)


def test_dropout_mask_fixed_per_solve():
    x = random_data((4, 3))
    model = hk.transform(lambda x: DEQ(dropout_cell, **FAST)(x, return_stats=True))
    params = model.init(jax.random.key(0), x)
    run = jax.jit(model.apply)
    (z1, stats), (z2, _), (z3, _) = (run(params, jax.random.key(k), x) for k in (5, 5, 6))
    assert bool(stats.converged)  # one mask for the whole solve: a deterministic map
    np.testing.assert_array_equal(z1, z2)
    assert not np.allclose(z1, z3)
    # The implicit derivative is exact for the solve's mask.
    f = lambda p, x: run(p, jax.random.key(5), x)[0]
    check_derivatives(f, (params, x), order=1, modes=("rev",), transforms=("none",))
    with pytest.raises(ValueError, match="PRNGKey"):
        jax.eval_shape(model.apply, params, None, x)  # the cell needs a key


def batchnorm_cell(z, x):
    h = hk.Linear(z.shape[-1], w_init=small())(z)
    h = hk.BatchNorm(True, True, decay_rate=0.5)(h, is_training=True)
    return jnp.tanh(0.2 * h + x)


def test_batchnorm_state_updated_once_from_equilibrium():
    x = random_data((6, 3))
    model = hk.transform_with_state(lambda x: DEQ(batchnorm_cell, **FAST)(x))
    cell = hk.transform_with_state(batchnorm_cell)
    params, state = model.init(None, x)
    assert all(name.startswith("deq/cell/") for name in state)

    @jax.jit
    def run(params, state, x):
        z, new_state = model.apply(params, state, None, x)
        strip = lambda tree: {k.removeprefix("deq/cell/"): v for k, v in tree.items()}
        image, cell_state = cell.apply(strip(params), strip(state), None, z, x)
        return z, new_state, image, cell_state

    z, new_state, image, cell_state = run(params, state, x)
    np.testing.assert_allclose(image, z, atol=1e-9)  # z* is a fixed point of the training map
    assert_tree_allclose({f"deq/cell/{k}": v for k, v in cell_state.items()}, new_state)
    with pytest.raises(ValueError, match="transform_with_state"):
        hk.transform(lambda x: DEQ(batchnorm_cell, **FAST)(x)).init(None, x)


def test_integer_input_needs_z0():
    model = hk.transform(lambda x: DEQ(dense_cell)(x))
    with pytest.raises(TypeError, match="z0"):
        model.init(None, jnp.ones((2, 3), jnp.int32))


def memory_cell(z, x):
    """A state {"h", "m"} whose "m" part depends on neither the parameters nor x."""
    h = jnp.tanh(Inner()(z["h"]) + x + 0.1 * z["m"])
    return {"h": h, "m": 0.5 * z["m"] + 1.0}


def test_a_state_part_the_parameters_do_not_reach():
    x, weights = random_data((2, 3)), random_data((2, 3), seed=2)
    z0 = {"h": jnp.zeros_like(x), "m": jnp.zeros_like(x)}
    model = hk.transform(lambda x: DEQ(memory_cell, **FAST)(x, z0))
    params = model.init(None, x)
    cell = hk.transform(memory_cell)
    cell_params = {name.removeprefix("deq/cell/"): value for name, value in params.items()}

    def unrolled(params, x):
        cell_params = {name.removeprefix("deq/cell/"): value for name, value in params.items()}
        return lax.fori_loop(0, UNROLL, lambda _, z: cell.apply(cell_params, None, z, x), z0)

    assert set(cell_params) == set(cell.init(None, z0, x))

    def loss(layer):
        return lambda p, x: jnp.sum(weights * layer(p, x)["h"] ** 2) + jnp.sum(layer(p, x)["m"])

    implicit = lambda p, x: model.apply(p, None, x)  # noqa: E731
    for transform in (jax.value_and_grad, jax.jacfwd):
        got = transform(loss(implicit), argnums=(0, 1))(params, x)
        assert_tree_allclose(got, transform(loss(unrolled), argnums=(0, 1))(params, x))


def test_a_cell_returning_the_wrong_shape_is_named():
    def widening(z, x):
        return hk.Linear(5, w_init=small())(z)

    x = random_data((2, 3))
    model = hk.transform(lambda x: DEQ(widening)(x))
    with pytest.raises(
        TypeError, match=r"cell widening must have the shapes of z.*got shape \(2, 5\).*pass z0"
    ):
        model.init(None, x)


def test_diagnostics_are_state_and_the_penalty_is_differentiable():
    x = random_data((1, 3))
    deq = lambda x: DEQ(  # noqa: E731
        tiny_cell, **FAST, penalty_samples=PENALTY_SAMPLES, radius_steps=RADIUS_STEPS
    )(x)
    model = hk.transform_with_state(deq)
    params = symmetric_kernel(model.init(jax.random.key(1), x)[0])

    @jax.jit
    def run(params):
        z, state = model.apply(params, {}, jax.random.key(0), x)
        return z, state["deq"]["jacobian_penalty"], state["deq"]["spectral_radius"]

    z, penalty, radius = run(params)
    cell = hk.transform(tiny_cell)
    cell_params = {name.removeprefix("deq/cell/"): value for name, value in params.items()}
    check_diagnostics(z, lambda z: cell.apply(cell_params, None, z, x), penalty, radius)
    grad = jax.grad(lambda p: run(p)[1])(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grad))


@pytest.mark.parametrize(**PROBE_CASES)
def test_adjoint_stats_probe(linear_solver, steps):
    x = random_data((1, 2))
    model = hk.transform(
        lambda x, probe: DEQ(tiny_cell, solver=FAST["solver"], linear_solver=linear_solver)(
            x, adjoint_stats=probe
        )
    )
    params = model.init(None, x, None)

    def loss(params, probe):
        return jnp.sum(model.apply(params, None, x, probe) ** 2)

    _, record = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, implicax.stats_probe())
    check_probe(record, steps)


def test_diagnostic_counts_are_checked():
    x = random_data((1, 2))
    with pytest.raises(ValueError, match="penalty_samples must be a whole number"):
        hk.transform(lambda x: DEQ(tiny_cell, penalty_samples=-1)(x)).init(None, x)
    with pytest.raises(ValueError, match="radius_steps must be a whole number"):
        hk.transform(lambda x: DEQ(tiny_cell, radius_steps=True)(x)).init(None, x)
