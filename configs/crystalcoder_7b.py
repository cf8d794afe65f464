"""CrystalCoder 7B (LLM360): LLaMA-like, LayerNorm, 25% GPT-J RoPE, muP, three stages.

Every number is from shared/reference/llm360.md.
"""
from crystal.config import STARCODER_SPECIAL_TOKENS, base_config, mixture_component, _stage

SLIMPAJAMA_WEIGHTS = dict(  # stage 1 set weights
    RedPajamaCommonCrawl=0.533, RedPajamaC4=0.267, RedPajamaGithub=0.0496,
    RedPajamaArXiv=0.0433, RedPajamaBook=0.0413, RedPajamaWikipedia=0.0342,
    RedPajamaStackExchange=0.0317,
)


def get_config():
    c = base_config()
    c.name = "crystalcoder_7b"
    m = c.model
    m.vocab_size = 32032
    m.d_model = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.ffn_dim = 10922
    m.max_seq_len = 2048
    m.norm = "layernorm"
    m.norm_eps = 1e-5
    m.norm_bias = True
    m.qkv_bias = True
    m.out_bias = True
    m.ffn_bias = True
    m.rotary_fraction = 0.25
    m.rotary_base = 10000.0
    m.rotary_pairing = "interleaved"
    m.tie_embeddings = True
    m.init_std = 0.073
    m.compute_dtype = "bfloat16"
    m.remat = "full"

    c.mup.enabled = True
    c.mup.base_width = 256
    c.mup.embedding_multiplier = 14.6
    c.mup.output_alpha = 2.22

    c.tokenizer.vocab_size = 32000
    c.tokenizer.special_tokens = STARCODER_SPECIAL_TOKENS

    c.data.seq_len = 2048
    c.data.num_shards = 143
    c.data.num_chunks = 143
    c.data.workers = 16
    c.data.loader_workers = 4    # FIM re-tokenising: see docs/loader.md (Speed)

    # The optimizer LLM360 ran (Cerebras Model Zoo 1.9.1 AdamW, docs/training.md): decay
    # 0.1 coupled to each group's LR (hidden matrices LR x 0.0625), none on biases and
    # norms; eps added before bias correction; the LR list read at the step before each
    # update (the first update has LR 0); loss divided by the fixed B x 2048.
    c.optim.eps = 1e-9
    c.optim.weight_decay = 0.1
    c.optim.wd_mask = "matrices"
    c.optim.clip_norm = 1.0
    c.optim.rule = "cerebras"
    c.optim.eps_placement = "before_correction"
    c.optim.schedule_index = "step"
    c.train.loss_denominator = "batch"
    c.train.global_batch_size = 2112
    c.train.grad_accum = 1
    c.checkpoint.every_steps = 1500

    s1 = _stage(steps=79_721, warmup=86, peak_lr=0.012, end_lr=1.2408e-4, decay_steps=294_337)
    for name, w in SLIMPAJAMA_WEIGHTS.items():
        s1.mixture[name] = mixture_component(f"slimpajama.even.{name}", w)
    s1.init = "scratch"
    s2 = _stage(steps=214_387, warmup=86, peak_lr=0.0087825, end_lr=1.3679e-4,
                decay_steps=214_301)
    s2.mixture.slimpajama = mixture_component("slimpajama.odd.*", 0.372)
    s2.mixture.starcoder = mixture_component("starcoder.*", 0.628, epochs=2, fim_rate=0.9)
    s3 = _stage(steps=27_728, warmup=276, peak_lr=0.002, end_lr=2e-4, decay_steps=27_452)
    s3.reset_optimizer = True    # phase 3: is_pretrained_checkpoint (fresh Adam state)
    for lang, w in (("python", 0.3427), ("html", 0.1854), ("javascript", 0.1837),
                    ("css", 0.0879)):
        s3.mixture[lang] = mixture_component(f"starcoder.{lang}", w, epochs=3, fim_rate=0.3)
    s3.mixture.slimpajama = mixture_component("slimpajama.*,-slimpajama.*.RedPajamaGithub",
                                              0.167)
    s3.mixture.starcoder = mixture_component("starcoder.*", 0.0334, fim_rate=0.3)
    c.stages.stage_1, c.stages.stage_2, c.stages.stage_3 = s1, s2, s3
    return c
