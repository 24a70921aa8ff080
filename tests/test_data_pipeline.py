"""build_iterator end to end: the Markov row layout and its Bayes CE, seeds, exact resume,
epochs, disjoint process shards, the valid split, chat masks, synthetic tasks, workers."""

import json
import math

import numpy as np
import pytest

import lm.data as D
from configs.data import data_config
from lm.data import chat, synthetic
from lm.data.markov import MarkovSource

TOK = D.ByteTokenizer()


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def text_config(tmp_path, n=20, packing='first_fit'):
    """n one-line documents 'docNN' -> bos + 5 bytes + eos = 6 pairs: one per row at T=6."""
    path = tmp_path / 'lines.txt'
    path.write_text(''.join(f'doc{i:02d}\n' for i in range(n)))
    cfg = data_config()
    cfg.source, cfg.packing, cfg.valid_fraction = 'text', packing, 0.0
    cfg.text.train_files = cfg.text.valid_files = str(path)
    cfg.text.document = 'line'
    return cfg


def row_docs(batches):
    """Document names in row order (rows hold one document each under text_config)."""
    out = []
    for b in batches:
        for row in range(b['inputs'].shape[0]):
            if b['segment_ids'][row].any():
                out.append(TOK.decode(b['inputs'][row][b['segment_ids'][row] > 0], skip_special=True))
    return out


def test_markov_rows_are_whole_documents_and_bayes_ce_matches():
    cfg = data_config()
    T, B, seed = 32, 3, 5
    train = D.build_iterator(cfg, split='train', batch_size=B, seq_len=T, seed=seed)
    batch = next(train)
    chain = MarkovSource(alphabet=cfg.markov.alphabet, order=cfg.markov.order,
                         concentration=cfg.markov.concentration, seed=cfg.markov.seed)
    for r in range(B):
        doc = TOK.encode(chain.document(synthetic.document_key('train', seed, r), T + 1))
        assert batch['inputs'][r].tolist() == doc[:T]
        assert batch['targets'][r].tolist() == doc[1:]
    assert (batch['loss_mask'] == 1).all() and (batch['segment_ids'] == 1).all()
    assert (batch['positions'] == np.arange(T)).all()
    info = D.source_info(cfg, seq_len=T)
    assert info['bayes_optimal_ce'] == pytest.approx(chain.target_entropies(T + 1)[1:].mean(), abs=1e-12)
    cfg.source = 'text'
    assert D.source_info(cfg, seq_len=T) == {}


@pytest.mark.parametrize('order,alphabet', [(1, 'ab'), (2, 'abcdefghijklmnop'), (3, 'xyz')])
def test_vectorized_markov_equals_markov_document(order, alphabet):
    chain = MarkovSource(alphabet=alphabet, order=order, concentration=0.3, seed=1)
    keys = [0, 7, synthetic.document_key('valid', 0, 3), synthetic.document_key('train', 12345, 9)]
    for length in (0, 1, 2, 3, 40):
        rows = synthetic.markov_symbols(chain, keys, length)
        assert [''.join(alphabet[s] for s in row) for row in rows] == \
            [chain.document(k, length) for k in keys]


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    cfg = text_config(tmp_path)
    a = take(D.build_iterator(cfg, split='train', batch_size=2, seq_len=6, seed=1), 6)
    b = take(D.build_iterator(cfg, split='train', batch_size=2, seq_len=6, seed=1), 6)
    c = take(D.build_iterator(cfg, split='train', batch_size=2, seq_len=6, seed=2), 6)
    assert_same(a, b)
    assert row_docs(a) != row_docs(c)


def test_epochs_cover_every_document_and_reshuffle(tmp_path):
    cfg = text_config(tmp_path, n=20)
    docs = row_docs(take(D.build_iterator(cfg, split='train', batch_size=4, seq_len=6, seed=0), 10))
    names = sorted(f'doc{i:02d}' for i in range(20))
    assert sorted(docs[:20]) == names and sorted(docs[20:]) == names
    assert docs[:20] != docs[20:] and docs[:20] != names


def test_large_split_shuffle_path_covers_epochs_and_resumes(tmp_path, monkeypatch):
    from lm.data import pipeline
    monkeypatch.setattr(pipeline, '_PERMUTATION_LIMIT', 0)  # as for > 2**25 records: grain's shuffle
    cfg = text_config(tmp_path, n=100)
    cfg.text.document, cfg.group_size = 'line', 16
    names = sorted(f'doc{i:02d}' for i in range(100))
    make = lambda: D.build_iterator(cfg, split='train', batch_size=10, seq_len=6, seed=0)
    batches = take(make(), 20)
    docs = row_docs(batches)
    assert sorted(docs[:100]) == names and sorted(docs[100:]) == names and docs[:100] != docs[100:]
    it = make()
    take(it, 7)
    resumed = make()
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    assert_same(take(resumed, 13), batches[7:])


@pytest.mark.parametrize('packing', ['concat', 'first_fit'])
def test_resume_from_json_state_gives_identical_batches(tmp_path, packing):
    path = tmp_path / 'blocks.txt'
    rng = np.random.default_rng(0)
    path.write_text('\n\n'.join(' '.join(['word'] * int(n)) for n in rng.integers(1, 30, 15)))
    cfg = data_config()
    cfg.source, cfg.packing, cfg.text.train_files, cfg.text.document = 'text', packing, str(path), 'block'
    make = lambda: D.build_iterator(cfg, split='train', batch_size=2, seq_len=16, seed=3)
    reference = take(make(), 25)  # several epochs; documents span rows and batches
    first = make()
    take(first, 9)
    state = json.loads(json.dumps(first.get_state()))
    resumed = make()
    resumed.set_state(state)
    assert_same(take(resumed, 16), reference[9:])


def test_process_shards_are_disjoint_and_cover_everything(tmp_path):
    cfg = text_config(tmp_path, n=21)
    cfg.num_valid_batches = 6
    seen = []
    for p in range(2):
        valid = D.build_iterator(cfg, split='valid', batch_size=2, seq_len=6, seed=0,
                                 process_index=p, process_count=2)
        seen.append(row_docs(valid))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f'doc{i:02d}' for i in range(21))
    train = [row_docs(take(D.build_iterator(cfg, split='train', batch_size=2, seq_len=6, seed=0,
                                            process_index=p, process_count=2), 5))[:10] for p in range(2)]
    assert not set(train[0]) & set(train[1])


def test_valid_is_fixed_padded_and_seed_independent(tmp_path):
    cfg = text_config(tmp_path, n=5)
    cfg.num_valid_batches = 4
    valid = D.build_iterator(cfg, split='valid', batch_size=2, seq_len=6, seed=0)
    first, second = list(valid), list(valid)
    assert len(first) == len(valid) == 4
    assert_same(first, second)
    assert_same(first, list(D.build_iterator(cfg, split='valid', batch_size=2, seq_len=6, seed=9)))
    assert row_docs(first) == [f'doc{i:02d}' for i in range(5)]
    assert (first[3]['loss_mask'] == 0).all() and (first[3]['segment_ids'] == 0).all()


def test_valid_shard_empty_on_one_process_still_yields_padding_in_step(tmp_path):
    cfg = text_config(tmp_path, n=1)
    counts = [[int(b['loss_mask'].sum()) for b in D.build_iterator(
        cfg, split='valid', batch_size=1, seq_len=6, seed=0, process_index=p, process_count=2)]
        for p in range(2)]
    assert counts == [[6] + [0] * 7, [0] * 8]
    cfg.text.valid_files, cfg.valid_fraction = '', 0.0
    with pytest.raises(ValueError, match='valid_fraction'):
        D.build_iterator(cfg, split='valid', batch_size=1, seq_len=6, seed=0)


def test_valid_holdout_is_disjoint_from_train(tmp_path):
    cfg = text_config(tmp_path, n=60)
    cfg.text.valid_files, cfg.valid_fraction, cfg.num_valid_batches = '', 0.2, 20
    valid = set(row_docs(D.build_iterator(cfg, split='valid', batch_size=1, seq_len=6, seed=0)))
    train = set(row_docs(take(D.build_iterator(cfg, split='train', batch_size=6, seq_len=6, seed=0), 20)))
    assert valid and not valid & train
    assert len(valid | train) == 60


def chat_rows(tmp_path, policy):
    conv = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
            {'role': 'assistant', 'content': 'Yo'}, {'role': 'user', 'content': '2+2'},
            {'role': 'assistant', 'content': '4'}]
    path = tmp_path / 'chat.jsonl'
    path.write_text(json.dumps({'messages': conv}) + '\n')
    cfg = data_config()
    cfg.source, cfg.chat_loss = 'chat_jsonl', policy
    cfg.chat_jsonl.train_files = cfg.chat_jsonl.valid_files = str(path)
    (batch, *_) = D.build_iterator(cfg, split='valid', batch_size=1, seq_len=40, seed=0)
    return batch


def test_chat_assistant_only_scores_answers_and_end_of_turn(tmp_path):
    batch = chat_rows(tmp_path, 'assistant_only')
    scored = batch['targets'][0][batch['loss_mask'][0] > 0].tolist()
    eot = TOK.end_of_turn_id
    assert scored == TOK.encode('Yo') + [eot] + TOK.encode('4') + [eot]
    for marker in TOK.role_ids.values():
        assert marker not in scored
    text = TOK.decode(batch['inputs'][0][batch['segment_ids'][0] > 0])
    assert text.startswith('<|bos|><|system|>Be brief.<|end_of_turn|><|user|>Hi<|end_of_turn|><|assistant|>Yo')


def test_auto_packing_keeps_conversations_whole():
    cfg = data_config()
    cfg.source = 'arithmetic_chat'
    batch = next(D.build_iterator(cfg, split='train', batch_size=4, seq_len=160, seed=0))
    for row in range(4):  # conversations here are < 120 bytes: none needs splitting
        seg = batch['segment_ids'][row]
        starts = np.flatnonzero((np.diff(np.concatenate([[0], seg])) != 0) & (seg > 0))
        assert len(starts) >= 1
        assert (batch['inputs'][row, starts] == TOK.bos_id).all(), 'every segment opens a conversation'
        assert (batch['positions'][row, starts] == 0).all()


def test_chat_all_policy_scores_every_target(tmp_path):
    batch = chat_rows(tmp_path, 'all')
    real = batch['segment_ids'][0] > 0
    assert (batch['loss_mask'][0][real] == 1).all() and (batch['loss_mask'][0][~real] == 0).all()


def test_render_prompt_ends_with_assistant_marker():
    prompt = chat.render_prompt([{'role': 'user', 'content': 'Hi'}], TOK)
    assert prompt.tolist() == [TOK.bos_id, TOK.role_ids['user'], *TOK.encode('Hi'),
                               TOK.end_of_turn_id, TOK.role_ids['assistant']]


def test_arithmetic_chat_exact_answers_and_heldout_problems():
    cfg = data_config()
    cfg.source = 'arithmetic_chat'
    train = D.build_source(cfg, split='train', seq_len=64, seed=0)
    valid = D.build_source(cfg, split='valid', seq_len=64, seed=0)
    train_problems = set()
    for i in range(300):
        ex = train.example(i)
        op, a, b = ex['problem']
        assert ex['answer'] == str({'+': a + b, '-': a - b, '*': a * b}[op])
        assert ex['messages'][-1] == {'role': 'assistant', 'content': ex['answer']}
        assert not train.is_heldout(op, a, b)
        train_problems.add(ex['problem'])
    valid_problems = {valid.example(i)['problem'] for i in range(100)}
    assert not train_problems & valid_problems
    assert all(valid.is_heldout(*p) for p in valid_problems)
    phrasings = {valid.example(i)['messages'][-2]['content'].split()[0] for i in range(100)}
    train_phrasings = {train.example(i)['messages'][-2]['content'].split()[0] for i in range(300)}
    assert phrasings - train_phrasings, 'valid uses phrasings train never shows'
    doc = train.document(0)
    scored = doc['tokens'][doc['weights'] > 0].tolist()
    assert scored == TOK.encode(train.example(0)['answer']) + [TOK.end_of_turn_id]


def test_copy_task_second_half_copies_first_and_bayes_ce():
    cfg = data_config()
    cfg.source = 'copy'
    T = 20
    batch = next(D.build_iterator(cfg, split='train', batch_size=2, seq_len=T, seed=0))
    for row in range(2):
        tokens = batch['inputs'][row].tolist() + [int(batch['targets'][row, -1])]
        prefix, sep, copy = tokens[:10], tokens[10], tokens[11:]
        assert sep == ord('|') and copy == prefix[:len(copy)]
    assert D.source_info(cfg, seq_len=T)['bayes_optimal_ce'] == pytest.approx(9 * math.log(26) / 20)
    cfg.copy.score = 'copy'
    batch = next(D.build_iterator(cfg, split='train', batch_size=1, seq_len=T, seed=0))
    assert batch['loss_mask'][0].tolist() == [0.0] * 10 + [1.0] * 10
    assert D.source_info(cfg, seq_len=T) == {'bayes_optimal_ce': 0.0}


def test_synthetic_sources_need_the_byte_tokenizer(tmp_path):
    from lm.data.tokenizer import train_bpe
    path = train_bpe(None, 280, str(tmp_path), texts=['abc abd abe'] * 20, show_progress=False)
    cfg = data_config()
    cfg.tokenizer = path
    with pytest.raises(ValueError, match="needs data.tokenizer='byte'"):
        D.build_iterator(cfg, split='train', batch_size=1, seq_len=8, seed=0)


def test_one_worker_process_matches_in_process_and_resumes(tmp_path):
    cfg = text_config(tmp_path, n=12, packing='concat')
    reference = take(D.build_iterator(cfg, split='train', batch_size=2, seq_len=10, seed=0), 8)
    cfg.num_workers = 1
    worker = D.build_iterator(cfg, split='train', batch_size=2, seq_len=10, seed=0)
    try:
        assert_same(take(worker, 3), reference[:3])
        state = json.loads(json.dumps(worker.get_state()))
        assert_same(take(worker, 2), reference[3:5])
        worker.set_state(state)
        assert_same(take(worker, 5), reference[3:8])
    finally:
        worker.close()
