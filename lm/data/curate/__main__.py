"""python -m lm.data.curate --input GLOB [--input GLOB ...] --output DIR [--stages S1,S2,...]
[--config=lm/data/curate/config.py --config.KEY=VALUE ...] [-- BEAM PIPELINE OPTIONS]

Everything after '--' goes to Beam's PipelineOptions, e.g. '-- --runner=DataflowRunner
--project=P --region=R --temp_location=gs://B/tmp' (docs/curation.md); without it the pipeline
runs on the local runner. Prints the report's per-stage table and writes DIR/report.json.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.py'),
    'Curation config file (lm/data/curate/config.py documents every field).', lock_config=True)
_INPUT = flags.DEFINE_multi_string('input', None, 'Input glob(s): JSONL (.gz) or Parquet; repeat or separate with commas.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory (local or a Beam filesystem such as gs://).')
_STAGES = flags.DEFINE_string('stages', None, 'Comma-separated stages to run, in order (default: config.stages).')


def summary(report: dict) -> str:
    rows = [f"{'stage':<12} {'in':>10} {'out':>10} {'removed':>10} {'cpu s':>8}  top reasons"]
    for s in report['stages']:
        top = ', '.join(f'{k} {v}' for k, v in sorted(s['removed'].items(), key=lambda kv: -kv[1])[:3])
        cpu = '' if s['cpu_seconds'] is None else f"{s['cpu_seconds']:.1f}"
        rows.append(f"{s['name']:<12} {s['in']:>10} {s['out']:>10} {s['removed_total']:>10} {cpu:>8}  {top}")
    bad = {k: v['count'] for k, v in report['input']['bad'].items()}
    detail = ', '.join(f'{k} {v}' for k, v in bad.items())
    rows.insert(0, f"input: {report['input']['files']} files, {report['input']['records']} records, "
                   f"{sum(bad.values())} bad" + (f' ({detail})' if bad else ''))
    rows.append(f"output: {report['output']['documents']} documents in {report['output']['shards']} shards, "
                f"{report['wall_seconds']} s")
    return '\n'.join(rows)


def main(argv):
    from lm.data.curate.pipeline import run

    if not _INPUT.value or not _OUTPUT.value:
        raise app.UsageError('--input and --output are required')
    config = _CONFIG.value
    if _STAGES.value is not None:
        with config.unlocked():
            config.stages = _STAGES.value
    inputs = [g for value in _INPUT.value for g in value.split(',') if g]
    report = run(config, inputs, _OUTPUT.value, argv[1:])
    print(summary(report))
    print(f'report: {os.path.join(_OUTPUT.value, "report.json")}')


if __name__ == '__main__':
    try:
        app.run(main)
    except ValueError as e:  # a wrong option or input: the message, not a traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
