"""lm.sampling: the logit filters against their definitions, the sampled distribution against the
filtered softmax (chi-square), and the KV-cache decode loop against full recomputation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from lm import sampling
from lm.model import ModelConfig, Transformer, cache_sizes, cpu
from lm.sampling import SamplingConfig, generate, generate_batch

# jitted once each (knobs are traced): far fewer compilations than running them op by op
apply_temperature, top_k_filter, top_p_filter, min_p_filter, filter_logits, sample_token = map(jax.jit, (
    sampling.apply_temperature, sampling.top_k_filter, sampling.top_p_filter, sampling.min_p_filter,
    sampling.filter_logits, sampling.sample_token))

# -- filters ----------------------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)  # distinct: no boundary ties


def _softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def reference_probs(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The filtered, renormalized distribution, written from the definitions in float64."""
    x = np.asarray(x, np.float64)
    if temperature == 0:
        q = np.zeros_like(x)
        q[np.argmax(x)] = 1.0
        return q
    x = x / temperature
    if 0 < top_k < len(x):
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
    if top_p < 1:
        q = _softmax64(x)
        order = np.argsort(-q)
        m = int(np.searchsorted(np.cumsum(q[order]), top_p)) + 1  # fewest with mass ≥ p
        x = np.where(q >= q[order[m - 1]], x, -np.inf)
    if min_p > 0:
        q = _softmax64(x)
        x = np.where(q >= min_p * q.max(), x, -np.inf)
    return _softmax64(x)


def kept(filtered):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered))).tolist())


def test_off_settings_are_exact_no_ops():
    x = jnp.asarray(LOGITS).at[3].set(-jnp.inf)  # an already-dropped token stays as it is
    for out in (top_k_filter(x, 0), top_k_filter(x, len(LOGITS)), top_k_filter(x, 1000),
                top_p_filter(x, 1.0), min_p_filter(x, 0.0), apply_temperature(x, 1.0), filter_logits(x)):
        np.testing.assert_array_equal(out, x)


def test_temperature_divides_and_zero_is_first_argmax():
    np.testing.assert_allclose(apply_temperature(LOGITS, 0.5), LOGITS / 0.5, rtol=1e-6)
    tied = jnp.array([0.0, 3.0, 1.0, 3.0])
    assert kept(apply_temperature(tied, 0.0)) == {1}


def test_top_k_keeps_the_k_largest_and_all_ties_at_the_boundary():
    assert kept(top_k_filter(LOGITS, 3)) == {0, 1, 2}
    tied = jnp.array([3.0, 1.0, 2.0, 2.0, 0.0])
    assert kept(top_k_filter(tied, 2)) == {0, 2, 3}  # the 2nd largest (2.0) is tied: both kept
    assert kept(top_k_filter(tied, 3)) == {0, 2, 3}
    assert kept(top_k_filter(tied, 4)) == {0, 1, 2, 3}
    batch = jnp.stack([tied, -tied])
    assert [kept(row) for row in top_k_filter(batch, 1)] == [{0}, {4}]


def test_top_p_keeps_exactly_the_minimal_nucleus():
    rng = np.random.default_rng(0)
    filt = top_p_filter
    for _ in range(200):
        x = rng.normal(size=12).astype(np.float32) * rng.uniform(0.5, 4)
        p = float(rng.uniform(0.01, 0.999))
        members = kept(filt(x, p))
        q = _softmax64(x)
        inside, outside = q[sorted(members)], np.delete(q, sorted(members))
        assert inside.sum() >= p - 1e-6  # reaches p ...
        assert inside.sum() - inside.min() < p + 1e-6  # ... and no smaller top set does
        assert outside.size == 0 or inside.min() > outside.max()  # the most likely tokens
    # a hand-checked case: q = (.5, .25, .125, .125): p = .6 needs 2 tokens, p = .8 needs 3 + its tie
    x = np.log(np.array([0.5, 0.25, 0.125, 0.125], np.float32))
    assert kept(top_p_filter(x, 0.6)) == {0, 1}
    assert kept(top_p_filter(x, 0.8)) == {0, 1, 2, 3}
    assert kept(top_p_filter(x, 0.5)) == {0}  # q_(1) = .5 already reaches p = .5


def test_min_p_keeps_tokens_with_p_at_least_min_p_times_p_max():
    rng = np.random.default_rng(1)
    filt = min_p_filter
    for _ in range(100):
        x = rng.normal(size=12).astype(np.float32) * 3
        min_p = float(rng.uniform(0.001, 1))
        q = _softmax64(x)
        expected = set(np.flatnonzero(q >= min_p * q.max() * (1 + 1e-5)).tolist())
        borderline = set(np.flatnonzero(q >= min_p * q.max() * (1 - 1e-5)).tolist())
        assert expected <= kept(filt(x, min_p)) <= borderline


@pytest.mark.parametrize("settings", [
    dict(top_k=1), dict(top_p=1e-4), dict(min_p=1.0), dict(temperature=0.0),
    dict(temperature=1e-3, top_k=2, top_p=0.5, min_p=0.5)])
def test_all_but_one_filtered_always_draws_the_argmax(settings):
    x = jnp.asarray(LOGITS)[::-1]  # argmax at index 7
    assert kept(filter_logits(x, **settings)) == {7}
    keys = jax.random.split(jax.random.key(0), 64)
    draws = jax.vmap(lambda k: sample_token(k, x, **settings))(keys)
    assert set(np.asarray(draws).tolist()) == {7}


def test_greedy_is_argmax_whatever_the_other_filters():
    x = jax.random.normal(jax.random.key(3), (16, 50))
    out = sample_token(jax.random.key(0), x, temperature=0.0, top_k=5, top_p=0.3, min_p=0.2)
    np.testing.assert_array_equal(out, jnp.argmax(x, axis=-1))


@jax.jit
def _draws(key, logits, knobs):
    keys = jax.random.split(key, 40_000)
    return jax.vmap(lambda k: sample_token(k, logits, **knobs))(keys)


@pytest.mark.parametrize("settings", [
    dict(), dict(temperature=0.5), dict(temperature=2.0), dict(top_k=3), dict(top_p=0.6),
    dict(min_p=0.2), dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
    dict(temperature=1.5, top_p=0.75)])
def test_draw_frequencies_match_the_filtered_softmax(settings):
    knobs = dict(dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), **settings)
    knobs = {k: np.float32(v) if k != "top_k" else np.int32(v) for k, v in knobs.items()}
    draws = np.asarray(_draws(jax.random.key(7), jnp.asarray(LOGITS), knobs))
    counts = np.bincount(draws, minlength=len(LOGITS))
    expected = reference_probs(LOGITS, **settings) * len(draws)
    assert np.all(counts[expected == 0] == 0), "a filtered-out token was drawn"
    support = expected > 0
    assert support.sum() >= 2
    chi2 = stats.chisquare(counts[support], expected[support])
    assert chi2.pvalue > 1e-3, (settings, counts, expected.round(1))


# -- decoding ----------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                  tie_embeddings=False, decode_block=4)  # decode steps switch between cache sizes 4, 8, .., 32
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [15]]
MAX_LEN, NEW = 32, 12  # one compiled shape for every decoding test below


@pytest.fixture(scope="module")
def model():
    """A Transformer with random weights drawn by numpy (jax's eager init compiles slowly on CPU)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.5 * rng.standard_normal(leaf.shape, np.float32)), abstract)
    return nnx.merge(graphdef, params)


def _run(model, prompts=PROMPTS, seed=0, unroll_layers=True, **settings):
    cfg = SamplingConfig(**dict(dict(max_new_tokens=NEW), **settings))
    return generate_batch(model, None, prompts, cfg, seed=seed, max_len=MAX_LEN, keep_logits=True,
                          unroll_layers=unroll_layers)


def _recompute_last_logits(model, sequences):
    """Full forward pass over each whole sequence (right-padded, segment 0) → logits at its last token."""
    length = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), length), np.int32)
    segment_ids = np.zeros_like(tokens)
    for r, seq in enumerate(sequences):
        tokens[r, :len(seq)], segment_ids[r, :len(seq)] = seq, 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    logits = nnx.jit(lambda m, *a: m(*a))(model, tokens, positions, segment_ids)
    return np.asarray(logits)[np.arange(len(sequences)), [len(s) - 1 for s in sequences]]


def _with_config(model, **fields):
    """The same parameters under a ModelConfig with `fields` replaced."""
    cfg = dataclasses.replace(CFG, **fields)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def test_cache_sizes_cover_every_fill_with_at_most_eight_compiled_sizes():
    assert cache_sizes(32, 4) == [4, 8, 12, 16, 20, 24, 28, 32]
    assert cache_sizes(528, 128) == [128, 256, 384, 512, 528]
    assert cache_sizes(4096, 128) == [512, 1024, 1536, 2048, 2560, 3072, 3584, 4096]
    assert cache_sizes(100, 128) == cache_sizes(100, 0) == [100]


@pytest.mark.parametrize("unroll_layers,decode_block", [(True, 4), (False, 4), (True, 0)],
                         ids=["per-layer", "stacked", "all-slots"])
def test_cached_logits_equal_full_recomputation_at_every_step(model, unroll_layers, decode_block):
    model = _with_config(model, decode_block=decode_block)
    out = _run(model, temperature=1.0, stop_ids=(7,), unroll_layers=unroll_layers)
    assert out.lengths.min() >= 1 and out.lengths.max() == NEW
    prefixes, cached = [], []
    for r, prompt in enumerate(PROMPTS):
        for i in range(out.lengths[r]):
            prefixes.append(prompt + out.tokens[r, :i].tolist())
            cached.append(out.logits[r, i])
    np.testing.assert_allclose(np.stack(cached), _recompute_last_logits(model, prefixes), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("row_blocks", [1, 2])
def test_one_row_decoding_with_weights_in_row_blocks_equals_full_recomputation(model, row_blocks, monkeypatch):
    """Batch 1: each decode product has one row, so with row blocks (`lm.model.cpu.matmul_blocks`) it
    is computed as k partial products summed; the logits still equal a full forward pass."""
    monkeypatch.setattr(cpu, "default_row_blocks", lambda: row_blocks)
    prompt = PROMPTS[1]
    out = _run(model, prompts=[prompt], temperature=1.0)
    prefixes = [prompt + out.tokens[0, :i].tolist() for i in range(NEW)]
    np.testing.assert_allclose(out.logits[0], _recompute_last_logits(model, prefixes), atol=2e-5, rtol=1e-5)


def test_greedy_decoding_takes_the_argmax_of_the_cached_logits(model):
    out = _run(model, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, out.logits.argmax(-1))


def test_stop_ids_end_each_row_separately(model):
    free = _run(model, temperature=0.0)
    stop = int(free.tokens[0, 3])
    stopped = _run(model, temperature=0.0, stop_ids=(stop,))
    for r in range(len(PROMPTS)):
        row = free.tokens[r].tolist()
        n = row.index(stop) + 1 if stop in row else NEW
        assert stopped.lengths[r] == n
        assert stopped.tokens[r, :n].tolist() == row[:n]
        assert (stopped.tokens[r, n:] == -1).all()
    assert stopped.lengths[0] <= 4


def test_same_seed_same_text_other_seed_other_text(model):
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=NEW)
    a = generate(model, None, PROMPTS, cfg, seed=11, max_len=MAX_LEN)
    b = generate(model, None, PROMPTS, cfg, seed=11, max_len=MAX_LEN)
    c = generate(model, None, PROMPTS, cfg, seed=12, max_len=MAX_LEN)
    assert a == b and a != c
    assert [len(row) for row in a] == [NEW] * 3


def test_a_row_does_not_depend_on_its_neighbours_or_their_padding(model):
    short = PROMPTS[0]
    alone_ish = _run(model, prompts=[short, short, short], seed=5, temperature=1.0)
    mixed = _run(model, prompts=[short, PROMPTS[1], [9] * 14], seed=5, temperature=1.0)
    np.testing.assert_array_equal(alone_ish.tokens[0], mixed.tokens[0])
    np.testing.assert_allclose(alone_ish.logits[0], mixed.logits[0], atol=2e-5)


def test_streaming_in_chunks_gives_the_same_text(model):
    cfg = SamplingConfig(temperature=1.0, top_k=10, max_new_tokens=NEW, stop_ids=(7,))
    whole = generate(model, None, PROMPTS, cfg, seed=3, max_len=MAX_LEN)
    chunks = []
    generate_batch(model, None, PROMPTS, cfg, seed=3, max_len=MAX_LEN, chunk_size=5, on_chunk=chunks.append)
    assert len(chunks) >= 2
    assert [sum((c[r] for c in chunks), []) for r in range(len(PROMPTS))] == whole


def test_repeated_calls_do_not_recompile(model):
    cfg = SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=NEW)
    generate(model, None, PROMPTS, cfg, seed=0, max_len=MAX_LEN)
    sizes = sampling.decode._prefill._cache_size(), sampling.decode._decode_chunk._cache_size()
    graphdef, params = nnx.split(model)
    other = SamplingConfig(temperature=1.3, top_k=4, min_p=0.1, max_new_tokens=NEW, stop_ids=(3, 4))
    generate(graphdef, params, [[5, 6], [7], [8, 9, 10]], other, seed=9, max_len=MAX_LEN)
    assert (sampling.decode._prefill._cache_size(), sampling.decode._decode_chunk._cache_size()) == sizes


# -- bad input: clear errors before anything compiles -----------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(min_p=1.2), "min_p"), (dict(max_new_tokens=0), "max_new_tokens")])
def test_bad_sampling_settings_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**fields)


@pytest.mark.parametrize("prompts, max_len, message", [
    ([[1, 2], []], None, "prompt 1 is empty"), ([], None, "non-empty"),
    ([list(range(40))], MAX_LEN, "prompt 0 has 40 tokens, which is longer than max_len=32"),
    ([[1] * 25], MAX_LEN, "plus max_new_tokens=12 exceeds max_len=32"),
    ([[1, 99]], MAX_LEN, r"token 1: id 99 is outside the vocabulary \[0, 48\)"),
    ([[1, -1]], MAX_LEN, "id -1 is outside")])
def test_bad_prompts_are_rejected_before_compiling(model, prompts, max_len, message):
    before = sampling.decode._prefill._cache_size()
    with pytest.raises(ValueError, match=message):
        generate(model, None, prompts, SamplingConfig(max_new_tokens=NEW), seed=0, max_len=max_len)
    assert sampling.decode._prefill._cache_size() == before


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as training leaves it: config.json and a checkpoint of random weights."""
    from configs import base
    from lm.io import checkpoint

    run = str(tmp_path_factory.mktemp("run"))
    config = base.get_config()
    config.model.update(dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64))
    checkpoint.write_config(run, config)
    cfg = ModelConfig(**dict(config.model, vocab_size=263))  # the byte tokenizer's vocabulary
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.5 * rng.standard_normal(leaf.shape, np.float32)), abstract)
    saver = checkpoint.Checkpointer(run, keep=1, async_save=False)
    saver.save(1, {"params": nnx.to_pure_dict(params)}, {})
    saver.wait()
    saver.close()
    return run


def _cli(args, stdin=""):
    import io

    from lm.cli import sample
    out = io.StringIO()
    code = sample.main(args, out=out, stdin=io.StringIO(stdin))
    return code, out.getvalue()


def test_cli_streams_reproducible_samples_in_plain_and_chat_mode(run_dir):
    from lm.io.checkpoint import load_for_inference
    from lm.data import build_tokenizer

    common = [f"--run_dir={run_dir}", "--max_new_tokens=10", "--temperature=0.9", "--chunk_size=3"]
    code, text = _cli(common + ["--prompt=Hi", "--num_samples=2", "--seed=4", "--chat=off"])
    assert code == 0
    parts = text.split("--- sample 2/2 (seed 5) ---\n")
    assert parts[0].startswith("--- sample 1/2 (seed 4) ---\nHi") and parts[1].startswith("Hi")
    # sample 2 alone, from its own seed, without streaming: the same text
    _, graphdef, params, config = load_for_inference(run_dir)
    tokenizer = build_tokenizer(config.data)
    ids = generate(graphdef, params, [[tokenizer.bos_id] + tokenizer.encode("Hi")],
                   SamplingConfig(temperature=0.9, max_new_tokens=10, stop_ids=(tokenizer.eos_id,)), seed=5)[0]
    assert parts[1] == "Hi" + tokenizer.decode(ids).encode("utf-8", "replace").decode() + "\n"

    code, text = _cli(common + ["--chat"], stdin="hi\nok\n\n")  # two user turns, then quit
    assert code == 0 and text.count("assistant: ") == 2


@pytest.mark.parametrize("flag", ["--temperature=-1", "--top_p=0", "--top_p=1.5", "--top_k=-2", "--num_samples=0"])
def test_cli_rejects_bad_settings_before_loading(flag, capsys):
    code, _ = _cli(["--run_dir=/nonexistent", flag])
    assert code == 2 and "error" in capsys.readouterr().err


def test_cached_decoding_with_qkv_biases_and_llama3_rope_equals_full_recomputation(model):
    """Qwen2's q/k/v biases (fused into one bias vector for decoding) and Llama 3's rescaled rotary
    frequencies: cached logits still equal a full forward pass, at batch 1 and batch 2."""
    cfg = dataclasses.replace(CFG, qkv_bias=True, rope_scaling="llama3", rope_original_max_position=16)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(1)
    biased = nnx.merge(graphdef, jax.tree.map(
        lambda leaf: jnp.asarray(0.5 * rng.standard_normal(leaf.shape, np.float32)), abstract))
    for prompts in (PROMPTS[:1], PROMPTS):
        out = _run(biased, prompts=prompts, temperature=1.0)
        prefixes, cached = [], []
        for r, prompt in enumerate(prompts):
            for i in range(out.lengths[r]):
                prefixes.append(prompt + out.tokens[r, :i].tolist())
                cached.append(out.logits[r, i])
        np.testing.assert_allclose(np.stack(cached), _recompute_last_logits(biased, prefixes), atol=2e-5, rtol=1e-5)
