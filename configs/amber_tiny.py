"""A laptop-size Amber: LLaMA structure (RMSNorm, full rotate-half RoPE, untied, SP)."""
import pathlib

from crystal.config import read


def get_config():
    c = read(pathlib.Path(__file__).with_name("amber_7b.py"))
    c.name = "amber_tiny"
    m = c.model
    m.vocab_size = 2048           # 2000 tokens padded to a multiple of 64
    m.d_model = 128
    m.num_layers = 2
    m.num_heads = 4
    m.ffn_dim = 344
    m.max_seq_len = 128
    m.compute_dtype = "float32"
    m.remat = "none"
    c.tokenizer.vocab_size = 2000
    c.data.seq_len = 128
    c.data.num_shards = 4
    c.data.num_chunks = 4
    c.data.workers = 2
    c.data.loader_workers = 0    # in-process: no worker start-up on a laptop
    c.train.global_batch_size = 16
    c.checkpoint.every_steps = 25
    c.stages.stage_1.steps = 200
    c.stages.stage_1.schedule.update(dict(warmup_steps=10, peak_lr=3e-3, end_lr=3e-4))
    return c
