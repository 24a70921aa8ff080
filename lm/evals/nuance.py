""""nuance": two correct phrasings of one answer and a hidden preference for one of them (the seed
documents' lesson on next-token prediction; experiments/rlhf_nuance.py).

The word chat task with data.word_chat.sentence_prob = 0.5 writes every answer either bare ('cba')
or as a sentence ('It is cba.'), equally often (lm/data/synthetic.py: `phrase`). Maximum
likelihood can only learn that 50/50 split; the preference for one phrasing (PREFERRED, the
sentence) is hidden from the data and known only to the labeller of pairs and to this evaluator.

A sampled reply is judged by `judge`:

    correct     it ended with <|end_of_turn|> and its result (the reply with the sentence frame
                removed, lm.data.synthetic.parse_phrasing) is the task's result, in either phrasing
    preferred   correct and in the PREFERRED phrasing
    rank        2 preferred, 1 correct in the other phrasing, 0 incorrect (`label_pairs` prefers
                the higher rank; equal ranks are a tie, dropped and counted)

The evaluator samples config.eval.nuance.samples_per_prompt replies at temperature 1 (no filter)
to each of config.eval.nuance.examples held-out prompts and reports sampled rates (a 50/50 policy
is not measured by its greedy answer), and the Monte-Carlo KL to the starting (SFT) model

    KL(π ‖ π_sft) ≈ (1/n)·Σ_samples Σ_{generated t} [log π(y_t | ·) − log π_sft(y_t | ·)]

both log-probabilities teacher-forced over the same prompt + reply. π_sft is the frozen reference
of the run (RL, DPO against the model), else train.init_from's parameters, else the policy itself
(a run that starts from nothing: KL 0). The prompts are data.word_chat's held-out ones, whatever
data.source is (a DPO run trains on pairs). The prompts (their padding too: eval.nuance.prompt_len)
and the sampling keys depend only on eval.nuance, so runs evaluated with the same knobs see the
same prompts and draws.

    nuance_correct, nuance_preferred          fractions of the n samples (with _stderr)
    nuance_preferred_among_correct            preferred / correct
    nuance_sentence, nuance_ended             sentence-phrased, ended with <|end_of_turn|>
    nuance_kl, nuance_kl_stderr               the KL estimate above (nats per reply)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import numpy as np

from lm.data.synthetic import BARE, SENTENCE, parse_phrasing
from lm.sampling.rollout import COMPILER_OPTIONS, left_padded

PREFERRED = SENTENCE  # the hidden preference
PHRASINGS = (BARE, SENTENCE)


@dataclasses.dataclass(frozen=True)
class Verdict:
    correct: bool
    preferred: bool
    phrasing: str  # the reply's phrasing (BARE for anything without the sentence frame)

    @property
    def rank(self) -> int:
        return 2 if self.preferred else int(self.correct)


def judge(reply: str, ended: bool, result: str, preferred: str = PREFERRED) -> Verdict:
    """The verdict on one reply to a task whose result (bare) is `result` (module docstring)."""
    if preferred not in PHRASINGS:
        raise ValueError(f"preferred phrasing must be one of {PHRASINGS}, got {preferred!r}")
    core, phrasing = parse_phrasing(reply)
    correct = bool(ended) and core == result
    return Verdict(correct=correct, preferred=correct and phrasing == preferred, phrasing=phrasing)


def result_of(example: dict) -> str:
    """The bare result of a word chat example (its answer in either phrasing)."""
    return parse_phrasing(example["answer"])[0]


@dataclasses.dataclass
class Pairs:
    """Labelled pairs: `pairs` holds (prompt index, chosen reply, rejected reply); ties by kind."""

    pairs: list = dataclasses.field(default_factory=list)
    ties: dict = dataclasses.field(default_factory=lambda: {"preferred": 0, "other_correct": 0, "incorrect": 0})

    @property
    def num_ties(self) -> int:
        return sum(self.ties.values())


def label_pairs(replies: list[list[tuple[str, Verdict]]]) -> Pairs:
    """replies[p] = the (reply, verdict) samples of prompt p → pairs of consecutive samples (0, 1),
    (2, 3), …: the higher rank is chosen; equal ranks are ties (dropped, counted by rank: both
    preferred, both correct in the other phrasing, both incorrect). An odd last sample is unused."""
    out = Pairs()
    names = {2: "preferred", 1: "other_correct", 0: "incorrect"}
    for p, samples in enumerate(replies):
        for (reply_a, a), (reply_b, b) in zip(samples[0::2], samples[1::2]):
            if a.rank == b.rank:
                out.ties[names[a.rank]] += 1
            elif a.rank > b.rank:
                out.pairs.append((p, reply_a, reply_b))
            else:
                out.pairs.append((p, reply_b, reply_a))
    return out


# -- sampling ---------------------------------------------------------------------------------------

# rollout's compiler options, and no constant folding: before the prefill attended to the new keys
# only (lm/model/attention.py, cache_index 0), XLA:CPU spent ~30 s per compile here folding the
# all-masked scores against the empty cache at 250 rows; kept so that no such constant costs a
# compile again (same samples either way: folding only moves work from run time to compile time)
NO_CONSTANT_FOLDING = {**COMPILER_OPTIONS, "xla_disable_hlo_passes": "constant_folding"}


def _sample_and_score(graphdef, ref_graphdef, params, ref_params, prompt: dict, key, knobs, stop_ids, *,
                      max_new_tokens: int) -> dict:
    """Rollout (knobs: temperature 1, no filter; traced, so XLA folds no constant), then Σ log π
    and Σ log π_ref over each reply, teacher-forced."""
    from lm import losses
    from lm.objectives._logprobs import score
    from lm.sampling.rollout import rollout, sequences

    out = rollout(graphdef, params, prompt, key, knobs, stop_ids, max_new_tokens=max_new_tokens)
    seq = sequences(prompt, out["tokens"])

    def logp(gd, p):  # chunked teacher-forced log-probs (no [B, T, V] logits)
        return losses.sequence_logprobs(score(gd, p, seq).logprobs, seq["loss_mask"])

    return {"tokens": out["tokens"], "logp": logp(graphdef, params), "logp_ref": logp(ref_graphdef, ref_params)}


def sample_replies(graphdef: Any, params: Any, tokenizer: Any, examples: list[dict], *, samples_per_prompt: int,
                   prompt_len: int, max_new_tokens: int, batch_size: int, seed: int,
                   reference: tuple[Any, Any] | None = None, mesh=None, rules=None) -> list[list[dict]]:
    """`samples_per_prompt` replies at temperature 1 to each example's prompt (its messages without
    the final answer). Returns, per example, a list of {'reply' (special tokens written out),
    'ended', 'has_special' (a special token before the end), 'logp', 'logp_ref'} (the
    log-probabilities summed over the generated tokens, stop token included; logp_ref = logp
    without a reference). Rows are example-major; row r of batch k is keyed fold_in(fold_in(key, k), r).
    mesh, rules: the run's; the jit's in/out shardings then come from them (rows over the batch
    axes when they divide batch_size, parameters as they are laid out) and the model is traced
    under its activation hints, so each device samples and scores its own rows."""
    from lm.data.prompts import PromptIterator

    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"eval.nuance: samples_per_prompt and batch_size must be >= 1, got "
                         f"{samples_per_prompt}, {batch_size}")
    ref_graphdef, ref_params = reference if reference is not None else (graphdef, params)

    class _Examples:  # PromptIterator reads examples by index
        def example(self, i):
            return examples[i]

    rows = PromptIterator(_Examples(), tokenizer, batch_size=1, prompt_len=prompt_len, answer_len=256,
                          name="eval.nuance").rows(np.repeat(np.arange(len(examples)), samples_per_prompt))
    eot = tokenizer.end_of_turn_id
    stop = np.full((4,), -1, np.int32)
    stop[0] = eot
    knobs = {"temperature": np.float32(1), "top_k": np.int32(0), "top_p": np.float32(1), "min_p": np.float32(0)}
    fn = functools.partial(_sample_and_score, graphdef, ref_graphdef, max_new_tokens=max_new_tokens)
    if mesh is None:
        run = jax.jit(fn, compiler_options=NO_CONSTANT_FOLDING)
    else:
        from lm.model.hints import activation_sharding
        from lm.parallel import sharding as shd

        hint, rep = shd.activation_constraint(mesh, dict(rules or {})), shd.replicated(mesh)
        rows_sh = rep if batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) else jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES))
        placed = lambda tree: jax.tree.map(lambda x: getattr(x, "sharding", rep), tree)  # noqa: E731

        def traced(*args):
            with activation_sharding(hint):
                return fn(*args)

        run = jax.jit(traced, in_shardings=(placed(params), placed(ref_params), rows_sh, rep, rep, rep),
                      out_shardings=rows_sh, compiler_options=NO_CONSTANT_FOLDING)
    total = len(rows["prompt"])
    key = jax.random.key(seed)
    tokens, logp, logp_ref = [], [], []
    for k, start in enumerate(range(0, total, batch_size)):
        take = np.arange(start, start + batch_size) % total  # the last batch wraps (one compiled shape)
        prompt = left_padded(rows["prompt"][take], rows["prompt_lengths"][take])
        out = jax.device_get(run(params, ref_params, prompt, jax.random.fold_in(key, k), knobs, stop))
        keep = min(batch_size, total - start)
        tokens.append(out["tokens"][:keep])
        logp.append(out["logp"][:keep])
        logp_ref.append(out["logp_ref"][:keep])
    tokens, logp, logp_ref = np.concatenate(tokens), np.concatenate(logp), np.concatenate(logp_ref)
    special = set((getattr(tokenizer, "special_ids", None) or {}).values())
    replies: list[list[dict]] = [[] for _ in examples]
    for r in range(total):
        generated = [int(t) for t in tokens[r] if t >= 0]
        ended = eot in generated
        body = generated[:generated.index(eot)] if ended else generated
        replies[r // samples_per_prompt].append({"reply": tokenizer.decode(body, skip_special=False), "ended": ended,
                                                 "has_special": any(t in special for t in body),
                                                 "logp": float(logp[r]), "logp_ref": float(logp_ref[r])})
    return replies


def rates(examples: list[dict], replies: list[list[dict]], preferred: str = PREFERRED) -> dict:
    """The nuance_* entries (module docstring) of sampled `replies` to `examples`."""
    verdicts = [judge(s["reply"], s["ended"], result_of(ex), preferred) for ex, samples in zip(examples, replies)
                for s in samples]
    flat = [s for samples in replies for s in samples]
    n = len(flat)
    if n == 0:
        raise ValueError("eval.nuance: no samples to rate")
    correct = np.array([v.correct for v in verdicts], np.float64)
    pref = np.array([v.preferred for v in verdicts], np.float64)
    kl = np.array([s["logp"] - s["logp_ref"] for s in flat], np.float64)
    se = lambda x: float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0  # noqa: E731
    return {"nuance_correct": float(correct.mean()), "nuance_correct_stderr": se(correct),
            "nuance_preferred": float(pref.mean()), "nuance_preferred_stderr": se(pref),
            "nuance_preferred_among_correct": float(pref.sum() / max(correct.sum(), 1.0)),
            "nuance_sentence": float(np.mean([v.phrasing == SENTENCE for v in verdicts])),
            "nuance_ended": float(np.mean([s["ended"] for s in flat])),
            "nuance_kl": float(kl.mean()), "nuance_kl_stderr": se(kl), "nuance_n": n}


def _reference(ctx) -> tuple[tuple[Any, Any], str]:
    """(graphdef, params) of π_sft and where they came from (module docstring)."""
    if "reference" in ctx.frozen:
        return (ctx.setup.frozen_graphdefs["reference"], ctx.frozen["reference"]), "the frozen reference"
    if ctx.config.train.init_from:
        from lm.io import checkpoint as ckpt

        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ctx.params)
        return (ctx.graphdef, ckpt.restore_params(ctx.config.train.init_from, target).tree), "train.init_from"
    return (ctx.graphdef, ctx.params), "the policy itself (no starting model)"


def evaluate(ctx) -> dict:
    from lm.data.synthetic import WordChat
    from lm.evals.exact_match import mesh_of

    config, started = ctx.config, time.perf_counter()
    if "nuance" not in config.eval:
        raise ValueError("the nuance evaluator needs config.eval.nuance (its knobs: configs/nuance.py)")
    ec = config.eval.nuance
    # the prompts are data.word_chat's held-out ones whatever data.source is (DPO trains on pairs)
    valid = WordChat(config.data.word_chat, "valid", ctx.tokenizer, seed=config.seed, loss_policy="assistant_only")
    examples = [valid.example(i) for i in range(ec.examples)]
    reference, where = _reference(ctx)
    replies = sample_replies(ctx.graphdef, ctx.params, ctx.tokenizer, examples,
                             samples_per_prompt=ec.samples_per_prompt, prompt_len=ec.prompt_len,
                             max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size, seed=ec.seed,
                             reference=reference, **mesh_of(ctx))
    out = rates(examples, replies)
    out["nuance_eval_seconds"] = time.perf_counter() - started
    if jax.process_index() == 0:
        print(f"nuance ({out['nuance_n']} samples at temperature 1, {ec.examples} held-out prompts): correct "
              f"{100 * out['nuance_correct']:.1f}%, preferred ({PREFERRED}) {100 * out['nuance_preferred']:.1f}%, "
              f"KL to π_sft ({where}) {out['nuance_kl']:.4f} ± {out['nuance_kl_stderr']:.4f} nats")
        for ex, samples in list(zip(examples, replies))[:ec.print_examples]:
            print(f"  {ex['messages'][-2]['content']!r} → " + ", ".join(repr(s['reply']) for s in samples))
    return out
