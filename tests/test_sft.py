"""Chat SFT: the chat template's masks (hand-checked), what is and is never scored, invariance of
the loss to unscored targets, packing isolation, bad conversations, overflow, the tokenizer
check for a pretrained start, and the main job end to end (tiny)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import lm.data as D
from configs import sft as sft_config
from configs.data import data_config
from lm.data import chat, errors, synthetic
from lm.masking import ROLE_ASSISTANT, ROLE_PAD, ROLE_SYSTEM, ROLE_USER
from lm.model import ModelConfig, Transformer
from lm.evals import exact_match
from lm.objectives import pretrain, sft

TOK = D.ByteTokenizer()
BOS, EOT = TOK.bos_id, TOK.end_of_turn_id
SYS, USER, ASST = (TOK.role_ids[r] for r in ("system", "user", "assistant"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONV = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "42"}]
needs_too_long_kind = pytest.mark.skipif(
    chat.TOO_LONG not in errors.ERROR_KINDS,
    reason=f"lm/data/errors.py has no {chat.TOO_LONG!r} kind yet (see the SFT report's diff)")


WORD_CHAT_REGISTERED = "word_chat" in D.SOURCES
WORD_CHAT = ml_collections.ConfigDict(dict(
    tasks="reverse,upper,dashes", alphabet="abcdefghijklmnopqrstuvwxyz", min_letters=3, max_letters=6,
    max_turns=3, system_prompt_prob=0.3, valid_fraction=0.1, num_heldout_templates=2))


def arithmetic_config(policy="assistant_only", max_turns=3):
    cfg = data_config()
    cfg.source, cfg.chat_loss = "arithmetic_chat", policy
    cfg.arithmetic_chat.max_turns = max_turns
    return cfg


def word_source(split, policy="assistant_only", **overrides):
    cfg = ml_collections.ConfigDict(WORD_CHAT.to_dict())
    cfg.update(overrides)
    return synthetic.WordChat(cfg, split, TOK, seed=0, loss_policy=policy)


# -- the template and its masks ---------------------------------------------------------------------


def test_multi_turn_masks_hand_checked():
    #  i: 0    1    2    3    4     5    6    7    8     9    10   11   12    13   14   15    16   17   18
    #     bos  sys  S    eot  user  h    i    eot  asst  y    o    eot  user  q    eot  asst  4    2    eot
    expected_tokens = [BOS, SYS, ord("S"), EOT, USER, ord("h"), ord("i"), EOT, ASST, ord("y"), ord("o"), EOT,
                       USER, ord("q"), EOT, ASST, ord("4"), ord("2"), EOT]
    out = chat.render_conversation(CONV, TOK)
    assert out.tokens.tolist() == expected_tokens
    assert out.role_ids.tolist() == [ROLE_PAD] + [ROLE_SYSTEM] * 3 + [ROLE_USER] * 4 + [ROLE_ASSISTANT] * 4 \
        + [ROLE_USER] * 3 + [ROLE_ASSISTANT] * 4
    scored = lambda policy: np.flatnonzero(chat.render_conversation(CONV, TOK, loss_policy=policy).weights).tolist()  # noqa: E731
    assert scored("assistant_only") == [9, 10, 11, 16, 17, 18]
    assert scored("last_assistant") == [16, 17, 18]
    assert scored("all") == list(range(1, 19))
    # through the pipeline (shifted: loss_mask[t] weighs targets[t] = tokens[t + 1])
    for policy, positions in [("assistant_only", [8, 9, 10, 15, 16, 17]), ("last_assistant", [15, 16, 17])]:
        batch = pipeline_row(policy)
        assert np.flatnonzero(batch["loss_mask"][0]).tolist() == positions
        assert batch["inputs"][0, :18].tolist() == expected_tokens[:-1]
        assert batch["targets"][0, :18].tolist() == expected_tokens[1:]


def pipeline_row(policy, tmp=[]):  # noqa: B006 -- one temp file for the module
    import tempfile

    if not tmp:
        tmp.append(tempfile.mkdtemp())
    path = os.path.join(tmp[0], "conv.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"messages": CONV}) + "\n")
    cfg = data_config()
    cfg.source, cfg.chat_loss, cfg.num_valid_batches = "chat_jsonl", policy, 1
    cfg.chat_jsonl.train_files = cfg.chat_jsonl.valid_files = path
    return next(iter(D.build_iterator(cfg, split="valid", batch_size=1, seq_len=24, seed=0)))


@pytest.mark.parametrize("task", ["arithmetic", "words"])
@pytest.mark.parametrize("policy", ["assistant_only", "last_assistant"])
def test_no_user_or_system_token_is_ever_scored_and_end_of_turn_is(policy, task):
    if task == "words":
        source = word_source("train", policy)
    else:
        source = D.build_source(arithmetic_config(policy), split="train", seq_len=192, seed=0)
    for i in range(100):
        messages = source.example(i)["messages"]
        out = chat.render_conversation(messages, TOK, loss_policy=policy)
        scored = out.weights > 0
        assert (out.role_ids[scored] == ROLE_ASSISTANT).all()
        assert not np.isin(out.tokens[scored], [BOS, SYS, USER, ASST]).any(), "a role marker is scored"
        eots = np.flatnonzero(out.tokens == EOT)
        closes_assistant = out.role_ids[eots] == ROLE_ASSISTANT
        n_answers = sum(m["role"] == "assistant" for m in messages)
        expected = n_answers if policy == "assistant_only" else 1
        assert scored[eots].sum() == expected and (scored[eots] <= closes_assistant).all()
    if task == "words":
        return
    # packed batches: every scored target is part of an answer (digits, '-') or its end-of-turn
    batch = next(D.build_iterator(arithmetic_config(policy), split="train", batch_size=4, seq_len=192, seed=0))
    targets = batch["targets"][batch["loss_mask"] > 0]
    assert set(targets.tolist()) <= set(TOK.encode("0123456789-")) | {EOT}
    assert (targets == EOT).sum() >= 4


# -- the objective ----------------------------------------------------------------------------------

MODEL = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64)


@functools.lru_cache(maxsize=None)  # one compile per policy for the module
def sft_setup(policy="assistant_only"):
    config = sft_config.get_config("tiny")
    config.data.source, config.data.chat_loss = "arithmetic_chat", policy
    graphdef, state = nnx.split(Transformer(MODEL, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    loss_fn = jax.jit(jax.value_and_grad(sft.make_loss_fn(config, graphdef), has_aux=True))
    batch = next(D.build_iterator(config.data, split="train", batch_size=2, seq_len=192, seed=0))
    return config, graphdef, params, loss_fn, batch


def test_sft_loss_is_the_pretraining_loss_on_the_masked_batch():
    config, graphdef, params, loss_fn, batch = sft_setup()
    (obj, sums), _ = loss_fn(params, batch, jax.random.key(0))
    (ref, ref_sums) = pretrain.make_loss_fn(config, graphdef)(params, batch, jax.random.key(0))
    np.testing.assert_allclose(obj, ref, rtol=1e-6)
    assert float(sums["count"]) == batch["loss_mask"].sum() == float(ref_sums["count"])
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(obj, (nll * batch["loss_mask"]).sum(), rtol=1e-5)


def test_changing_a_user_target_leaves_loss_and_gradient_unchanged():
    _, _, params, loss_fn, batch = sft_setup("assistant_only")
    (obj, _), grads = loss_fn(params, batch, jax.random.key(0))
    unscored = (batch["loss_mask"] == 0) & (batch["segment_ids"] > 0)
    changed = dict(batch, targets=np.where(unscored, (batch["targets"] + 7) % 256, batch["targets"]))
    assert (changed["targets"] != batch["targets"]).sum() > 100
    (obj2, _), grads2 = loss_fn(params, changed, jax.random.key(0))
    assert float(obj2) == float(obj)
    jax.tree.map(np.testing.assert_array_equal, grads2, grads)
    # control: an assistant target does count
    scored = np.argwhere(batch["loss_mask"] > 0)[0]
    answer_changed = dict(batch, targets=batch["targets"].copy())
    answer_changed["targets"][tuple(scored)] = (batch["targets"][tuple(scored)] + 1) % 256
    (obj3, _), _ = loss_fn(params, answer_changed, jax.random.key(0))
    assert float(obj3) != float(obj)


def test_all_token_loss_does_score_user_targets():
    _, _, params, loss_fn, batch = sft_setup("all")
    (obj, sums), _ = loss_fn(params, batch, jax.random.key(0))
    assert float(sums["count"]) == (batch["segment_ids"] > 0).sum()
    changed = dict(batch, targets=batch["targets"].copy())
    changed["targets"][0, 3] = (changed["targets"][0, 3] + 1) % 256  # a system/user target
    (obj2, _), _ = loss_fn(params, changed, jax.random.key(0))
    assert float(obj2) != float(obj)


def test_packed_conversations_do_not_attend_to_each_other():
    model = Transformer(MODEL, rngs=nnx.Rngs(1))
    a = chat.render_conversation(CONV, TOK).tokens
    b = chat.render_conversation([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                                 TOK).tokens
    T = 40
    row = np.zeros((1, T), np.int32)
    seg, pos = np.zeros((1, T), np.int32), np.zeros((1, T), np.int32)
    row[0, :len(a)], row[0, len(a):len(a) + len(b)] = a, b
    seg[0, :len(a)], seg[0, len(a):len(a) + len(b)] = 1, 2
    pos[0, :len(a)], pos[0, len(a):len(a) + len(b)] = np.arange(len(a)), np.arange(len(b))
    packed = model(row, pos, seg)[0, len(a):len(a) + len(b)]
    alone = model(b[None], np.arange(len(b))[None], np.ones((1, len(b)), np.int32))[0]
    np.testing.assert_allclose(packed, alone, atol=1e-5)
    other = row.copy()
    other[0, 2:len(a) - 1] = ord("x")  # rewrite the first conversation
    np.testing.assert_allclose(model(other, pos, seg)[0, len(a):len(a) + len(b)], packed, atol=1e-6)


# -- bad conversations and overflow -----------------------------------------------------------------

BAD = {
    "unknown_role": ([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}], "'wizard'"),
    "empty_document": ([{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}], "empty content"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_conversation_raises_or_is_skipped_and_counted(tmp_path, kind):
    messages, detail = BAD[kind]
    good = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (good, messages, good)) + "\n")
    cfg = data_config()
    cfg.source, cfg.num_valid_batches = "chat_jsonl", 2
    cfg.chat_jsonl.train_files = cfg.chat_jsonl.valid_files = str(path)
    with pytest.raises(D.DataError, match=f"{path}:2: {kind}: .*{detail}"):
        list(D.build_iterator(cfg, split="valid", batch_size=2, seq_len=32, seed=0))
    cfg.on_error = "skip"
    valid = D.build_iterator(cfg, split="valid", batch_size=2, seq_len=32, seed=0)
    batches = list(valid)
    assert valid.error_counts()[kind] == 1 and sum(valid.error_counts().values()) == 1
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 2  # both good ones kept


def test_conversation_without_an_assistant_turn_is_a_bad_record_when_required():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    with pytest.raises(errors.BadRecord) as e:
        chat.render_conversation(messages, TOK, require_assistant=True, where="f.jsonl:7")
    assert e.value.kind == "empty_document" and "no assistant message" in str(e.value)
    assert "f.jsonl:7" in str(e.value)
    assert chat.render_conversation(messages, TOK).weights.sum() == 0  # not required: nothing scored


def long_conversation(turns=6):
    messages = [{"role": "system", "content": "sys"}]
    for t in range(turns):
        messages += [{"role": "user", "content": f"question {t}"}, {"role": "assistant", "content": f"a{t}"}]
    return messages


@pytest.mark.parametrize("policy", ["assistant_only", "last_assistant", "all"])
def test_truncate_left_drops_whole_oldest_exchanges_and_records_it(policy):
    messages = long_conversation()
    full = chat.render_conversation(messages, TOK, loss_policy=policy)
    out = chat.render_conversation(messages, TOK, loss_policy=policy, max_tokens=60, overflow="truncate_left")
    assert len(full.tokens) > 60 >= len(out.tokens)
    kept = [messages[0]] + messages[1 + out.dropped_messages:]
    assert out.dropped_messages > 0 and out.dropped_messages % 2 == 0  # whole (user, assistant) pairs
    ref = chat.render_conversation(kept, TOK, loss_policy=policy)
    assert out.tokens.tolist() == ref.tokens.tolist() and out.weights.tolist() == ref.weights.tolist()
    assert out.tokens[1] == SYS and out.tokens[2 + 3 + 1] == USER  # system kept, history starts with a question
    # the answers kept are whole: every scored span ends with an end-of-turn
    assert out.tokens[np.flatnonzero(out.weights)[-1]] == EOT
    # fits already: untouched
    same = chat.render_conversation(messages, TOK, loss_policy=policy, max_tokens=len(full.tokens),
                                    overflow="truncate_left")
    assert same.dropped_messages == 0 and same.tokens.tolist() == full.tokens.tolist()


@needs_too_long_kind
def test_conversation_that_cannot_fit_is_dropped_with_a_record():
    messages = long_conversation()
    with pytest.raises(errors.BadRecord) as e:
        chat.render_conversation(messages, TOK, max_tokens=60, overflow="drop", where="x.jsonl:3")
    assert e.value.kind == chat.TOO_LONG and "x.jsonl:3" in str(e.value)
    with pytest.raises(errors.BadRecord):  # the last exchange alone is longer than the row
        chat.render_conversation(messages, TOK, max_tokens=12, overflow="truncate_left")


# -- starting from a pretrained checkpoint ----------------------------------------------------------


def test_tokenizer_of_the_init_checkpoint_must_match(tmp_path):
    config = ml_collections.ConfigDict({"data": {"tokenizer": "byte", "source": "arithmetic_chat"},
                                        "train": {"restore_from": ""}})
    sft.check_init_checkpoint(config)  # from scratch: nothing to check
    run = tmp_path / "pretrain_run"
    step_dir = run / "checkpoints" / "600"
    step_dir.mkdir(parents=True)
    config.train.restore_from = str(step_dir)
    with pytest.raises(FileNotFoundError, match="tokenizer_metadata.json"):
        sft.check_init_checkpoint(config)
    TOK.save_metadata(str(run))
    sft.check_init_checkpoint(config)  # same tokenizer: fine
    meta = TOK.metadata()
    meta["special_ids"]["end_of_turn"] = 300
    meta["vocab_size"] = 301
    D.save_metadata(meta, str(run))
    with pytest.raises(D.TokenizerMismatchError, match="(?s)vocab_size.*end_of_turn.*same tokenizer"):
        sft.check_init_checkpoint(config)


# -- the main job, tiny -----------------------------------------------------------------------------


def test_main_trains_then_reports_exact_match(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    source = [] if WORD_CHAT_REGISTERED else ["--config.data.source=arithmetic_chat"]  # see the SFT report
    proc = subprocess.run([sys.executable, "-m", "lm.cli.train", "--config=configs/sft.py:tiny", f"--workdir={tmp_path}",
                           *source], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["exact_match_n"] == 8 and 0 <= summary["exact_match"] <= 1
    for key in ("stopped_at_end_of_turn", "writes_user_turn", "valid_ce"):
        assert key in summary
    assert "held-out exact match (greedy)" in proc.stdout and "<|assistant|>" in proc.stdout


def test_split_reply():
    assert exact_match.split_reply([1, 2, EOT, USER, 5], EOT) == ([1, 2], True, [USER, 5])
    assert exact_match.split_reply([1, 2], EOT) == ([1, 2], False, [])


# -- the word task ----------------------------------------------------------------------------------


def test_word_chat_exact_answers_heldout_words_and_phrasings():
    train, valid = word_source("train"), word_source("valid")
    answer = {"reverse": lambda w: w[::-1], "upper": str.upper, "dashes": "-".join}
    train_words, train_questions = set(), set()
    for i in range(300):
        ex = train.example(i)
        exchanges = ex["messages"][len(ex["messages"]) % 2:]  # without the system message, if any
        for (task, word), q, a in zip(ex["problems"], exchanges[::2], exchanges[1::2]):
            assert a == {"role": "assistant", "content": answer[task](word)} and word in q["content"]
            assert 3 <= len(word) <= 6 and len(set(word)) == len(word) and not train.is_heldout(word)
            train_words.add(word)
            train_questions.add(q["content"].replace(word, "{w}"))
        doc = train.document(i)
        scored = doc["tokens"][doc["weights"] > 0].tolist()
        assert scored == sum((TOK.encode(answer[t](w)) + [EOT] for t, w in ex["problems"]), [])
    valid_examples = [valid.example(i) for i in range(200)]
    valid_words = {w for ex in valid_examples for _, w in ex["problems"]}
    assert valid_words and not valid_words & train_words and all(valid.is_heldout(w) for w in valid_words)
    valid_questions = {ex["messages"][-2]["content"].replace(ex["problem"][1], "{w}") for ex in valid_examples}
    assert valid_questions - train_questions == {t for _, ts in synthetic._WORD_TASKS.values() for t in ts[-2:]}
    assert valid.example(7) == word_source("valid").example(7)  # a pure function of the index


@pytest.mark.skipif(not WORD_CHAT_REGISTERED, reason="lm/data/build.py does not register 'word_chat' yet "
                    "(see the SFT report's diff)")
def test_word_chat_through_the_pipeline_scores_only_answers():
    config = sft_config.get_config("tiny")
    batch = next(D.build_iterator(config.data, split="train", batch_size=4, seq_len=160, seed=0))
    targets = batch["targets"][batch["loss_mask"] > 0]
    assert set(targets.tolist()) <= set(TOK.encode("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")) | {EOT}
