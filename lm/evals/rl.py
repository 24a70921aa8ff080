""""rl_exact_match": held-out greedy exact match of an RL policy and of the frozen reference it
started from (the SFT model), on the same prompts (lm/evals/exact_match.py's rule and knobs).

    rl_exact_match, sft_exact_match     fractions of config.eval.exact_match.examples prompts
    rl_error_rate, sft_error_rate       1 − each
    error_rate_ratio                    rl_error_rate / sft_error_rate (≤ 0.5: RL halved the errors)
"""

from __future__ import annotations

import time

import jax


def evaluate(ctx) -> dict:
    from lm import data
    from lm.evals.exact_match import evaluate_answers, mesh_of

    config, started = ctx.config, time.perf_counter()
    valid = data.build_source(config.data, split="valid", seq_len=config.train.seq_len, seed=config.seed,
                              tokenizer=ctx.tokenizer)
    if not hasattr(valid, "example") or "messages" not in valid.example(0):
        if jax.process_index() == 0:
            print(f"rl_exact_match: skipped for data.source={config.data.source!r} (no chat answers)")
        return {}
    ec = config.eval.exact_match
    examples = [valid.example(i) for i in range(ec.examples)]
    models = {"rl": (ctx.graphdef, ctx.params)}
    if "reference" in ctx.frozen:
        models["sft"] = (ctx.setup.frozen_graphdefs["reference"], ctx.frozen["reference"])
    out = {}
    for name, (graphdef, params) in models.items():
        result = evaluate_answers(graphdef, params, ctx.tokenizer, examples, max_answer_tokens=ec.max_answer_tokens,
                                  continue_tokens=ec.continue_tokens, batch_size=ec.batch_size, seed=config.seed,
                                  **mesh_of(ctx))
        out[f"{name}_exact_match"] = result["exact_match"]
        out[f"{name}_error_rate"] = 1.0 - result["exact_match"]
        if jax.process_index() == 0:
            print(f"{name}: held-out exact match (greedy) {100 * result['exact_match']:.1f}% of {result['n']}")
            for r in result["replies"][:ec.print_examples]:
                print(f"  {r['prompt']}\n    → {r['reply']!r} (expected {r['answer']!r})")
    if "sft_error_rate" in out and out["sft_error_rate"] > 0:
        out["error_rate_ratio"] = out["rl_error_rate"] / out["sft_error_rate"]
    out["rl_exact_match_n"] = len(examples)
    out["rl_eval_seconds"] = time.perf_counter() - started
    return out


def markov_gain(ctx) -> dict:
    """"markov_gain": on the Markov reward task (data.source='markov', rl.reward='markov'), the
    fraction of the KL-regularized optimum's gain the policy reaches,

        (J(π) − J(P)) / (J(π*) − J(P)),   J(π) = E_π[r] − β·KL(π‖P)  over N = rl.max_new_tokens characters

    with β = rl.kl_coef, P the true chain (exact J(P), J(π*): lm/data/markov_reward.py) and J(π)
    estimated from eval.exact_match.examples samples of the policy at temperature 1 from
    held-out start states (MarkovReward.monte_carlo_objective); the same for the frozen reference
    (the pretrained model, ≈ 0). A sample with a character outside the alphabet is dropped and
    counted (markov_invalid_samples)."""
    import functools

    import numpy as np

    from lm.data.markov_reward import MarkovReward, fraction_of_optimal_gain
    from lm.data.prompts import MarkovPrompts, PromptIterator
    from lm.parallel import sharding as shd
    from lm.sampling.rollout import COMPILER_OPTIONS, left_padded, rollout

    config, rc = ctx.config, ctx.config.rl
    prompts_source = MarkovPrompts(config.data.markov, "valid", seed=config.seed)
    chain = prompts_source.source
    task = MarkovReward.from_source(chain, horizon=rc.max_new_tokens, reward_scale=rc.reward_options.markov_scale,
                                    seed=rc.reward_options.markov_seed)
    n = config.eval.exact_match.examples
    prompt_len = config.train.seq_len - rc.max_new_tokens
    rows = PromptIterator(prompts_source, ctx.tokenizer, batch_size=n, prompt_len=prompt_len,
                          answer_len=1).rows(range(n))
    starts = np.array([prompts_source.start_state(i) for i in range(n)])
    prompt = left_padded(rows["prompt"], rows["prompt_lengths"])
    knobs = {"temperature": np.float32(1), "top_k": np.int32(0), "top_p": np.float32(1), "min_p": np.float32(0)}
    stop = np.full((4,), -1, np.int32)
    index = {ord(ch): i for i, ch in enumerate(chain.alphabet)}
    beta = rc.kl_coef
    j_ref = task.objective(task.reference_policy(), beta, chain.stationary).objective
    j_opt = task.optimal_objective(beta, chain.stationary)
    out = {"markov_j_reference_chain": j_ref, "markov_j_optimal": j_opt}
    setup = ctx.setup
    models = {"rl": (ctx.graphdef, ctx.params, setup.state_shardings.params)}
    if "reference" in ctx.frozen:
        models["sft"] = (setup.frozen_graphdefs["reference"], ctx.frozen["reference"],
                         setup.frozen_shardings["reference"])
    # in/out shardings from the run's mesh: rows over the batch axes when they divide, else replicated
    rep = shd.replicated(setup.mesh)
    batch_devices = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    rows = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES)) if n % batch_devices == 0 else rep
    for name, (graphdef, params, params_sharding) in models.items():
        run = jax.jit(functools.partial(rollout, graphdef, max_new_tokens=rc.max_new_tokens),
                      in_shardings=(params_sharding, rows, rep, rep, rep), out_shardings=rows,
                      compiler_options=COMPILER_OPTIONS)
        sampled = jax.device_get(run(params, prompt, jax.random.key(config.seed + 99), knobs, stop))
        tokens, logprobs = np.asarray(sampled["tokens"]), np.asarray(sampled["policy_logprobs"])
        ok = np.array([all(int(t) in index for t in row) for row in tokens])
        chars = np.array([[index.get(int(t), 0) for t in row] for row in tokens])
        mc = task.monte_carlo_objective(chars[ok], logprobs[ok], starts[ok], beta)
        out[f"{name}_markov_j"] = mc.objective
        out[f"{name}_markov_j_stderr"] = mc.stderr
        out[f"{name}_markov_reward"] = mc.reward
        out[f"{name}_markov_kl"] = mc.kl
        out[f"{name}_fraction_of_optimal_gain"] = fraction_of_optimal_gain(mc.objective, j_ref, j_opt)
        out[f"{name}_markov_invalid_samples"] = int((~ok).sum())
    if jax.process_index() == 0:
        print(f"Markov task (β={beta}): J(P) = {j_ref:.4f}, J(π*) = {j_opt:.4f}; " + "; ".join(
            f"{name}: J = {out[f'{name}_markov_j']:.4f} ± {out[f'{name}_markov_j_stderr']:.4f}, fraction of the "
            f"optimal gain {out[f'{name}_fraction_of_optimal_gain']:.3f}" for name in models))
    return out


