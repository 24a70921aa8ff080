"""Data: tokenizers, sources, grain pipelines -> numpy batches of the batch contract.

    tokenizer = build_tokenizer(config.data)
    train = build_iterator(config.data, split='train', batch_size=B, seq_len=T, seed=s,
                           process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(train)        # {'inputs', 'targets', 'loss_mask', 'segment_ids', 'positions'}: [B, T]
    state = train.get_state()  # JSON-serializable; train.set_state(state) resumes exactly
    for batch in build_iterator(config.data, split='valid', ...): ...   # same batches every pass
    source_info(config.data, seq_len=T)   # {'bayes_optimal_ce': nats} for markov/copy, else {}

`data_cfg` is the `config.data` block of configs/data.py (ConfigDict or dict).
"""

import importlib

# name -> module; resolved on first use so that `import lm.data.markov` or
# `python -m lm.data.tokenizer` does not import grain and every other submodule.
_EXPORTS = {
    'build_tokenizer': 'lm.data.build', 'build_iterator': 'lm.data.build',
    'build_source': 'lm.data.build', 'source_info': 'lm.data.build', 'SOURCES': 'lm.data.build',
    'DataIterator': 'lm.data.pipeline', 'EvalBatches': 'lm.data.pipeline',
    'DataError': 'lm.data.errors', 'ERROR_KINDS': 'lm.data.errors',
    'Tokenizer': 'lm.data.tokenizer', 'ByteTokenizer': 'lm.data.tokenizer',
    'TokenizerMismatchError': 'lm.data.tokenizer', 'check_metadata': 'lm.data.tokenizer',
    'load_metadata': 'lm.data.tokenizer', 'save_metadata': 'lm.data.tokenizer',
    'SPECIAL_NAMES': 'lm.data.tokenizer',
    'render_chat': 'lm.data.chat', 'render_prompt': 'lm.data.chat',
    'ArithmeticChat': 'lm.data.synthetic', 'WordChat': 'lm.data.synthetic',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f'module lm.data has no attribute {name!r}')
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
