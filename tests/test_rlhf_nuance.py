"""The two-phrasing word chat (data.word_chat.sentence_prob), the nuance judge, the pair labelling
and the sampled KL of lm/evals/nuance.py, and the pairs file of experiments/rlhf_nuance.py."""

import hashlib
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import nuance as nuance_config
from configs import sft
from lm import losses
from lm.data import build_tokenizer
from lm.data.synthetic import _WORD_TASKS, BARE, SENTENCE, WordChat, parse_phrasing, phrase
from lm.evals import nuance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def word_chat(split="train", **overrides):
    c = nuance_config.get_config("sft")
    for key, value in overrides.items():
        setattr(c.data.word_chat, key, value)
    tok = build_tokenizer(c.data)
    return WordChat(c.data.word_chat, split, tok, seed=0, loss_policy="assistant_only"), tok


def test_two_phrasings_equally_frequent_and_both_carry_the_result():
    source, _ = word_chat()
    n = 3000
    by_task = {task: [] for task in _WORD_TASKS}
    for i in range(n):
        ex = source.example(i)
        result, phrasing = parse_phrasing(ex["answer"])
        task, word = ex["problem"]
        assert result == _WORD_TASKS[task][0](word), ex  # the core of either phrasing is the exact result
        assert ex["answer"] == phrase(result, phrasing)
        by_task[task].append(phrasing == SENTENCE)
    share = sum(map(sum, by_task.values())) / n
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / n), share  # 0.5 within 4 standard errors (±3.7 points)
    for task, sentences in by_task.items():  # within each task too (the coin is independent of the task)
        assert abs(np.mean(sentences) - 0.5) < 4 * np.sqrt(0.25 / len(sentences)), task


def test_sentence_prob_extremes_and_bad_value():
    always, _ = word_chat(sentence_prob=1.0)
    assert all(parse_phrasing(always.example(i)["answer"])[1] == SENTENCE for i in range(50))
    with pytest.raises(ValueError, match="sentence_prob"):
        word_chat(sentence_prob=1.5)


def test_option_off_leaves_word_chat_documents_unchanged():
    """configs/sft.py's documents (sentence_prob 0): the digest recorded before the option existed."""
    c = sft.get_config()
    tok = build_tokenizer(c.data)
    digest = hashlib.sha256()
    for split in ("train", "valid"):
        source = WordChat(c.data.word_chat, split, tok, seed=0, loss_policy="assistant_only", seq_len=160,
                          chat_overflow="truncate_left")
        for i in range(100):
            digest.update(json.dumps(source.example(i)["messages"]).encode())
            doc = source.document(i)
            digest.update(doc["tokens"].tobytes())
            digest.update(doc["weights"].tobytes())
    assert digest.hexdigest() == "cd103966209f77828cc628d30157b99609710de012c64583a0f684329457938a"


@pytest.mark.parametrize("reply, ended, correct, preferred, phrasing", [
    ("cba", True, True, False, BARE),
    ("It is cba.", True, True, True, SENTENCE),
    ("It is cba.", False, False, False, SENTENCE),  # never closed its turn
    ("It is cab.", True, False, False, SENTENCE),   # the right frame, the wrong result
    ("It is cba", True, False, False, BARE),        # no full stop: not the sentence, and not 'cba'
    ("it is cba.", True, False, False, BARE),
    ("It is .", True, False, False, BARE),
    ("It is It is cba..", True, False, False, SENTENCE),
    ("", True, False, False, BARE),
])
def test_judge(reply, ended, correct, preferred, phrasing):
    verdict = nuance.judge(reply, ended, "cba")
    assert (verdict.correct, verdict.preferred, verdict.phrasing) == (correct, preferred, phrasing)
    assert verdict.rank == (2 if preferred else int(correct))
    # with the other hidden preference, the bare reply is the preferred one
    assert nuance.judge(reply, ended, "cba", preferred=BARE).preferred == (correct and phrasing == BARE)


def test_judge_rejects_an_unknown_preference():
    with pytest.raises(ValueError, match="preferred phrasing"):
        nuance.judge("cba", True, "cba", preferred="polite")


def test_label_pairs_orders_by_rank_and_counts_ties():
    def samples(*replies):
        return [(r, nuance.judge(r, True, "abc")) for r in replies]

    out = nuance.label_pairs([
        samples("abc", "It is abc."),          # other-correct vs preferred: the sentence is chosen
        samples("It is abc.", "It is abc."),   # tie: both preferred
        samples("abc", "abc"),                 # tie: both correct in the other phrasing
        samples("xyz", "It is xyz."),          # tie: both incorrect
        samples("xyz", "abc", "It is abc.", "It is abc.", "abc"),  # (0,1): correct > incorrect; (2,3) tie; 4 unused
    ])
    assert out.pairs == [(0, "It is abc.", "abc"), (4, "abc", "xyz")]
    assert out.ties == {"preferred": 2, "other_correct": 1, "incorrect": 1}
    assert out.num_ties == 4


def test_sampled_kl_is_the_teacher_forced_log_ratio():
    """sample_replies: logp − logp_ref is Σ over the reply of log π − log π_ref (one forward pass
    of each model over prompt + reply); against itself the KL estimate is exactly 0."""
    from lm.data.chat import render_prompt
    from lm.model import ModelConfig, Transformer

    source, tok = word_chat("valid")
    examples = [source.example(i) for i in range(3)]
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    ref_params = jax.tree.map(lambda x: x * 1.5, params)  # another policy: every weight scaled
    kw = dict(samples_per_prompt=2, prompt_len=100, max_new_tokens=6, batch_size=4, seed=0)
    replies = nuance.sample_replies(graphdef, params, tok, examples, reference=(graphdef, ref_params), **kw)
    alone = nuance.sample_replies(graphdef, params, tok, examples, **kw)
    assert [[s["reply"] for s in r] for r in replies] == [[s["reply"] for s in r] for r in alone]  # same draws
    assert nuance.rates(examples, alone)["nuance_kl"] == 0.0

    rows, spans, expected = [], [], []  # prompt + reply ids of every reply whose text gives its tokens back
    for ex, samples in zip(examples, replies):
        prompt = render_prompt(ex["messages"][:-1], tok).tolist()
        for s in samples:
            ids = list(tok.encode(s["reply"])) + ([tok.end_of_turn_id] if s["ended"] else [])
            if s["has_special"] or len(ids) > 6 or (not s["ended"] and len(ids) != 6):
                continue
            rows.append(prompt + ids)
            spans.append((len(prompt), len(ids)))
            expected.append((s["logp"], s["logp_ref"]))
    assert rows, "no reply to check"
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros_like(tokens)
    mask = np.zeros((len(rows), width - 1), np.float32)
    for r, (row, (p, n)) in enumerate(zip(rows, spans)):
        tokens[r, :len(row)], segments[r, :len(row)] = row, 1
        mask[r, p - 1:p - 1 + n] = 1  # targets p-1 .. p+n-2 are the reply's tokens
    positions = np.broadcast_to(np.arange(width - 1, dtype=np.int32), mask.shape)
    for column, p in enumerate((params, ref_params)):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1], positions, segments[:, :-1])
        per_token = losses.cross_entropy(logits, tokens[:, 1:], mask).target_logprobs
        np.testing.assert_allclose(np.sum(mask * per_token, axis=1), [e[column] for e in expected], atol=2e-4)
    flat = [s for r in replies for s in r]
    rates = nuance.rates(examples, replies)
    np.testing.assert_allclose(rates["nuance_kl"], np.mean([s["logp"] - s["logp_ref"] for s in flat]), rtol=1e-6)
    assert rates["nuance_n"] == 6


def load_experiment():
    spec = importlib.util.spec_from_file_location("rlhf_nuance", os.path.join(REPO, "experiments", "rlhf_nuance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pair_records_read_back_as_preference_pairs(tmp_path):
    """The experiment's JSONL pairs go through lm/data/preference.py: the same prompt on both sides,
    only the reply (and its end of turn) scored."""
    from lm.data.preference import PreferenceJsonl

    experiment = load_experiment()
    source, tok = word_chat()
    example = source.example(0)
    result = nuance.result_of(example)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(experiment.pair_record(example, phrase(result, SENTENCE), result)) + "\n")
    c = nuance_config.get_config("dpo")
    c.data.preference_jsonl.train_files = str(path)
    c.data.preference_jsonl.valid_files = str(path)
    pairs = PreferenceJsonl(c.data.preference_jsonl, "train", tok, seq_len=c.train.seq_len, on_error="raise",
                            add_bos=True, add_eos=True, valid_fraction=0.01)
    pair = pairs.document(0)
    for side, reply in (("chosen", phrase(result, SENTENCE)), ("rejected", result)):
        tokens, weights = pair[side]["tokens"], pair[side]["weights"]
        scored = tokens[weights > 0].tolist()
        assert scored == list(tok.encode(reply)) + [tok.end_of_turn_id]
        prompt = tokens[weights == 0].tolist()
        from lm.data.chat import render_prompt

        assert prompt == render_prompt(example["messages"][:-1], tok).tolist()  # what RL and sampling see
    assert experiment.phrasing_kl_bound(0.5, 0.5) == 0.0
    np.testing.assert_allclose(experiment.phrasing_kl_bound(1.0, 0.5), np.log(2))


def _fake_run(workdir, group, key, beta, preferred, kl):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({group: {key: beta}}, f)
    numbers = {"nuance_correct": 0.9, "nuance_correct_stderr": 0.01, "nuance_preferred": preferred,
               "nuance_preferred_stderr": 0.01, "nuance_preferred_among_correct": preferred / 0.9,
               "nuance_kl": kl, "nuance_kl_stderr": 0.01, "wall_seconds": 1.0}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(numbers, f)


def test_beta_sweep_runs_each_new_value_once_and_tabulates_with_the_stage_run(tmp_path, monkeypatch):
    """--sweep: the stage's own run is its default-β point (not run again), a finished sweep run is
    not run again, and the report lists every (method, β) in β order."""
    experiment = load_experiment()
    out = str(tmp_path)
    assert experiment.parse_sweep(["grpo:0,1", "dpo:3", "grpo:0.1"]) == {"grpo": [0.0, 1.0, 0.1], "dpo": [3.0]}
    for bad in ("sft:0.1", "grpo", "grpo:a"):
        with pytest.raises(SystemExit, match="--sweep"):
            experiment.parse_sweep([bad])
    default = experiment.default_beta("grpo")
    assert default == nuance_config.get_config("grpo").rl.kl_coef
    _fake_run(os.path.join(out, "sft"), "dpo", "beta", 0.0, 0.5, 0.0)
    _fake_run(os.path.join(out, "grpo"), "rl", "kl_coef", default, 0.8, 0.5)
    _fake_run(os.path.join(out, experiment.sweep_name("grpo", 1.0)), "rl", "kl_coef", 1.0, 0.6, 0.1)
    calls = []

    def fake_train(stage, out_, extra, name=None, flags=()):
        calls.append((stage, name, flags))
        _fake_run(os.path.join(out_, name), "rl", "kl_coef", float(flags[0].split("=")[1]), 0.95, 2.0)
        return 0.0

    monkeypatch.setattr(experiment, "train", fake_train)
    experiment.run_sweep(out, {"grpo": [0.0, default, 1.0]}, [])
    assert calls == [("grpo", "sweep/grpo_beta0", ("--config.rl.kl_coef=0.0",))]
    results = experiment.collect(out)
    assert [p["beta"] for p in results["sweep"]["grpo"]] == [0.0, default, 1.0]
    assert "dpo" not in results.get("sweep", {})  # a stage with one point (or none) is no sweep
    rows = experiment.sweep_table(results).splitlines()[2:]
    assert [r.split("|")[2].strip() for r in rows] == ["0", f"{default:g}", "1"]
    assert "95.0%" in rows[0] and "2.000" in rows[0]
