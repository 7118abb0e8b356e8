"""Train a deep equilibrium (DEQ) classifier on scikit-learn's handwritten digits, with Haiku.

The same model as ``deq_digits_flax.py``: the hidden state is the fixed point
z* = cell(z*, x) of cell(z, x) = LayerNorm(tanh(W·z + x)) with ‖W‖_F ≤ 0.9, found by
Anderson acceleration, with implicit-function-theorem gradients. The progress bar shows the
loss and the forward (Anderson) and backward (BiCGStab) solver steps of the latest batch; the
backward solve's statistics come back through a probe (`implicax.stats_probe`).

    python examples/deq_digits_haiku.py            # ~20 s on 2 CPU cores, ~97% test accuracy
    python examples/deq_digits_haiku.py --short    # 20 steps: a smoke test

Data: ``sklearn.datasets.load_digits`` (ships with scikit-learn, no download).
"""

from __future__ import annotations

import argparse
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from implicax_haiku import DEQ
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import implicax

HIDDEN = 64
SOLVER = implicax.Anderson(rtol=1e-4, atol=1e-4, max_steps=60)
LINEAR_SOLVER = implicax.BiCGStab(rtol=1e-4, atol=1e-4, max_steps=60)


def cell(z: jax.Array, x: jax.Array) -> jax.Array:
    """One weight-tied layer: z ↦ LayerNorm(tanh(W·z + x)), with W rescaled to ‖W‖_F ≤ 0.9."""
    n = z.shape[-1]
    w = hk.get_parameter("w", (n, n), z.dtype, hk.initializers.RandomNormal(0.3 / n**0.5))
    w = 0.9 * w / jnp.maximum(1.0, jnp.linalg.norm(w))
    return hk.LayerNorm(-1, create_scale=True, create_offset=True)(jnp.tanh(z @ w + x))


def classifier(images: jax.Array, probe=None) -> tuple[jax.Array, implicax.SolveStats]:
    """pixels → Linear → DEQ(cell) → Linear → 10 logits (and the forward solve's stats)."""
    x = hk.Linear(HIDDEN)(images)
    deq = DEQ(cell, solver=SOLVER, linear_solver=LINEAR_SOLVER)
    z, stats = deq(x, return_stats=True, adjoint_stats=probe)
    return hk.Linear(10)(z), stats


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


def make_step(model: hk.Transformed, optimizer: optax.GradientTransformation):
    def loss_fn(params, probe, images, labels):
        logits, stats = model.apply(params, None, images, probe)  # no rng: the cell draws none
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
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
    model = hk.transform(classifier)
    params = jax.jit(model.init)(jax.random.key(args.seed), x_train[:1])
    total = 20 if args.short else args.epochs * (len(x_train) // args.batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, total))
    opt_state = optimizer.init(params)
    step = make_step(model, optimizer)
    predict = jax.jit(lambda params, images: model.apply(params, None, images)[0].argmax(-1))

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
