"""The reference's half of benchmarks/m2n2_reference.py; runs under the reference's own Python (JAX).

It imports the public SakanaAI/natural_niches code from a checkout given on the command line and
calls its functions; nothing of it is copied here. Modes:

    speed DIR STEPS OUT        its own search loop (run_natural_niches), timed after a warm-up call
    accuracy DIR SEEDS STEPS OUT  from-scratch M2N2, its functions stepped under one jitted lax.scan
                               (same keys, same operations, so the same results as its loop, faster)
    record DIR SEED STEPS OUT  one run with every draw recorded: parents, their sampling weights,
                               split point, weight, crossover, child and replaced slot

Each mode writes a JSON (or .npz for record) file to OUT.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORM_NAME", "cpu")


def _import(reference: str):
    sys.path.insert(0, reference)
    import data
    import helper_fn
    import jax
    import jax.numpy as jnp
    import model
    import natural_niches_fn

    return jax, jnp, data, helper_fn, model, natural_niches_fn


def speed(reference: str, steps: int, out: str) -> None:
    _, _, _, _, _, nn = _import(reference)
    args = dict(
        runs=1,
        pop_size=20,
        store_train_results=False,
        no_matchmaker=False,
        no_crossover=False,
        no_splitpoint=False,
        use_pre_trained=False,
    )
    nn.run_natural_niches(total_forward_passes=200, **args)  # compiles its jitted functions
    start = time.perf_counter()
    nn.run_natural_niches(total_forward_passes=steps, **args)
    seconds = time.perf_counter() - start
    json.dump({"steps": steps, "seconds": seconds, "evaluations_per_second": steps / seconds}, open(out, "w"))


def _start(jax, jnp, model, nn, x_train, y_train, seed: int):
    """The reference's initialisation: P empty slots, two N(0, 0.01²) models through update_archive."""
    key = jax.random.PRNGKey(seed)
    archive = jnp.zeros([20, model.num_params])
    scores = jnp.zeros([20, len(x_train)], dtype=jnp.bool)
    key, k1, k2 = jax.random.split(key, 3)
    for params in (
        jax.random.normal(k1, (model.num_params,)) * 0.01,
        jax.random.normal(k2, (model.num_params,)) * 0.01,
    ):
        score = jnp.argmax(model.mlp(params, x_train), axis=1) == y_train
        archive, scores = nn.update_archive(score, params, archive, scores, 1.0)
    return archive, scores, key


def accuracy(reference: str, seeds: list[int], steps: int, out: str) -> None:
    jax, jnp, data, helper, model, nn = _import(reference)
    import numpy as np

    (x_train, y_train), (x_test, y_test) = data.load_data()
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)

    def step(carry, _):
        archive, scores, key = carry
        k1, k2, k3, key = jax.random.split(key, 4)  # the same key schedule as run_natural_niches
        parents = nn.sample_parents(archive, scores, k1, 1.0, True)
        child = helper.mutate(helper.crossover(parents, k2), k3)
        score = jnp.argmax(model.mlp(child, x_train), axis=1) == y_train
        archive, scores = nn.update_archive(score, child, archive, scores, 1.0)
        return (archive, scores, key), None

    run = jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=steps)[0])
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        archive, scores, _ = run(_start(jax, jnp, model, nn, x_train, y_train, seed))
        train = np.asarray(scores).mean(axis=1)
        best = int(np.argmax(train))
        test = float(model.get_acc(model.mlp(archive[best], x_test), y_test))
        solved = np.asarray(scores).max(axis=0) > 0
        rows.append(
            {
                "seed": seed,
                "train": float(train[best]),
                "test": test,
                "coverage": float(solved.mean()),
                "seconds": time.perf_counter() - start,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    json.dump(rows, open(out, "w"))


def record(reference: str, seed: int, steps: int, out: str) -> None:
    """One run, unrolled so that every draw and the weights it was drawn from can be saved."""
    jax, jnp, data, helper, model, nn = _import(reference)
    import numpy as np

    (x_train, y_train), _ = data.load_data()
    archive, scores, key = _start(jax, jnp, model, nn, x_train, y_train, seed)
    inits = np.asarray(archive[:2])
    names = ("first", "second", "first_weights", "second_weights", "split", "w", "crossed", "child", "slot")
    rec: dict[str, list] = {k: [] for k in names}
    for _ in range(steps):
        k1, k2, k3, key = jax.random.split(key, 4)
        # sample_parents(archive, scores, k1, 1.0, True), with its two weight vectors kept
        ka, kb = jax.random.split(k1)
        z = scores.sum(axis=0)
        shared = scores / jnp.where(z, z, 1)[None, :]
        fitness = shared.sum(axis=1)
        first = int(jax.random.choice(ka, 20, shape=(1,), p=fitness / fitness.sum())[0])
        match = jnp.maximum(0, shared - shared[first]).sum(axis=1)
        second = int(jax.random.choice(kb, 20, shape=(1,), p=match / match.sum())[0])
        kc, kw = jax.random.split(k2)  # what crossover draws from k2
        split = int(jax.random.randint(kc, shape=(), minval=0, maxval=model.num_params))
        w = float(jax.random.uniform(kw))
        crossed = helper.crossover((archive[first], archive[second]), k2)
        child = helper.mutate(crossed, k3)
        score = jnp.argmax(model.mlp(child, x_train), axis=1) == y_train
        extended = jnp.concatenate([scores, score[None]], axis=0)
        ze = extended.sum(axis=0)
        slot = int(jnp.argmin((extended / jnp.where(ze, ze, 1)[None, :]).sum(axis=1)))
        archive, scores = nn.update_archive(score, child, archive, scores, 1.0)
        values = (first, second, fitness / fitness.sum(), match / match.sum(), split, w, crossed, child, slot)
        for name, value in zip(names, values):
            rec[name].append(np.asarray(value))
    np.savez(out, inits=inits, **{k: np.stack(v) for k, v in rec.items()})


if __name__ == "__main__":
    mode, reference = sys.argv[1], sys.argv[2]
    if mode == "speed":
        speed(reference, int(sys.argv[3]), sys.argv[4])
    elif mode == "accuracy":
        accuracy(reference, [int(s) for s in sys.argv[3].split(",")], int(sys.argv[4]), sys.argv[5])
    elif mode == "record":
        record(reference, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(f"unknown mode {mode!r}: speed, accuracy or record")
