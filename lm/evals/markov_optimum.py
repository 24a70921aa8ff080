"""A policy's KL-regularized objective on the Markov benchmark, against the exact optimum
(data.source='markov_preference'; lm/data/markov_reward.py).

    J(π) = E_π[r] − β·KL(π‖π_ref),   π_ref = the TRUE chain,   β = config.dpo.beta
                                                                  (or eval.markov_optimum.beta)

J(π*) is exact (backward recursion). J of a trained language model is estimated from its own
samples (`MarkovReward.monte_carlo_objective`): config.eval.markov_optimum.num_samples prompts of
the stationary chain (prompt_len characters; their own seed), one continuation of N = horizon
characters each. The model's policy is its next-token distribution *restricted to the chain's
alphabet* (renormalized over those S tokens), which is what is sampled and whose log-probabilities
enter the KL; a model trained on the chain puts ~all its mass there anyway.

    optimal_objective        J(π*), exact, averaged over the prompts' start states
    policy_objective         J(π_θ) ± policy_objective_stderr     (the trained policy)
    reference_objective      J(π_ref model) ± …                   (the frozen reference: the start)
    chain_objective          J(true chain) exact: E[r], KL 0
    fraction_of_optimal_gain (J(π_θ) − J(π_ref model)) / (J(π*) − J(π_ref model)) ± stderr
    policy_objective_model_reference   E[r] − β·KL(π_θ‖π_ref model): the objective DPO optimizes
                             literally (its reference is the pretrained model, ≈ the chain)
    optimal_objective_model_reference  its maximum β·log E_{π_ref model}[exp(r/β)], a log-mean-exp
                             over the reference's samples (Monte Carlo; biased low)
    fraction_of_optimal_gain_model_reference   the fraction of gain in these terms (J_m(π_ref model)
                             = E[r] under it, its KL to itself being 0)

The definitions choose the TRUE chain as J's reference so that the optimum is known exactly; the
DPO reference in training is the pretrained model, whose cross-entropy is ~1% above the chain's,
so J(π_ref model) sits slightly below chain_objective.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def restricted_kernel(model, alphabet_ids):
    """The model's unembedding restricted to the alphabet's S tokens, and its layout."""
    kernel, layout = model.output_kernel()
    return (kernel[:, alphabet_ids], layout) if layout == "dv" else (kernel[alphabet_ids], layout)


def make_sampler(graphdef, alphabet_ids: np.ndarray, horizon: int, setup=None):
    """sample(params, prompts [B, P] int32, key) → (symbols [B, N], log π per step [B, N]) from the
    model restricted to `alphabet_ids` [S]; score(params, tokens [B, P+N]) → log π per step [B, N]
    of given continuations (teacher forcing, same restriction: lm.losses.token_logprobs of the
    hidden states against the S columns of the unembedding, never [B, T, V] logits). With a
    `setup` (lm.train.Setup) both run under its mesh's activation hints, rows split over the batch
    axes when they divide them."""
    from lm import losses

    alphabet_ids = jnp.asarray(alphabet_ids, jnp.int32)

    def hidden_at(model, tokens, p):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return model.hidden_states(tokens, positions, jnp.ones((b, t), jnp.int32))[:, p - 1:][:, :horizon]

    def restricted_logps(model, tokens, p):  # [B, N, S]
        kernel, layout = restricted_kernel(model, alphabet_ids)
        h = hidden_at(model, tokens, p)
        kernel = kernel.astype(h.dtype)
        logits = (jnp.einsum("bnd,ds->bns", h, kernel, preferred_element_type=jnp.float32) if layout == "dv"
                  else jnp.einsum("bnd,sd->bns", h, kernel, preferred_element_type=jnp.float32))
        return jax.nn.log_softmax(logits, axis=-1)

    def sample(params, prompts, key):
        model = nnx.merge(graphdef, params)
        b, p = prompts.shape
        buf = jnp.concatenate([prompts, jnp.zeros((b, horizon), jnp.int32)], axis=1)

        def step(t, carry):
            buf, syms, logps = carry
            lp = restricted_logps(model, buf[:, :p + horizon - 1], p)[:, t]  # [B, S]
            sym = jax.random.categorical(jax.random.fold_in(key, t), lp)
            buf = jax.lax.dynamic_update_slice(buf, alphabet_ids[sym][:, None], (0, p + t))
            return buf, syms.at[:, t].set(sym), logps.at[:, t].set(jnp.take_along_axis(lp, sym[:, None], 1)[:, 0])

        init = (buf, jnp.zeros((b, horizon), jnp.int32), jnp.zeros((b, horizon), jnp.float32))
        _, syms, logps = jax.lax.fori_loop(0, horizon, step, init)
        return syms, logps

    def score(params, prompts, syms):
        model = nnx.merge(graphdef, params)
        tokens = jnp.concatenate([prompts, alphabet_ids[syms]], axis=1)[:, :-1]
        kernel, layout = restricted_kernel(model, alphabet_ids)
        return losses.token_logprobs(hidden_at(model, tokens, prompts.shape[1]), kernel, syms,
                                     kernel_layout=layout).logprobs

    if setup is None:
        return jax.jit(sample), jax.jit(score)
    return sharded_jit(setup, sample), sharded_jit(setup, score)


def sharded_jit(setup, fn):
    """jit(fn(params, rows [B, ...], extra)) under the setup's activation hints; the output rows
    [B, ...] stay split over the batch axes (the parameters keep their own shardings)."""
    from lm.parallel import sharding as shd

    rows = shd.batch_sharding(setup.mesh)
    jitted = jax.jit(setup.with_activation_hints(fn), out_shardings=rows)
    plain = jax.jit(fn)
    n = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]

    def call(params, prompts, extra):
        if prompts.shape[0] % n:  # a last, smaller batch: unsharded
            return plain(params, prompts, extra)
        return jitted(params, jax.device_put(prompts, rows), extra)

    return call


def _batched(fn, batch_size, *arrays):
    outs = [jax.device_get(fn(*(a[i:i + batch_size] for a in arrays))) for i in range(0, len(arrays[0]), batch_size)]
    return tuple(np.concatenate(parts) for parts in zip(*outs))


def evaluate(ctx) -> dict:
    from lm.data.preference import markov_benchmark, markov_prompts
    from lm.data.markov_reward import state_of

    config = ctx.config
    if config.data.source != "markov_preference":
        if jax.process_index() == 0:
            print(f"markov_optimum: skipped for data.source={config.data.source!r} (needs 'markov_preference')")
        return {}
    ec, pc = config.eval.markov_optimum, config.data.markov_preference
    beta = float(ec.beta) if "beta" in ec else float(config.dpo.beta)  # SimPO/ORPO configs name it here
    chain, bench = markov_benchmark(config.data)
    prompts = markov_prompts(chain, ec.num_samples, pc.prompt_len, seed=[int(ec.seed), 2])
    states = np.array([state_of(p, order=chain.order, num_symbols=chain.num_symbols) for p in prompts])
    alphabet_ids = ctx.tokenizer.encode_array(config.data.markov.alphabet).astype(np.int32)
    prompt_tokens = alphabet_ids[prompts]
    sample, score = make_sampler(ctx.graphdef, alphabet_ids, pc.horizon, ctx.setup)
    key = jax.random.key(ec.seed)
    bs = ec.batch_size

    def sample_all(params, salt):
        return _sample_all(sample, params, prompt_tokens, jax.random.fold_in(key, salt), bs)

    reference = ctx.frozen.get("reference")
    if reference is None and config.train.init_from:  # the reference log-probs came with the data: the
        # starting model is still the one the gain is measured from
        from lm.io import checkpoint as ckpt

        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ctx.params)
        reference = ckpt.restore_params(config.train.init_from, target).tree
    if reference is None:
        raise ValueError("markov_optimum needs the starting policy: the dpo objective's frozen reference, "
                         "or train.init_from")
    pol_syms, pol_logp = sample_all(ctx.params, 0)
    ref_syms, ref_logp = sample_all(reference, 1)
    j_pol = bench.monte_carlo_objective(pol_syms, pol_logp, states, beta)
    j_ref = bench.monte_carlo_objective(ref_syms, ref_logp, states, beta)
    values = bench.optimal_policy(beta)[1][0]
    j_opt = float(values[states].mean())
    mu = np.bincount(states, minlength=bench.num_states) / len(states)
    j_chain = bench.objective(bench.transitions, beta, mu).objective
    ref_logp_of_pol = _batched(lambda p, s: (score(reference, p, s),), bs, prompt_tokens, pol_syms)[0]
    model_kl = float((pol_logp.sum(1) - ref_logp_of_pol.sum(1)).mean())
    # against the model reference π_m: J_m(π) = E_π[r] − β·KL(π‖π_m), maximized by π_m·exp(r/β)/Z at
    # β·log E_{π_m}[exp(r/β)], estimated from the reference's own samples (a log-mean-exp: biased low)
    ref_rewards = bench.reward(ref_syms) / beta
    top = ref_rewards.max()
    j_opt_model = float(beta * (top + np.log(np.mean(np.exp(ref_rewards - top)))))
    j_pol_model = j_pol.reward - beta * model_kl
    gain = j_opt - j_ref.objective
    frac = (j_pol.objective - j_ref.objective) / gain
    out = {"optimal_objective": j_opt, "policy_objective": j_pol.objective,
           "policy_objective_stderr": j_pol.stderr, "reference_objective": j_ref.objective,
           "reference_objective_stderr": j_ref.stderr, "chain_objective": j_chain,
           "fraction_of_optimal_gain": frac,
           "fraction_of_optimal_gain_stderr": math.hypot(j_pol.stderr, j_ref.stderr) / abs(gain),
           "fraction_of_optimal_gain_vs_chain": (j_pol.objective - j_chain) / (j_opt - j_chain),
           "policy_reward": j_pol.reward, "policy_kl": j_pol.kl, "reference_reward": j_ref.reward,
           "reference_kl": j_ref.kl, "optimal_kl": bench.objective(bench.optimal_policy(beta)[0], beta, mu).kl,
           "policy_objective_model_reference": j_pol_model, "policy_kl_model_reference": model_kl,
           "optimal_objective_model_reference": j_opt_model, "reference_objective_model_reference": j_ref.reward,
           "fraction_of_optimal_gain_model_reference": (j_pol_model - j_ref.reward) / (j_opt_model - j_ref.reward),
           "markov_optimum_samples": int(len(states))}
    if jax.process_index() == 0:
        print(f"Markov benchmark (β={beta}, N={pc.horizon}, {len(states)} samples each): J(π*) = {j_opt:.3f} exact; "
              f"J(policy) = {j_pol.objective:.3f} ± {j_pol.stderr:.3f} (reward {j_pol.reward:.3f}, KL {j_pol.kl:.3f}); "
              f"J(reference model) = {j_ref.objective:.3f} ± {j_ref.stderr:.3f}; J(chain) = {j_chain:.3f}; "
              f"fraction of optimal gain {frac:.3f} ± {out['fraction_of_optimal_gain_stderr']:.3f}")
    return out


def _sample_all(sample, params, prompt_tokens, key, batch_size):
    syms, logps = [], []
    for n, i in enumerate(range(0, len(prompt_tokens), batch_size)):
        s, lp = jax.device_get(sample(params, prompt_tokens[i:i + batch_size], jax.random.fold_in(key, n)))
        syms.append(s)
        logps.append(lp)
    return np.concatenate(syms).astype(np.int64), np.concatenate(logps).astype(np.float64)
