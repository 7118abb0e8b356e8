"""implicax_flax.DEQ (Flax linen): derivatives against unrolled iteration and finite differences,
chex variants, vmap / pmap / shard_map / sharded-jit training steps, cells, state and dropout.

Compilation dominates the run time, so each test compiles as few programs as it can.
"""

from __future__ import annotations

import functools

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deq_helpers import (
    F64,
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
from implicax_flax import DEQ
from jax import lax

import implicax
from implicax.testing import check_derivatives


def small(scale: float = 0.25):
    """Kernel initializer with operator norm about 2·scale (the tanh cells contract).

    Drawn with NumPy (seeded by the shape), not jax.random: compiling threefry in float64 for
    every shape would cost the test file seconds.
    """

    def init(key, shape, dtype=F64):
        del key
        fan_in = int(np.prod(shape[:-1]))
        values = np.random.default_rng(list(shape)).standard_normal(shape)
        return jnp.asarray(scale * values / np.sqrt(fan_in), dtype)

    return init


class Inner(nn.Module):
    features: int

    @nn.compact
    def __call__(self, z):
        return nn.Dense(self.features, kernel_init=small(), param_dtype=F64, name="mix")(z)


class DenseCell(nn.Module):
    """z ↦ tanh(Inner(z) + Dense(x)), with a nested submodule."""

    features: int = 3

    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(
            Inner(self.features)(z)
            + nn.Dense(self.features, kernel_init=small(1.0), param_dtype=F64)(x)
        )


class ConvNormCell(nn.Module):
    """z ↦ LayerNorm(GroupNorm(tanh(Conv(z) + x))) / 2 on images."""

    @nn.compact
    def __call__(self, z, x):
        conv = nn.Conv(z.shape[-1], (3, 3), kernel_init=small(0.15), param_dtype=F64)
        h = nn.GroupNorm(num_groups=2, param_dtype=F64)(jnp.tanh(conv(z) + x))
        return 0.5 * nn.LayerNorm(param_dtype=F64)(h)


def _variables(cell: nn.Module, x, **rngs):
    """The DEQ's variables, from the cell's own (cheap, solve-free) init."""
    cell_variables = cell.init({"params": jax.random.key(0), **rngs}, np.zeros_like(x), x)
    return {name: {"cell": tree} for name, tree in cell_variables.items()}


def _deq(cell: nn.Module, **kwargs) -> DEQ:
    return DEQ(cell, **{**FAST, **kwargs})


def _unrolled(cell: nn.Module, variables, x):
    cell_variables = {name: tree["cell"] for name, tree in variables.items()}
    return lax.fori_loop(
        0, UNROLL, lambda _, z: cell.apply(cell_variables, z, x), jnp.zeros_like(x)
    )


CELLS = {
    "dense-nested": (DenseCell(), (2, 3)),
    "conv-groupnorm-layernorm": (ConvNormCell(), (2, 3, 3, 4)),
}


@pytest.mark.parametrize("name", list(CELLS))
def test_matches_unrolled_iteration(name):
    """Value and gradient w.r.t. parameters and input (and, for one cell, the JVP)."""
    cell, shape = CELLS[name]
    x, weights = random_data(shape), random_data(shape, seed=2)
    variables = _variables(cell, x)
    tangents = (jax.tree.map(np.ones_like, variables), random_data(shape, seed=3))

    @jax.jit
    def both(variables, x):
        def derivatives(layer):
            loss = lambda v, x: jnp.sum(weights * layer(v, x) ** 2)
            out = jax.value_and_grad(loss, argnums=(0, 1))(variables, x)
            if name == "dense-nested":  # forward mode as well
                out = out, jax.jvp(layer, (variables, x), tangents)
            return out

        return derivatives(_deq(cell).apply), derivatives(functools.partial(_unrolled, cell))

    implicit, unrolled = both(variables, x)
    assert_tree_allclose(implicit, unrolled)


@pytest.mark.parametrize(**INEXACT_GRADIENTS)
def test_inexact_gradient_matches_its_unrolled_definition(solver, steps, damping):
    """linear_solver=PhantomGradient: the gradient of k damped cell steps from z* held fixed;
    JacobianFree: the same with one undamped step."""
    cell, shape = CELLS["dense-nested"]
    x, weights = random_data(shape), random_data(shape, seed=2)
    variables = _variables(cell, x)
    deq = _deq(cell, linear_solver=solver)

    def phantom(variables, x):
        z = lax.stop_gradient(_unrolled(cell, variables, x))
        cell_variables = {name: tree["cell"] for name, tree in variables.items()}
        for _ in range(steps):
            z = (1 - damping) * z + damping * cell.apply(cell_variables, z, x)
        return z

    @jax.jit
    def both(variables, x):
        def gradient(layer):
            return jax.grad(lambda v, x: jnp.sum(weights * layer(v, x) ** 2), (0, 1))(variables, x)

        return gradient(deq.apply), gradient(phantom)

    got, expected = both(variables, x)
    assert_tree_allclose(got, expected)


class TinyCell(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        return jnp.tanh(nn.Dense(z.shape[-1], kernel_init=small(), param_dtype=F64)(z) + x)


def test_derivatives_match_finite_differences_to_third_order():
    x = random_data((1, 2))
    model = DEQ(
        TinyCell(),
        solver=implicax.FixedPointIteration(max_steps=200),
        linear_solver=implicax.Dense(),
    )
    args = (_variables(TinyCell(), x), x)
    check_derivatives(model.apply, args, order=3, modes=("fwd", "rev"), transforms=("none",))


class VariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_layer_call(self):
        x = random_data((2, 3))
        variables = _variables(DenseCell(), x)
        z = self.variant(_deq(DenseCell()).apply)(variables, x)
        fixed = DenseCell().apply({"params": variables["params"]["cell"]}, z, x)
        np.testing.assert_allclose(fixed, z, rtol=1e-9, atol=1e-10)


def test_vmap_matches_batch():
    x = random_data((4, 3))
    variables = _variables(DenseCell(), x)
    apply = _deq(DenseCell()).apply

    @jax.jit
    def both(x):
        value_and_grad = jax.value_and_grad(lambda x: jnp.sum(apply(variables, x) ** 2))
        return jax.vmap(value_and_grad)(x), value_and_grad(x)

    (values, grads), (value, grad) = both(x)
    assert_tree_allclose((jnp.sum(values), grads), (value, grad), rtol=1e-8, atol=1e-10)


class Net(nn.Module):
    """Dense → DEQ → Dense: the model of the training-step tests."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3, kernel_init=small(1.0), param_dtype=F64)(x)
        z = DEQ(DenseCell(), name="deq", **FAST)(h)
        return nn.Dense(2, kernel_init=small(1.0), param_dtype=F64)(z)


@pytest.fixture(scope="module")
def training():
    """Parameters, a batch, and one reference training step on one device."""
    x, y = random_data((8, 5)), random_data((8, 2), seed=4)
    return reference_training(Net().apply, jax.jit(Net().init)(jax.random.key(0), x), x, y)


def test_sharded_jit_training_step(training):
    check_sharded_jit_step(Net().apply, training)


def test_pmap_training_step(training):
    check_pmap_step(Net().apply, training)


def test_shard_map_training_step(training):
    check_shard_map_step(Net().apply, training)


def test_parameters_follow_flax_ownership():
    class WithSetup(nn.Module):
        def setup(self):
            self.deq = DEQ(DenseCell())  # cell constructed in setup: owned by the DEQ

        def __call__(self, x):
            return self.deq(x)

    class WithCompact(nn.Module):
        @nn.compact
        def __call__(self, x):
            return DEQ(DenseCell())(x)  # cell constructed in compact: owned by this module

    x = random_data((2, 3))
    params = jax.eval_shape(WithSetup().init, jax.random.key(0), x)["params"]
    assert set(params) == {"deq"} and set(params["deq"]) == {"cell"}
    params = jax.eval_shape(WithCompact().init, jax.random.key(0), x)["params"]
    assert set(params) == {"DenseCell_0"}


def test_stats_sown_and_returned():
    x = random_data((2, 3))
    variables = _variables(DenseCell(), x)

    @jax.jit
    def run(variables, x):
        sown = DEQ(DenseCell()).apply(variables, x, mutable=["intermediates"])
        return sown, DEQ(DenseCell()).apply(variables, x, return_stats=True)

    (z, state), returned = run(variables, x)
    (stats,) = state["intermediates"]["solve_stats"]
    assert isinstance(stats, implicax.SolveStats)
    assert bool(stats.converged) and int(stats.steps) > 0 and float(stats.residual_norm) < 1e-9
    assert_tree_allclose(returned, (z, stats))


class DropoutCell(nn.Module):
    @nn.compact
    def __call__(self, z, x):
        h = nn.Dense(3, kernel_init=small(), param_dtype=F64)(z)
        return jnp.tanh(nn.Dropout(0.5, deterministic=False)(h) + x)


def test_dropout_mask_fixed_per_solve():
    x = random_data((4, 3))
    variables = _variables(DropoutCell(), x, dropout=jax.random.key(1))
    model = _deq(DropoutCell())
    run = jax.jit(lambda v, x, key: model.apply(v, x, rngs={"dropout": key}, return_stats=True))
    (z1, stats), (z2, _), (z3, _) = (run(variables, x, jax.random.key(k)) for k in (5, 5, 6))
    assert bool(stats.converged)  # one mask for the whole solve: a deterministic map
    np.testing.assert_array_equal(z1, z2)
    assert not np.allclose(z1, z3)
    # The implicit derivative is exact for the solve's mask.
    f = lambda v, x: run(v, x, jax.random.key(5))[0]
    check_derivatives(f, (variables, x), order=1, modes=("rev",), transforms=("none",))
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(model.apply, variables, x)  # needs a "dropout" stream, as without DEQ


class BatchNormCell(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, z, x):
        h = nn.Dense(3, kernel_init=small(), param_dtype=F64)(z)
        h = nn.BatchNorm(use_running_average=not self.train, momentum=0.5, param_dtype=F64)(h)
        return jnp.tanh(0.2 * h + x)


def test_batchnorm_statistics_updated_once_from_equilibrium():
    x = random_data((6, 3))
    train, evaluate = BatchNormCell(train=True), BatchNormCell(train=False)
    variables = _variables(train, x)

    @jax.jit
    def run(variables, x):
        z, updates = _deq(train).apply(variables, x, mutable=["batch_stats"])
        cell_variables = {name: tree["cell"] for name, tree in variables.items()}
        again = train.apply(cell_variables, z, x, mutable=["batch_stats"])
        return z, updates, again, _deq(evaluate).apply({**variables, **updates}, x)

    z, updates, (image, cell_updates), z_eval = run(variables, x)
    np.testing.assert_allclose(image, z, atol=1e-9)  # z* is a fixed point of the training map
    assert_tree_allclose(updates["batch_stats"]["cell"], cell_updates["batch_stats"])
    assert not np.allclose(updates["batch_stats"]["cell"]["BatchNorm_0"]["mean"], 0)
    assert z_eval.shape == x.shape
    with pytest.raises(flax.errors.ModifyScopeVariableError):
        jax.eval_shape(DEQ(train).apply, variables, x)  # immutable statistics, as without DEQ


def test_integer_input_needs_z0():
    with pytest.raises(TypeError, match="z0"):
        DEQ(DenseCell()).init(jax.random.key(0), jnp.ones((2, 3), jnp.int32))


class MemoryCell(nn.Module):
    """A state {"h", "m"} whose "m" part depends on neither the parameters nor x."""

    @nn.compact
    def __call__(self, z, x):
        h = jnp.tanh(Inner(3)(z["h"]) + x + 0.1 * z["m"])
        return {"h": h, "m": 0.5 * z["m"] + 1.0}


def test_a_state_part_the_parameters_do_not_reach():
    x, weights = random_data((2, 3)), random_data((2, 3), seed=2)
    z0 = {"h": jnp.zeros_like(x), "m": jnp.zeros_like(x)}
    cell = MemoryCell()
    cell_variables = cell.init(jax.random.key(0), z0, x)
    variables = {name: {"cell": tree} for name, tree in cell_variables.items()}

    def unrolled(variables, x):
        cell_vars = {name: tree["cell"] for name, tree in variables.items()}
        return lax.fori_loop(0, UNROLL, lambda _, z: cell.apply(cell_vars, z, x), z0)

    def loss(layer):
        return lambda v, x: jnp.sum(weights * layer(v, x)["h"] ** 2) + jnp.sum(layer(v, x)["m"])

    implicit = lambda v, x: _deq(cell).apply(v, x, z0)  # noqa: E731
    for transform in (jax.value_and_grad, jax.jacfwd):
        got = transform(loss(implicit), argnums=(0, 1))(variables, x)
        assert_tree_allclose(got, transform(loss(unrolled), argnums=(0, 1))(variables, x))


def test_a_cell_returning_the_wrong_shape_is_named():
    class Widening(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return nn.Dense(5, param_dtype=F64)(z)

    x = random_data((2, 3))
    with pytest.raises(
        TypeError, match=r"cell Widening must have the shapes of z.*got shape \(2, 5\).*pass z0"
    ):
        DEQ(Widening()).init(jax.random.key(0), x)


def test_diagnostics_are_sown_and_the_penalty_is_differentiable():
    x = random_data((1, 3))
    cell = TinyCell()
    variables = symmetric_kernel(_variables(cell, x))
    deq = _deq(cell, penalty_samples=PENALTY_SAMPLES, radius_steps=RADIUS_STEPS)
    rngs = {"jacobian": jax.random.key(0)}

    @jax.jit
    def run(variables):
        z, state = deq.apply(variables, x, rngs=rngs, mutable=["intermediates"])
        sown = state["intermediates"]
        return z, sown["jacobian_penalty"][0], sown["spectral_radius"][0]

    z, penalty, radius = run(variables)
    cell_variables = {name: tree["cell"] for name, tree in variables.items()}
    check_diagnostics(z, lambda z: cell.apply(cell_variables, z, x), penalty, radius)
    grad = jax.grad(lambda v: run(v)[1])(variables)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grad))


@pytest.mark.parametrize(**PROBE_CASES)
def test_adjoint_stats_probe(linear_solver, steps):
    x = random_data((1, 3))
    deq = _deq(TinyCell(), linear_solver=linear_solver)
    variables = _variables(TinyCell(), x)

    def loss(variables, probe):
        return jnp.sum(deq.apply(variables, x, adjoint_stats=probe) ** 2)

    _, record = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, implicax.stats_probe())
    check_probe(record, steps)


def test_diagnostic_counts_are_checked():
    x = random_data((1, 3))
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="penalty_samples must be a whole number"):
            DEQ(TinyCell(), penalty_samples=bad).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="radius_steps must be a whole number"):
        DEQ(TinyCell(), radius_steps=-2).init(jax.random.key(0), x)
    DEQ(TinyCell(), **FAST, penalty_samples=np.int64(1)).init(jax.random.key(0), x)  # NumPy ints
