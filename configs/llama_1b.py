"""A Llama-3.2-1B-shaped model (~1.24B parameters) for a Cloud TPU slice.

    python -m lm.cli.train --config=configs/llama_1b.py:v5p-32 --workdir=gs://bucket/runs/llama1b \\
        --config.data.array_record.train_files='gs://bucket/shards/train-*.array_record'

Not run here (no TPU); the test suite builds its shapes with jax.eval_shape and checks the
sharded per-device footprint; `python -m lm.train.memory --config=configs/llama_1b.py:<slice>
--target=tpu` compiles its train step with the TPU compiler (docs/tpu.md). Arguments pick the slice:
  v5p-32  16 chips (95 GB HBM each): FSDP over all 16
  v6e-16  16 chips (32 GB HBM each): FSDP 8 × tensor 2
Data: tokenize a corpus once with `python -m lm.data.prepare` (ArrayRecord shards) using a
tokenizer with 128,256 entries (e.g. a Llama-3-compatible tokenizer.json you provide).
"""

from configs import base

SLICES = {
    "v5p-32": dict(data=1, fsdp=16, tensor=1),
    "v6e-16": dict(data=1, fsdp=8, tensor=2),
}


def get_config(arg: str | None = None):
    slice_name = arg or "v5p-32"
    if slice_name not in SLICES:
        raise ValueError(f"configs/llama_1b.py: unknown slice {slice_name!r}; one of {sorted(SLICES)}")
    c = base.get_config()
    m = c.model
    m.vocab_size = 128_256
    m.d_model = 2048
    m.num_layers = 16
    m.num_heads = 32
    m.num_kv_heads = 8
    m.mlp_dim = 8192
    m.rope_theta = 500_000.0
    m.norm_eps = 1e-5
    m.tie_embeddings = True
    m.dtype = "bfloat16"
    m.remat = "full"
    m.attention_block = 512  # causal blocks: a T×T attention does ~(1 + 512/T)/2 of its score work
    m.init_scale = 1.0

    c.loss.kind = "fused"  # never materialize [B, T, 128256] logits
    c.loss.chunk_size = 2048
    c.loss.z_loss = 1e-4

    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.1

    c.train.steps = 100_000
    c.train.batch_size = 512  # × 2048 tokens ≈ 1M tokens per step
    c.train.seq_len = 2048
    c.train.micro_batches = 1
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.progress_bar = False

    for k, v in SLICES[slice_name].items():
        c.mesh[k] = v
    c.mesh.slice = slice_name  # HBM per chip from lm/parallel/devices.py; the TPU compiler's topology
    if slice_name.startswith("v6e"):  # 32 GB HBM: full-batch temporaries need 81 GiB, 8 micro-batches 12 GiB
        c.train.micro_batches = 8
    c.distributed.auto = True

    c.data.source = "array_record"
    c.data.tokenizer = "tokenizer.json"
    c.data.num_workers = 4
    c.sample.num_samples = 0
    return c
