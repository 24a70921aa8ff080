"""A Llama-3-8B-shaped model (~8.03B parameters) for a multi-host Cloud TPU slice.

    python -m lm.cli.launch --tpu=my-v5p --zone=us-east5-a --config=configs/llama_8b.py:v5p-128 \\
        --workdir=/mnt/shared/runs/llama8b -- \\
        --config.data.array_record.train_files='gs://bucket/shards/train-*.array_record'

Not run here (no TPU). The test suite builds its shapes with jax.eval_shape, and
`python -m lm.train.memory --config=configs/llama_8b.py:<slice>` compiles its real train step
against a virtual CPU mesh of the slice's size and prints the per-device memory (results
in docs/tpu.md). Arguments pick the slice (chips = JAX devices; v5p-N counts TensorCores,
two per chip; v6e-N counts chips; 4 chips per TPU VM host in both):

  v5p-128  64 chips × 95 GB HBM, 16 hosts: FSDP over all 64, 4 rows of 4096 tokens per chip
  v6e-64   64 chips × 32 GB HBM, 16 hosts: FSDP 32 × tensor 2 (heads and MLP width split
           in pairs of chips on one host), 4 micro-batches to cut the activations

Global batch 256 × 4096 tokens ≈ 1M tokens per step on both. Tokenize a corpus once with
`python -m lm.data.prepare` (ArrayRecord shards) with a tokenizer of 128,256 entries.
"""

from configs import base

SLICES = {
    # chips: JAX devices; hbm_gib: memory per chip; mesh: data/fsdp/tensor sizes
    "v5p-128": dict(chips=64, hbm_gib=95e9 / 2**30, peak_flops=459e12, micro_batches=1,
                    mesh=dict(data=1, fsdp=64, tensor=1)),
    "v6e-64": dict(chips=64, hbm_gib=32e9 / 2**30, peak_flops=918e12, micro_batches=4,
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
    c.train.batch_size = 256  # × 4096 tokens ≈ 1M tokens per step
    c.train.seq_len = 4096
    c.train.micro_batches = spec["micro_batches"]
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.progress_bar = False
    c.train.peak_flops = spec["peak_flops"]  # bf16 peak per chip

    for k, v in spec["mesh"].items():
        c.mesh[k] = v
    c.mesh.device_memory_gib = spec["hbm_gib"]
    c.distributed.auto = True

    c.data.source = "array_record"
    c.data.tokenizer = "tokenizer.json"
    c.data.num_workers = 4
    c.sample.num_samples = 0
    return c
