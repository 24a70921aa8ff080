"""A Llama-3-8B-shaped model (~8.03B parameters) for a multi-host Cloud TPU slice.

    python -m lm.cli.launch --tpu=my-v5p --zone=us-east5-a --config=configs/llama_8b.py:v5p-128 \\
        --workdir=/mnt/shared/runs/llama8b -- \\
        --config.data.array_record.train_files='gs://bucket/shards/train-*.array_record'

Not run here (no TPU). `python -m lm.train.memory --config=configs/llama_8b.py:<arg> --target=tpu`
compiles its real train step with the TPU compiler for the slice's topology (deviceless, on any
machine) and prints the per-chip memory (results in docs/tpu.md). Arguments pick the slice
(chips = JAX devices; v5p-N counts TensorCores, two per chip; v6e-N counts chips; 4 chips per
TPU VM host in both):

  v5p-128      64 chips × 95 GB HBM, 16 hosts: FSDP over all 64, 4 rows of 4096 tokens per chip
  v6e-64       64 chips × 32 GB HBM, 16 hosts: FSDP 32 × tensor 2 (heads and MLP width split
               in pairs of chips on one host), 4 micro-batches to cut the activations
  v5p-128-32k  long context: rows of 32,768 tokens, 32 rows = 1,048,576 tokens per step;
               FSDP 32 × tensor 2 (one row per pair of chips); attention by the splash kernel
               (nothing of size T² exists; model.attention_impl='auto' picks it on TPU)

Global batch ≈ 1M tokens per step on all. HBM per chip and peak FLOP/s come from the chip
tables (lm/parallel/devices.py) by device kind, or by `mesh.slice` before a run. Tokenize a
corpus once with `python -m lm.data.prepare` (ArrayRecord shards) with a tokenizer of 128,256 entries.
"""

from configs import base

SLICES = {
    # slice: the Cloud TPU accelerator type; mesh: data/fsdp/tensor sizes (chips); batch × seq_len tokens
    "v5p-128": dict(slice="v5p-128", micro_batches=1, batch_size=256, seq_len=4096,
                    mesh=dict(data=1, fsdp=64, tensor=1)),
    "v6e-64": dict(slice="v6e-64", micro_batches=4, batch_size=256, seq_len=4096,
                   mesh=dict(data=1, fsdp=32, tensor=2)),
    "v5p-128-32k": dict(slice="v5p-128", micro_batches=1, batch_size=32, seq_len=32_768,
                        mesh=dict(data=1, fsdp=32, tensor=2)),
}


def get_config(arg: str | None = None):
    slice_name = arg or "v5p-128"
    if slice_name not in SLICES:
        raise ValueError(f"configs/llama_8b.py: unknown slice {slice_name!r}; one of {sorted(SLICES)}")
    spec = SLICES[slice_name]
    c = base.get_config()
    m = c.model
    m.vocab_size = 128_256
    m.d_model = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.num_kv_heads = 8
    m.head_dim = 128
    m.mlp_dim = 14_336
    m.rope_theta = 500_000.0
    m.norm_eps = 1e-5
    m.tie_embeddings = False  # Llama-3-8B has a separate output projection
    m.dtype = "bfloat16"
    m.remat = "full"
    m.attention_block = 512  # causal blocks: a T×T attention does ~(1 + 512/T)/2 of its score work
    m.init_scale = 1.0

    c.loss.kind = "fused"  # never materialize [B, T, 128256] logits
    c.loss.chunk_size = 1024
    c.loss.z_loss = 1e-4

    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.1

    c.train.steps = 100_000
    c.train.batch_size = spec["batch_size"]  # × seq_len ≈ 1M tokens per step
    c.train.seq_len = spec["seq_len"]
    c.train.micro_batches = spec["micro_batches"]
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.progress_bar = False

    for k, v in spec["mesh"].items():
        c.mesh[k] = v
    c.mesh.slice = spec["slice"]  # HBM per chip from lm/parallel/devices.py; the TPU compiler's topology
    c.distributed.auto = True

    c.data.source = "array_record"
    c.data.tokenizer = "tokenizer.json"
    c.data.num_workers = 4
    c.sample.num_samples = 0
    return c
