"""Fine-tune a model imported from a Hugging Face checkpoint (python -m lm.interop.hf import).

    python -m lm.interop.hf import --hf_dir path/to/hf_checkpoint --workdir runs/imported
    python -m lm.cli.train --config=configs/hf_finetune.py:runs/imported --workdir=runs/ft \\
        --config.data.source=text --config.data.text.files='corpus/*.txt'

The argument is the imported run directory: its config.json gives model.* (the checkpoint's
shape, biases and rotary settings) and data.tokenizer ('hf:<run>/hf', the checkpoint's own
tokenizer and special tokens), and the run starts from its parameters (train.init_from: step 0,
a fresh AdamW state and data order). Everything else is configs/base.py's default,
with a learning rate for fine-tuning rather than pretraining.
"""

import ml_collections

from configs import base
from lm.io.checkpoint import read_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.optimizer.lr = 1e-4  # fine-tuning: well below pretraining's 3e-3
    c.optimizer.warmup_steps = 10  # short warmup
    c.optimizer.weight_decay = 0.0  # no decay towards zero of pretrained weights
    if not arg:  # the fine-tuning settings alone (model.* and train.init_from are then yours to set)
        return c
    imported = read_config(arg)
    for name, value in imported.model.items():
        if name in c.model:
            c.model[name] = value  # the imported model's shape and numerics
    c.data.tokenizer = imported.data.tokenizer  # 'hf:<run>/hf': the checkpoint's tokenizer, vocabulary unchanged
    c.data.add_bos = imported.data.add_bos  # whether the checkpoint has a bos token
    c.train.init_from = arg  # start from the imported parameters (step 0, fresh optimizer state)
    return c
