"""lm vs transformers (PyTorch) on the same imported model, on this CPU: training and decode tokens/s.

The model: a Llama built by transformers from a config (random weights, float32): d_model 512,
8 layers, 8 query / 4 key-value heads, mlp 1376, vocabulary 8192, untied (~31.6M parameters),
saved with save_pretrained and imported by lm.interop.hf.load, so both run identical weights.

* train: one step = forward + backward + AdamW update on a [B, T] batch of random tokens, next-token
  cross-entropy over all positions (lm: one jitted step, layers unrolled and causal attention blocks
  of 64 as configs/base.py; torch: model(...).logits, F.cross_entropy, torch.optim.AdamW), the
  median of `--steps` steps after 2 warm-up steps. tokens/s = B·T / step time.
* decode: greedy, a random 16-token prompt per row, `--new` new tokens, batch 1 and 8 (lm:
  lm.sampling.generate_batch with its KV cache; torch: model.generate with its KV cache and
  do_sample=False), the best of `--repeats` runs after a warm-up run. tokens/s = B·new / time.

    python benchmarks/bench_hf.py            # needs the hf extra; writes benchmarks/results/hf.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# torch's OpenMP threads otherwise spin after each parallel region, taking the cores XLA runs on next
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from lm import sampling  # noqa: E402
from lm.interop import hf  # noqa: E402

CONFIG = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=1376, rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
              max_position_embeddings=2048)


def time_lm_train(model, tokens, steps):
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    opt = optax.adamw(1e-4)
    opt_state = opt.init(params)
    b, t = tokens.shape[0], tokens.shape[1] - 1
    pos, seg = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p)(x, pos, seg).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    x, y = jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, x, y)
        loss.block_until_ready()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_torch_train(model, tokens, steps):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.as_tensor(tokens[:, :-1].astype(np.int64)), torch.as_tensor(tokens[:, 1:].astype(np.int64))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    model.eval()
    return statistics.median(times)


def time_lm_decode(model, prompts, new, repeats):
    settings = sampling.SamplingConfig(temperature=0.0, max_new_tokens=new)
    graphdef, params = nnx.split(model)
    best, out = float("inf"), None
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = sampling.generate_batch(graphdef, params, prompts, settings, seed=0)
        best = min(best, time.perf_counter() - start)
    return best, out.tokens


def time_torch_decode(model, prompts, new, repeats):
    ids = torch.as_tensor(np.asarray(prompts, np.int64))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    best, out = float("inf"), None
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False)
            best = min(best, time.perf_counter() - start)
    return best, out[:, ids.shape[1]:].numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hf.md"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.float32).eval()
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d, safe_serialization=True)
        lm_model = hf.load(d, scan_layers=False, attention_block=64)
    n_params = sum(p.numel() for p in hf_model.parameters())
    rng = np.random.default_rng(0)
    rows = []
    tokens = rng.integers(0, CONFIG["vocab_size"], (args.batch, args.seq + 1)).astype(np.int32)
    lm_t, torch_t = time_lm_train(lm_model, tokens, args.steps), time_torch_train(hf_model, tokens, args.steps)
    n = args.batch * args.seq
    rows.append((f"train step, B×T = {args.batch}×{args.seq}", n / lm_t, n / torch_t, ""))
    for batch in (1, 8):
        prompts = rng.integers(0, CONFIG["vocab_size"], (batch, 16)).tolist()
        lm_d, lm_tok = time_lm_decode(lm_model, prompts, args.new, args.repeats)
        torch_d, torch_tok = time_torch_decode(hf_model, prompts, args.new, args.repeats)
        same = float(np.mean(np.asarray(lm_tok) == torch_tok))
        rows.append((f"greedy decode, batch {batch}, 16 + {args.new} tokens", batch * args.new / lm_d,
                     batch * args.new / torch_d, f"{same:.0%} same tokens"))
    lines = [f"Model: Llama, {n_params / 1e6:.1f}M parameters, float32, random weights (transformers config, imported "
             f"into lm). Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}; "
             f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}.", "",
             "| workload | lm tokens/s | transformers tokens/s | lm / transformers | note |", "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}× | {note} |" for name, a, b, note in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("# lm vs transformers on the same imported model (`python benchmarks/bench_hf.py`)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
