"""Train a deep equilibrium (DEQ) classifier on scikit-learn's handwritten digits, with Flax.

The hidden state is the fixed point z* = cell(z*, x) of one weight-tied layer,
cell(z, x) = LayerNorm(tanh(W·z + x)) with ‖W‖_F ≤ 0.9, found by Anderson acceleration; the
gradient comes from the implicit function theorem (one BiCGStab solve per step), not from
backpropagating through the iterations. The progress bar shows the loss and the forward
(Anderson) and backward (BiCGStab) solver steps of the latest batch; the backward solve's
statistics come back through a probe (`implicax.stats_probe`), as the gradient with respect
to it.

    python examples/deq_digits_flax.py            # ~20 s on 2 CPU cores, ~97% test accuracy
    python examples/deq_digits_flax.py --short    # 20 steps: a smoke test

Data: ``sklearn.datasets.load_digits`` (ships with scikit-learn, no download).
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from implicax_flax import DEQ
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import implicax

HIDDEN = 64
SOLVER = implicax.Anderson(rtol=1e-4, atol=1e-4, max_steps=60)
LINEAR_SOLVER = implicax.BiCGStab(rtol=1e-4, atol=1e-4, max_steps=60)


class Cell(nn.Module):
    """One weight-tied layer: z ↦ LayerNorm(tanh(W·z + x)).

    W is rescaled to ‖W‖_F ≤ 0.9, so z ↦ tanh(W·z + x) stays a contraction while training and
    the equilibrium stays well defined (and quick to find).
    """

    features: int

    @nn.compact
    def __call__(self, z, x):
        init = nn.initializers.normal(0.3 / self.features**0.5)
        w = self.param("kernel", init, (self.features, self.features))
        w = 0.9 * w / jnp.maximum(1.0, jnp.linalg.norm(w))
        return nn.LayerNorm()(jnp.tanh(z @ w + x))


class Classifier(nn.Module):
    """pixels → Dense → DEQ(Cell) → Dense → 10 logits."""

    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, images, adjoint_stats=None):
        x = nn.Dense(self.hidden)(images)
        deq = DEQ(Cell(self.hidden), solver=SOLVER, linear_solver=LINEAR_SOLVER, name="deq")
        z = deq(x, adjoint_stats=adjoint_stats)
        return nn.Dense(10)(z)


def load_data(seed: int = 0):
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    return train_test_split(
        images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )


def batches(rng: np.random.Generator, n: int, batch_size: int):
    """Indices of shuffled mini-batches, epoch after epoch."""
    while True:
        order = rng.permutation(n)
        for i in range(n // batch_size):
            yield order[i * batch_size : (i + 1) * batch_size]


def make_step(model: nn.Module, optimizer: optax.GradientTransformation):
    def loss_fn(params, probe, images, labels):
        logits, state = model.apply(params, images, probe, mutable=["intermediates"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        (stats,) = state["intermediates"]["deq"]["solve_stats"]
        return loss, stats

    @jax.jit
    def step(params, opt_state, images, labels):
        # The gradient with respect to the probe is the backward solve's record.
        (loss, stats), (grads, record) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
            params, implicax.stats_probe(), images, labels
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        backward = implicax.read_probe(record)
        return optax.apply_updates(params, updates), opt_state, loss, stats, backward

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a few steps (smoke test)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = Classifier()
    params = jax.jit(model.init)(jax.random.key(args.seed), x_train[:1])
    total = 20 if args.short else args.epochs * (len(x_train) // args.batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, total))
    opt_state = optimizer.init(params)
    step = make_step(model, optimizer)
    predict = jax.jit(lambda params, images: model.apply(params, images).argmax(-1))

    indices = batches(np.random.default_rng(args.seed), len(x_train), args.batch_size)
    bar = tqdm(range(total), desc="training", unit="step")
    for i in bar:
        batch = next(indices)
        params, opt_state, loss, stats, backward = step(
            params, opt_state, x_train[batch], y_train[batch]
        )
        if i % 10 == 0 or i == total - 1:
            bar.set_postfix(
                loss=f"{float(loss):.3f}", fwd_steps=int(stats.steps), bwd_steps=int(backward.steps)
            )
    accuracy = float(np.mean(np.asarray(predict(params, x_test)) == y_test))
    print(f"test accuracy: {accuracy:.2%} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
