"""Held-out pairwise accuracy of a reward model (the `reward` objective), and on the Markov
benchmark (data.source='markov_preference') its distance to the Bayes pairwise accuracy.

    pairwise_accuracy = (1/M)·Σ_pairs [r̂(y_c) > r̂(y_r)]        against the sampled labels

On the Markov benchmark every held-out pair (all data.markov_preference.num_valid_pairs) also
has its true rewards r, so three more numbers come with it:

    bayes_pairwise_accuracy          E[σ(|r_1 − r_2|)] over π_ref pairs (lm/data/markov_reward.py;
                                     Monte Carlo with its stderr when the exact sum is too large)
    expected_pairwise_accuracy       (1/M)·Σ σ(s·(r_c − r_r)), s = sign(r̂_c − r̂_r): the model's
                                     accuracy in expectation over the labels of these same pairs
    bayes_pairwise_accuracy_pairs    (1/M)·Σ σ(|r_c − r_r|): the Bayes accuracy on these pairs
    bayes_accuracy_gap               bayes_pairwise_accuracy_pairs − expected_pairwise_accuracy

The gap is a paired difference on the same pairs, without the label noise of the first number
(whose stderr is ~√(p(1−p)/M)); it is what the "within 2 points of Bayes" target reads.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx


def _reward_fn(graphdef, setup=None):
    """(r_c, r_r, weights) [B] each of a pair batch; with a setup (lm.train.Setup), under its mesh's
    activation hints with the parameters' shardings in and replicated outputs."""
    from lm.objectives.reward import pair_rewards, pair_weights

    def rewards(params, batch):
        return pair_rewards(nnx.merge(graphdef, params), batch) + (pair_weights(batch),)

    if setup is None:
        return jax.jit(rewards)
    from lm.parallel import sharding as shd

    jitted = jax.jit(setup.with_activation_hints(rewards), in_shardings=(setup.state_shardings.params, None),
                     out_shardings=shd.replicated(setup.mesh))
    rows = shd.batch_sharding(setup.mesh)
    n = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]

    def call(params, batch):
        size = jax.tree.leaves(batch)[0].shape[0]
        placed = jax.tree.map(lambda x: jax.device_put(x, rows if size % n == 0 else shd.replicated(setup.mesh)),
                              batch)
        return jitted(params, placed)

    return call


def markov_pair_batch(source, prompts, chosen, rejected) -> dict:
    """A pair batch of the Markov benchmark: [M, P] prompts, [M, N] answers (character indices)."""
    out = {}
    for side, answers in (("chosen", chosen), ("rejected", rejected)):
        tokens = source.tokens(prompts, answers).astype(np.int32)
        weights = np.concatenate([np.zeros(prompts.shape[1]), np.ones(tokens.shape[1] - prompts.shape[1])])
        m, t = tokens.shape[0], tokens.shape[1] - 1
        out[side] = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                     "loss_mask": np.broadcast_to(weights[1:], (m, t)).copy(),
                     "segment_ids": np.ones((m, t), np.int32),
                     "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (m, t)).copy()}
    return out


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def evaluate(ctx) -> dict:
    from lm import data

    config = ctx.config
    rewards = _reward_fn(ctx.graphdef, ctx.setup)
    batch_size = config.eval.pairwise_accuracy.batch_size
    if config.data.source != "markov_preference":
        correct = total = 0.0
        for batch in ctx.valid_batches():
            r_c, r_r, w = jax.device_get(rewards(ctx.params, batch))
            correct += float(np.sum(w * (r_c > r_r)))
            total += float(np.sum(w))
        out = {"pairwise_accuracy": correct / total if total else 0.0, "pairwise_accuracy_n": int(total)}
        if jax.process_index() == 0:
            print(f"reward model: held-out pairwise accuracy {100 * out['pairwise_accuracy']:.2f}% of {int(total)} pairs")
        return out
    source = data.build_source(config.data, split="valid", seq_len=config.train.seq_len, seed=config.seed,
                               tokenizer=ctx.tokenizer)
    pairs = source.pairs
    chosen, rejected = pairs.chosen, pairs.rejected
    true_c = source.bench.reward(chosen)
    true_r = source.bench.reward(rejected)
    r_c, r_r = [], []
    for i in range(0, len(source), batch_size):
        sl = slice(i, i + batch_size)
        c, r, _ = jax.device_get(rewards(ctx.params, markov_pair_batch(source, source.prompts[sl], chosen[sl],
                                                                             rejected[sl])))
        r_c.append(c)
        r_r.append(r)
    r_c, r_r = np.concatenate(r_c), np.concatenate(r_r)
    m = len(r_c)
    hits = (r_c > r_r).astype(np.float64)
    acc = float(hits.mean())
    sign = np.sign(r_c - r_r)
    expected = _sigmoid(sign * (true_c - true_r))
    expected = np.where(sign == 0, 0.5, expected)
    bayes_pairs = _sigmoid(np.abs(true_c - true_r))
    bayes, bayes_se = source.bench.bayes_pairwise_accuracy(source.chain.stationary, num_samples=200_000,
                                                           seed=config.data.markov_preference.pair_seed + 7)
    gap = bayes_pairs - expected
    out = {"pairwise_accuracy": acc, "pairwise_accuracy_stderr": math.sqrt(acc * (1 - acc) / m),
           "pairwise_accuracy_n": m,
           "expected_pairwise_accuracy": float(expected.mean()),
           "bayes_pairwise_accuracy": bayes, "bayes_pairwise_accuracy_stderr": bayes_se,
           "bayes_pairwise_accuracy_pairs": float(bayes_pairs.mean()),
           "bayes_accuracy_gap": float(gap.mean()),
           "bayes_accuracy_gap_stderr": float(gap.std(ddof=1) / math.sqrt(m)),
           "reward_correlation": float(np.corrcoef(r_c - r_r, true_c - true_r)[0, 1])}
    if jax.process_index() == 0:
        print(f"reward model on {m} held-out Markov pairs: accuracy {100 * acc:.2f}% ± "
              f"{100 * out['pairwise_accuracy_stderr']:.2f} (labels), expected {100 * out['expected_pairwise_accuracy']:.2f}%; "
              f"Bayes {100 * bayes:.2f}% (these pairs: {100 * out['bayes_pairwise_accuracy_pairs']:.2f}%); gap "
              f"{100 * out['bayes_accuracy_gap']:.2f} ± {100 * out['bayes_accuracy_gap_stderr']:.2f} points; "
              f"corr(r̂ margin, r margin) {out['reward_correlation']:.3f}")
    return out
