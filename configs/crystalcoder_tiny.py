"""A laptop-size CrystalCoder: the 7B config's structure, scaled to the sample corpus.

Same variant flags (LayerNorm with biases, 25% interleaved RoPE, tied embeddings, muP
with the 7B constants) at width 128 over a muP base width of 32, so muP is exercised.
The stage schedules keep the 7B shapes: stage 1 stops part-way down its decay line and
stage 2 re-warms to where stage 1 stood.
"""
import pathlib

from crystal.config import STARCODER_SPECIAL_TOKENS, read


def get_config():
    c = read(pathlib.Path(__file__).with_name("crystalcoder_7b.py"))
    c.name = "crystalcoder_tiny"
    m = c.model
    m.vocab_size = 2048          # 2000 + 18 specials, padded to a multiple of 64
    m.d_model = 128
    m.num_layers = 2
    m.num_heads = 4              # head_dim 32: 8 rotary dims
    m.ffn_dim = 344
    m.max_seq_len = 128
    m.compute_dtype = "float32"
    m.remat = "none"
    c.mup.base_width = 32        # width multiplier 4

    c.tokenizer.vocab_size = 2000
    c.tokenizer.special_tokens = STARCODER_SPECIAL_TOKENS
    c.data.seq_len = 128
    c.data.num_shards = 4
    c.data.num_chunks = 4
    c.data.workers = 2
    c.data.loader_workers = 0    # in-process: no worker start-up on a laptop
    c.train.global_batch_size = 16
    c.checkpoint.every_steps = 25

    # 7B shape: warmup 86 of 79,721 steps, decay line 294,337 long, stopped at 27%.
    steps1, warm1, line1 = 120, 6, 440
    peak1, end1 = 0.012, 1.2408e-4
    stood = peak1 - (peak1 - end1) * (steps1 - warm1) / line1
    c.stages.stage_1.steps = steps1
    c.stages.stage_1.schedule.update(dict(warmup_steps=warm1, peak_lr=peak1, end_lr=end1,
                                          decay_steps=line1))
    c.stages.stage_2.steps = 120
    c.stages.stage_2.schedule.update(dict(warmup_steps=6, peak_lr=stood, end_lr=1.3679e-4,
                                          decay_steps=114))
    c.stages.stage_3.steps = 60
    c.stages.stage_3.schedule.update(dict(warmup_steps=4, peak_lr=0.002, end_lr=2e-4,
                                          decay_steps=56))
    return c
