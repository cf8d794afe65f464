"""crystal as an lm-evaluation-harness model (`--model crystal`), over any crystal checkpoint.

    lm_eval --model crystal --model_args checkpoint=W/checkpoints/STEP[,batch_size=16,
        max_length=N,max_gen_toks=256,seed=0,mesh=data=2,config=FILE] --tasks arc_easy

`checkpoint` is a workdir (its latest checkpoint), its checkpoints/ or one step directory;
the model is the checkpoint's own config and the tokenizer the run's
(`WORKDIR/data/tokenizer.model`), as `crystal.generate`. lm-eval finds the name `crystal`
through the import hook `crystal_lm_eval_hook` (installed as a .pth file with crystal:
lm-eval 0.4.13 reads no entry points for models), or by importing this module. The sweep
(`crystal.eval --tasks=lm_eval:TASK`, crystal.eval.harness_task) builds one from the
params it already holds (`CrystalLM(params, cfg, tokenizer, decoder)`).

How requests are answered:
- Text is encoded by the run's tokenizer after an EOS, which is how every training document
  starts (crystal's data has no BOS): a context is [EOS] + tokens, an empty context is
  [EOS] alone, lm-eval's `prefix_token_id`.
- `loglikelihood` and `loglikelihood_rolling` go through `crystal.eval.scoring`: crystal's
  own per-token losses, batched, in windows where a request is longer than the context.
- `generate_until` goes through `crystal.generate` (the KV-cache decoder): requests grouped
  by their generation kwargs, greedy unless `do_sample` (then temperature and top_p, seeded
  by `seed`), stopped at the request's `until` strings and at EOS; a context longer than
  `max_length - max_gen_toks` loses its oldest tokens, as lm-eval's own models do.
"""

from __future__ import annotations

import inspect
import json
import logging

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as lm_model_utils
from tqdm import tqdm

from crystal import decode as decode_lib
from crystal import generate as generate_lib
from crystal import sharding as sharding_lib
from crystal.data import replay
from crystal.data.tokenizer import EOS_ID
from crystal.errors import UsageError
from crystal.eval import scoring
from crystal.train.loop import enable_compilation_cache

log = logging.getLogger(__name__)
NAME = "crystal"
DEFAULT_BATCH_SIZE = 16


def _batch_size(value) -> int:
    """lm-eval's --batch_size: an int, or 'auto' / 'auto:N' (crystal's default here)."""
    if isinstance(value, str) and value.startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"batch_size={value}: expected an integer or auto") from None


@register_model(NAME)
class CrystalLM(TemplateLM):
    """lm-eval's model interface over crystal params; see the module docstring."""

    def __init__(self, params, cfg, tokenizer, decoder=None, batch_size=DEFAULT_BATCH_SIZE,
                 max_length: int = 0, max_gen_toks: int = 256, seed: int = 0,
                 mesh=None, info: dict | None = None):
        """params: on the device or `mesh`, in cfg's layer layout; decoder: a
        crystal.decode.Decoder over them, or a callable returning one (built on the first
        generation request when None)."""
        super().__init__()
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.scorer = scoring.Scorer(params, cfg, _batch_size(batch_size), int(max_length))
        self._decoder, self._generator = decoder, None
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.info = dict(info or {})

    @classmethod
    def from_checkpoint(cls, checkpoint: str = "", config: str = "", mesh: str = "",
                        batch_size=DEFAULT_BATCH_SIZE, max_length: int = 0,
                        max_gen_toks: int = 256, seed: int = 0, device=None,
                        max_batch_size=None) -> "CrystalLM":
        """From `--model_args` (see the module docstring). `device` and `max_batch_size`,
        which lm-eval's CLI always passes, are ignored: JAX places the params (one device,
        or `mesh`) and `batch_size` is fixed."""
        if not checkpoint:
            raise UsageError("--model_args: give checkpoint=PATH (a crystal workdir, its "
                             "checkpoints/ or a step directory)")
        cfg, host, workdir = generate_lib.load_checkpoint(checkpoint, config or None)
        enable_compilation_cache(cfg)
        mesh_ = sharding_lib.mesh_from_flag(cfg, mesh)
        return cls(sharding_lib.put_params(host, cfg, mesh_), cfg,
                   replay.run_tokenizer(workdir), None, batch_size, max_length, max_gen_toks,
                   seed, mesh_, dict(checkpoint=str(checkpoint), config_name=cfg.name))

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                       additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """--model_args (which win) over the CLI's --batch_size, --device, ..."""
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(arg_dict)
        known = list(inspect.signature(cls.from_checkpoint).parameters)
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise UsageError(f"--model_args: crystal has no argument {unknown[0]!r}; it takes "
                             f"{', '.join(known[:7])}")
        return cls.from_checkpoint(**args)

    # ------------------------------------------------------------------ lm-eval interface

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return f"crystal-{self.tokenizer.sha256[:12]}"

    def get_model_info(self) -> dict:
        return dict(self.info, model=NAME, config_name=self.cfg.name)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        """The run's tokens of `string`, after an EOS unless add_special_tokens is False."""
        ids = self.tokenizer.encode(string)
        return ids if add_special_tokens is False else [EOS_ID] + ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[((context, continuation), context ids, continuation ids)] -> [(log p, greedy)]."""
        with tqdm(total=len(requests), disable=disable_tqdm, desc="crystal loglikelihood",
                  unit="window") as bar:
            scores = self.scorer.score([(c, t) for _, c, t in requests], bar.update)
        out = []
        for (key, _, _), s in zip(requests, scores):
            answer = (s.logprob, s.greedy)
            self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood after an EOS, in context-sized windows."""
        texts = [req.args[0] for req in requests]
        with tqdm(total=len(texts), disable=disable_tqdm, desc="crystal rolling",
                  unit="window") as bar:
            scores = self.scorer.score(
                [([EOS_ID], self.tok_encode(t, add_special_tokens=False)) for t in texts],
                bar.update)
        for t, s in zip(texts, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), s.logprob)
        return [s.logprob for s in scores]

    def generator(self) -> generate_lib.Generator:
        if self._generator is None:
            dec = self._decoder() if callable(self._decoder) else self._decoder
            if dec is None:
                dec = decode_lib.Decoder(self.scorer.params, self.cfg, self.mesh)
            self._generator = generate_lib.Generator(dec, self.tokenizer)
        return self._generator

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions of each context, grouped by generation kwargs (module docstring)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        gen = self.generator()
        with tqdm(total=len(requests), disable=disable_tqdm, desc="crystal generate_until",
                  unit="request") as bar:
            for idx in groups.values():
                kwargs = lm_model_utils.normalize_gen_kwargs(requests[idx[0]].args[1],
                                                             self.max_gen_toks)
                until = lm_model_utils.handle_stop_sequences(kwargs.pop("until", None), None)
                n = self._gen_tokens(int(kwargs.pop("max_gen_toks")))
                sampling = decode_lib.Sampling(
                    float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                    float(kwargs.get("top_p", 1.0)), self.seed)
                texts = gen.generate([requests[i].args[0] for i in idx], n, sampling, 1,
                                     until, self.scorer.batch_size, truncate=True)
                for i, samples in zip(idx, texts):
                    out[i] = samples[0].text
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(idx))
        return out

    def _gen_tokens(self, wanted: int) -> int:
        """`max_gen_toks`, at most the context less one prompt token (with a warning)."""
        most = self.generator().context - 2
        if wanted > most:
            log.warning("max_gen_toks=%d does not fit the model's context of %d tokens: "
                        "generating %d", wanted, most + 2, most)
        return max(1, min(wanted, most))
