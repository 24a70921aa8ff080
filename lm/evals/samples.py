"""A few continuations printed at the end of a run (greedy by default; config.sample)."""

from __future__ import annotations

import jax


def evaluate(ctx) -> dict:
    """Print `config.sample.num_samples` continuations of prompts taken from validation data (or
    `config.sample.prompt`). Returns no summary entries."""
    from lm import sampling

    config, tokenizer = ctx.config, ctx.tokenizer
    sc = config.sample
    if not sc.num_samples or jax.process_index() != 0:
        return {}
    if sc.prompt:
        prompts = [tokenizer.encode(sc.prompt)] * sc.num_samples
    else:
        batch = next(iter(ctx.valid_batches()))
        batch = batch.get("chosen", batch)  # a preference batch: its chosen side
        prompts = [row[:16].tolist() for row in batch["inputs"][: sc.num_samples]]
    settings = sampling.SamplingConfig(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                                       max_new_tokens=sc.max_new_tokens)
    from lm.evals.exact_match import mesh_of

    outs = sampling.generate(ctx.graphdef, ctx.params, prompts, settings, seed=config.seed, **mesh_of(ctx))
    print(f"samples ({'greedy' if sc.temperature == 0 else f'temperature {sc.temperature}'}):")
    for prompt, out in zip(prompts, outs):
        print(f"  {tokenizer.decode(prompt)!r} → {tokenizer.decode(out)!r}")
    return {}
