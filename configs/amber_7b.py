"""Amber 7B (LLM360): the LLaMA-7B architecture, one stage, cosine schedule.

Every number is from shared/reference/llm360.md. Steps: 1.26T tokens / (2240 x 2048).

Amber's published data mix (billions of tokens; the mixture normalises the weights), mapped
onto crystal's data groups (docs/data.md): RefinedWeb is filtered CommonCrawl, so it reads
the CommonCrawl set; C4, ArXiv, Books, Wikipedia and StackExchange read their RedPajama
sets (both SlimPajama halves); StarCoder reads every StarCoder language. Amber took its code
from StarCoder only, so RedPajama's GitHub set is not in the mix.
"""
from crystal.config import base_config, mixture_component, _stage

AMBER_MIX = {  # component: (data groups, billions of tokens)
    "refinedweb": ("slimpajama.*.RedPajamaCommonCrawl", 665),
    "starcoder": ("starcoder.*", 292),
    "c4": ("slimpajama.*.RedPajamaC4", 198),
    "arxiv": ("slimpajama.*.RedPajamaArXiv", 30),
    "book": ("slimpajama.*.RedPajamaBook", 29),
    "wikipedia": ("slimpajama.*.RedPajamaWikipedia", 24),
    "stackexchange": ("slimpajama.*.RedPajamaStackExchange", 22),
}


def get_config():
    c = base_config()
    c.name = "amber_7b"
    m = c.model
    m.vocab_size = 32000
    m.d_model = 4096
    m.num_layers = 32
    m.num_heads = 32
    m.ffn_dim = 11008
    m.max_seq_len = 2048
    m.norm = "rmsnorm"
    m.norm_eps = 1e-6
    m.rotary_fraction = 1.0
    m.rotary_base = 10000.0
    m.rotary_pairing = "half"    # stored in HF's rotate-half layout, as Amber is released
    m.tie_embeddings = False
    m.init_std = 0.02
    m.compute_dtype = "bfloat16"
    m.remat = "full"
    c.mup.enabled = False

    c.tokenizer.vocab_size = 32000
    c.tokenizer.special_tokens = ()
    c.data.seq_len = 2048
    c.data.num_shards = 360
    c.data.num_chunks = 360      # train_000 ... train_359, one release checkpoint each
    c.data.workers = 16
    c.data.loader_workers = 4    # FIM re-tokenising: see docs/loader.md (Speed)

    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.wd_mask = "all"      # Amber decayed every parameter
    c.optim.clip_norm = 1.0
    c.train.global_batch_size = 2240
    c.checkpoint.every_steps = 763  # ~ one per chunk: 274,658 / 360

    s = _stage(steps=274_658, warmup=2000, peak_lr=3e-4, end_lr=3e-5, kind="cosine")
    s.init = "scratch"
    for name, (groups, billions) in AMBER_MIX.items():
        s.mixture[name] = mixture_component(groups, float(billions))
    c.stages.stage_1 = s
    return c
