"""A small neighborhood-attention vision transformer on scikit-learn's handwritten digits.

The data set (1797 grayscale 8x8 images of the digits 0-9) ships inside scikit-learn
(``sklearn.datasets.load_digits``), so the example needs no download. Every pixel is a
token: a 3x3 convolution stem embeds the 8x8 grid, then a few pre-norm transformer
blocks with 2-D neighborhood attention (:class:`jax_gna.nn.NeighborhoodAttention2D`,
kernel 5x5 by default, with query/key RMS normalization and a 2-axis rotary position
embedding) run over the 8x8 token grid; mean pooling and a linear head classify.

Run it (CPU, about a minute)::

    python examples/digits_vit.py
    python examples/digits_vit.py --backend cuda --batch-size 256   # on an NVIDIA GPU

It prints the test accuracy on a stratified 20 % hold-out split and the training and
evaluation throughput (images/s, measured after compilation). ``main(argv)`` returns
the test accuracy, so tests can import and run it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

try:
    from jax_gna.nn import NeighborhoodAttention2D
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from jax_gna.nn import NeighborhoodAttention2D


class Block(nnx.Module):
    """Pre-norm transformer block: 2-D neighborhood attention, then an MLP."""

    def __init__(self, width: int, heads: int, kernel_size: int, mlp_ratio: int,
                 backend: str, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = NeighborhoodAttention2D(heads, width, kernel_size=kernel_size,
                                            normalize_qk=True, rope=True, backend=backend,
                                            rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class DigitsViT(nnx.Module):
    """Conv stem -> ``depth`` neighborhood-attention blocks -> mean pool -> classes."""

    def __init__(self, width: int = 32, depth: int = 2, heads: int = 4, kernel_size: int = 5,
                 mlp_ratio: int = 2, num_classes: int = 10, backend: str = "auto",
                 *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, width, kernel_size=(3, 3), rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, kernel_size, mlp_ratio, backend, rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.stem(images[..., None])  # [B, 8, 8, 1] -> [B, 8, 8, width]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(axis=(1, 2))))


def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 ``[N, 8, 8]`` in [0, 1] and int32 labels; stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.2,
                                              stratify=labels, random_state=seed)
    return x_tr, x_te, y_tr, y_te


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", choices=("auto", "xla", "cuda"),
                   help="jax_gna backend (cuda needs the compiled kernels and a GPU)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Train, evaluate, print accuracy and throughput; return the test accuracy."""
    args = parse_args(argv)
    x_tr, x_te, y_tr, y_te = load_data(args.seed)
    steps_per_epoch = len(x_tr) // args.batch_size
    total_steps = args.epochs * steps_per_epoch

    # Build the model under jit: one compilation for all initializers instead of one each.
    model = nnx.jit(lambda: DigitsViT(args.width, args.depth, args.heads, args.kernel_size,
                                      backend=args.backend, rngs=nnx.Rngs(args.seed)))()
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, steps_per_epoch,
                                                  max(total_steps, steps_per_epoch + 1))
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4),
                              wrt=nnx.Param)

    @nnx.jit
    def train_step(model: DigitsViT, optimizer: nnx.Optimizer, x: jax.Array,
                   y: jax.Array) -> jax.Array:
        def loss_fn(model: DigitsViT) -> jax.Array:
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def predict(model: DigitsViT, x: jax.Array) -> jax.Array:
        return jnp.argmax(model(x), axis=-1)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; backend={args.backend}; "
          f"train {len(x_tr)} / test {len(x_te)} images; "
          f"params {sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))}")
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    t0, timed_images = None, 0
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_tr))
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = train_step(model, optimizer, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
            losses.append(loss)
            if t0 is None:  # the first step compiles: time from its end on
                jax.block_until_ready(loss)
                t0 = time.perf_counter()
            else:
                timed_images += args.batch_size
        print(f"epoch {epoch + 1:3d}  loss {float(np.mean(jax.device_get(losses))):.4f}")
    timed_seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    train_time = time.perf_counter() - t_start

    predict(model, jnp.asarray(x_te)).block_until_ready()  # compile
    t0 = time.perf_counter()
    pred = np.asarray(predict(model, jnp.asarray(x_te)).block_until_ready())
    eval_seconds = time.perf_counter() - t0
    accuracy = float(np.mean(pred == y_te))
    train_ips = timed_images / timed_seconds if timed_seconds > 0 else float("nan")
    print(f"test accuracy {accuracy:.4f}  ({int(np.sum(pred == y_te))}/{len(y_te)})")
    print(f"train {train_ips:.0f} images/s, eval {len(x_te) / eval_seconds:.0f} images/s, "
          f"training took {train_time:.1f} s (backend={args.backend})")
    return accuracy


if __name__ == "__main__":
    main()
