"""Chat SFT of a model imported from Hugging Face with low-rank adapters (LoRA / QLoRA), or with
full fine-tuning for comparison: the same data, steps and schedule (experiments/lora.md).

    python -m lm.interop.hf import --hf_dir tests/fixtures/hf/llama --workdir runs/llama_fixture
    python -m lm.cli.train --config=configs/lora.py:runs/llama_fixture --workdir=runs/lora       # LoRA r=8
    python -m lm.cli.train --config=configs/lora.py:runs/llama_fixture,qlora --workdir=runs/qlora  # NF4 base
    python -m lm.cli.train --config=configs/lora.py:runs/llama_fixture,full --workdir=runs/full    # all weights

The argument is the imported run (its model.*, tokenizer and parameters, as configs/hf_finetune.py
takes them), then optionally ',lora' (default), ',qlora' or ',full'. The data: configs/sft.py's
synthetic chat (word_chat: reverse / upper-case / dash a word, held-out words for validation),
rendered through the checkpoint's own chat template (lm/data/chat.py: uses_template) with
assistant-only loss: only the answers and their closing <|eot_id|> are scored. A checkpoint of a
LoRA run holds only the adapters and their optimizer state; the base is train.init_from, loaded
again on resume.
"""

import ml_collections

from configs import sft
from lm.io.checkpoint import read_config

MODES = ("lora", "qlora", "full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    run, _, mode = (arg or "").partition(",")
    mode = mode or "lora"
    if mode not in MODES:
        raise ValueError(f"configs/lora.py:<imported run>[,mode]: mode must be one of {MODES}, got {mode!r}")
    c = sft.get_config()  # objective 'sft', data.source 'word_chat', assistant-only loss, first-fit packing
    # the chat renders through the imported tokenizer's template (its role headers and <|eot_id|>), not
    # lm's role markers, which the checkpoint's vocabulary does not have
    c.data.word_chat.system_prompt_prob = 0.0  # shorter conversations: the fixture's tokenizer is byte-level
    if run:
        imported = read_config(run)
        for name, value in imported.model.items():
            if name in c.model:
                c.model[name] = value  # the imported model's shape and numerics
        c.data.tokenizer = imported.data.tokenizer  # 'hf:<run>/hf': the checkpoint's own tokenizer
        c.data.add_bos = imported.data.add_bos
        c.train.init_from = run  # the base: the imported parameters
    c.train.steps = 300  # optimizer steps (a few minutes on a CPU for the fixture)
    c.train.batch_size = 16  # rows per step
    c.train.seq_len = 256  # tokens per row: whole conversations (1–2 exchanges, ≤ ~120 tokens each with the fixture)
    c.train.log_every = 25  # steps between metric lines
    c.train.eval_every = 100  # steps between validation passes
    c.data.num_valid_batches = 4  # validation batches (the same every pass)
    c.optimizer.warmup_steps = 20  # linear warmup
    c.optimizer.weight_decay = 0.0  # no decay towards zero of pretrained weights (nor of the adapters)
    c.eval.evaluators = ""  # compare validation losses (exact_match needs lm's role markers to stop a reply)

    if mode == "full":
        c.optimizer.lr = 1e-3  # every weight trained
        return c
    c.optimizer.lr = 3e-3  # adapters take a larger learning rate than full fine-tuning (B starts at 0)
    c.lora.rank = 8  # adapter rank
    c.lora.alpha = 16.0  # scaling α/r = 2
    c.lora.targets = "all"  # q, k, v, o, gate, up, down
    c.lora.base_dtype = "float32" if mode == "lora" else "nf4"  # qlora: NF4 projections, the rest bfloat16
    c.lora.block_size = 32  # divides the fixture's widths (64, 96, head_dim 16)
    return c
