"""Decode speed: the KV-cache decoder of lm.sampling vs recomputing the whole prefix every step.

Model: d_model 512, 8 layers, 8 query / 4 key-value heads, mlp_dim 1376, float32, byte-level
vocabulary 264 (tied embeddings). A random 16-token prompt per row, 512 generated tokens
(temperature 1, top-p 0.95, no stop ids, so every row runs to the end), batch 1 and 8.

* cached: `lm.sampling.generate_batch` (prefill + one jitted while_loop over the cache), with the
  the decode layout's per-layer modules (lm/model/cpu.py, the CPU default) and its stacked blocks
  under a scan (one timed run). Total time is the best of `--repeats` runs
  after a compiling warm-up; per-token times come from as many runs in chunks of 32 tokens (the
  best run of each chunk): the first and last 128 tokens (chunk 1 includes the prefill) and the
  steady state (median chunk after the first). Every time here is a best of several runs and every
  bandwidth the best measured, since other processes share the machine.
* recompute: every step runs the model over the whole prefix (prompt + tokens so far; hidden
  states of all positions, logits of the last only) and samples the next token, the same sampler.
  The prefix is right-padded to a multiple of 64 (9 compiled shapes). The cost of a step depends
  only on that shape, so by default each shape is timed (best of `--recompute-reps` steps) and
  the loop time is Σ_shape (steps at that shape × its step time); `--full-recompute` runs the
  whole 512-step loop instead (slow on a CPU).
* bandwidth bound (batch 1): a decode step must read every parameter once (4 bytes each; the
  tied embedding is read whole by the output projection). Read bandwidth is measured in the same
  run as the faster of a jitted sum and a jitted matrix-vector product over a 512 MiB float32
  array; bound = parameter bytes / bandwidth, and "% of bound" = bound / steady time per token.

    python benchmarks/bench_sampling.py                  # the table in benchmarks/results/sampling.md
    python benchmarks/bench_sampling.py --new-tokens 64 --batches 1 --repeats 1   # quick
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lm import sampling  # noqa: E402
from lm.model import ModelConfig, Transformer, param_count  # noqa: E402

BUCKET = 64  # recompute: prefix widths are padded to a multiple of this
CHUNK = 32  # cached: tokens per timed chunk
CFG = ModelConfig(vocab_size=264, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, mlp_dim=1376)


def best_time(fn, reps):
    """The fastest of `reps` runs: the one least disturbed by other processes on a shared machine."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def read_bandwidth(mib=512, reps=5):
    """Bytes/s: the faster of a full reduction and a matrix-vector product over `mib` MiB of float32."""
    n = mib * 2**20 // 4
    data = jnp.asarray(np.random.default_rng(0).standard_normal(n, np.float32))
    matrix = data.reshape(-1, 1024)
    vector = jnp.ones((1024,), jnp.float32)
    reduce_fn = jax.jit(jnp.sum)
    gemv_fn = jax.jit(lambda m, v: m @ v)
    jax.block_until_ready((reduce_fn(data), gemv_fn(matrix, vector)))
    t_reduce = best_time(lambda: reduce_fn(data), reps)
    t_gemv = best_time(lambda: gemv_fn(matrix, vector), reps)
    nbytes = n * 4
    del data, matrix
    return {"reduce": nbytes / t_reduce, "gemv": nbytes / t_gemv}


def make_prompts(batch, prompt_len, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG.vocab_size, size=(batch, prompt_len)).tolist()


def time_cached(graphdef, params, prompts, cfg, repeats, unroll_layers):
    kwargs = dict(seed=0, unroll_layers=unroll_layers)
    run = lambda: sampling.generate_batch(graphdef, params, prompts, cfg, **kwargs).tokens  # noqa: E731
    out = run()  # compile
    assert (out >= 0).all(), "a row stopped early"
    total = best_time(run, repeats)
    chunk_times = []
    for rep in range(repeats + 1):  # the first run compiles the chunked call
        marks = [time.perf_counter()]
        sampling.generate_batch(graphdef, params, prompts, cfg, chunk_size=CHUNK,
                                on_chunk=lambda new: marks.append(time.perf_counter()), **kwargs)
        if rep:
            chunk_times.append(np.diff(marks))
    per_token = np.min(chunk_times, axis=0) / CHUNK  # [chunks]: the best run of each chunk
    per_128 = 128 // CHUNK
    return total, per_token[:per_128].mean(), per_token[-per_128:].mean(), float(np.median(per_token[1:]))


def make_recompute_step(graphdef):
    @jax.jit
    def step(params, tokens, length, row_keys, knobs):
        """tokens [B, L]: the prefix in [0, length), padding after; writes the next token at `length`."""
        model = nnx.merge(graphdef, params)
        batch, width = tokens.shape
        index = jnp.arange(width, dtype=jnp.int32)
        segment_ids = jnp.broadcast_to(index < length, tokens.shape).astype(jnp.int32)
        positions = jnp.broadcast_to(index, tokens.shape)
        hidden = model.hidden_states(tokens, positions, segment_ids)
        last = jax.lax.dynamic_index_in_dim(hidden, length - 1, axis=1, keepdims=False)
        logits = model.logits_from_hidden(last).astype(jnp.float32)
        token = sampling.decode._sample_rows(row_keys, length, logits, knobs)
        return jax.lax.dynamic_update_index_in_dim(tokens, token, length, axis=1)
    return step


def time_recompute(graphdef, params, prompts, cfg, new_tokens, reps, full):
    """Seconds for the recompute loop, and its per-token seconds over the first and last 128 steps."""
    step = make_recompute_step(graphdef)
    knobs = {"temperature": np.float32(cfg.temperature), "top_k": np.int32(cfg.top_k),
             "top_p": np.float32(cfg.top_p), "min_p": np.float32(cfg.min_p)}
    prompt = np.asarray(prompts, np.int32)
    batch, prompt_len = prompt.shape
    row_keys = jax.random.split(jax.random.key(0), batch)
    lengths = prompt_len + np.arange(new_tokens)  # prefix length at each step
    widths = -(-(lengths + 1) // BUCKET) * BUCKET  # room for the token written at `length`
    per_step = np.zeros(new_tokens)
    if full:
        tokens = np.zeros((batch, widths[-1]), np.int32)
        tokens[:, :prompt_len] = prompt
        tokens = jnp.asarray(tokens)
        for width in np.unique(widths):  # compile every shape first
            jax.block_until_ready(step(params, tokens[:, :width], np.int32(prompt_len), row_keys, knobs))
        for i, (length, width) in enumerate(zip(lengths, widths)):
            start = time.perf_counter()
            out = jax.block_until_ready(step(params, tokens[:, :width], np.int32(length), row_keys, knobs))
            tokens = tokens.at[:, :width].set(out)
            per_step[i] = time.perf_counter() - start
    else:
        for width in np.unique(widths):
            tokens = jnp.zeros((batch, width), jnp.int32).at[:, :prompt_len].set(prompt)
            length = np.int32(lengths[widths == width][0])
            jax.block_until_ready(step(params, tokens, length, row_keys, knobs))  # compile
            per_step[widths == width] = best_time(lambda: step(params, tokens, length, row_keys, knobs), reps)
    return per_step.sum(), per_step[:128].mean(), per_step[-128:].mean()


def machine_description():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lscpu = "\n".join(lscpu.splitlines()[:20])
    except (OSError, subprocess.CalledProcessError):
        lscpu = platform.processor() or platform.machine()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return (f"at the end {tuple(round(x, 2) for x in load)}. jax {jax.__version__}, backend "
            f"{jax.default_backend()}, devices {jax.devices()}\n\n```\n{lscpu}\n```")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recompute-reps", type=int, default=2)
    parser.add_argument("--full-recompute", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "sampling.md"))
    args = parser.parse_args(argv)
    if args.new_tokens < 256 or args.new_tokens % 128:
        parser.error("--new-tokens must be a multiple of 128, at least 256 (first/last 128 are reported)")

    load_at_start = tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else ()
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
    param_bytes = 4 * param_count(params)
    bandwidths = [read_bandwidth()]  # measured again after every cached run; the best one is used
    cfg = sampling.SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=args.new_tokens)

    rows, recompute_time = [], {}
    for batch in args.batches:
        prompts = make_prompts(batch, args.prompt_len)
        recompute, re_first, re_last = time_recompute(graphdef, params, prompts, cfg, args.new_tokens,
                                                      args.recompute_reps, args.full_recompute)
        for unroll, name in ((True, "cached, per-layer (CPU default)"), (False, "cached, stacked (scan)")):
            repeats = args.repeats if unroll else 1  # the scan path is shown for comparison only
            cached, first, last, steady = time_cached(graphdef, params, prompts, cfg, repeats, unroll)
            rows.append((batch, name, cached, first, last, steady))
            bandwidths.append(read_bandwidth())
        rows.append((batch, "recompute" + ("" if args.full_recompute else " (per-shape estimate)"), recompute,
                     re_first, re_last, recompute / args.new_tokens))
        recompute_time[batch] = recompute
        print(f"batch {batch} done", file=sys.stderr)

    header = ("| batch | decoder | s for 512 tokens | tokens/s | ms/token, first 128 | ms/token, last 128 "
              "| speedup vs recompute | ms/token, steady | % of bandwidth bound |\n|---|---|---|---|---|---|---|---|---|")
    header = header.replace("512", str(args.new_tokens))
    best = max(max(b.values()) for b in bandwidths)
    bound = param_bytes / best  # seconds per decode step, at any batch
    lines = [header] + [
        f"| {b} | {name} | {t:.2f} | {b * args.new_tokens / t:,.0f} | {first * 1e3:.2f} | {last * 1e3:.2f} "
        f"| {recompute_time[b] / t:.1f}× | {steady * 1e3:.2f} | {bound / steady * 100:.0f}% |"
        for b, name, t, first, last, steady in rows]
    table = "\n".join(lines)
    measured = ", ".join(f"{b['reduce'] / 1e9:.1f}/{b['gemv'] / 1e9:.1f}" for b in bandwidths)
    notes = (f"Parameters: {param_count(params):,} ({param_bytes / 2**20:.1f} MiB float32). Read bandwidth "
             f"over 512 MiB float32, sum/matrix-vector in GB/s, measured before and after every cached run: "
             f"{measured}; the best, {best / 1e9:.1f} GB/s, gives the bound {bound * 1e3:.2f} ms per "
             f"decode step (parameters read once per step, whatever the batch). Prompt {args.prompt_len} "
             f"tokens, {args.new_tokens} generated, temperature 1, top-p 0.95. ms/token is per decode step "
             f"(all rows; tokens/s counts all rows). Cached per-token times come from runs in chunks of {CHUNK} "
             f"tokens, the best run of each chunk; 'first 128' includes the prefill; 'steady' is the median "
             f"chunk after the first, and '% of bandwidth bound' = bound / steady (recompute: / its mean).")
    print(table)
    print()
    print(notes)
    command = "python benchmarks/bench_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(f"# Sampling: KV-cache decoding vs recomputation\n\n`{command.strip()}`\n\n{table}\n\n{notes}\n\n"
                f"## Machine\n\nload average at the start {load_at_start}; {machine_description()}\n")
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
