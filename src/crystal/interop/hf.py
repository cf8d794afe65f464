"""Crystal checkpoints to Hugging Face folders and back: `python -m crystal.interop.hf`.

    python -m crystal.interop.hf export CHECKPOINT OUT [--layout=auto|llama|stablelm|llm360]
        [--max_shard_size=5GB] [--tokenizer=FILE]
    python -m crystal.interop.hf import HF_DIR OUT [--layout=auto|...] [--config=BASE]

export: the checkpoint's params (only those are read) in float32 safetensors (sharded with
`model.safetensors.index.json` above --max_shard_size), config.json of the layout, the run's
tokenizer (tokenizer.model + tokenizer_config.json + special_tokens_map.json), a README.md
model card stub and crystal_config.json (the full crystal config). Same checkpoint, same
bytes (no timestamps).

import: any of the three layouts into a crystal checkpoint, OUT/checkpoints/0 (a full train
state: the HF params, a fresh optimizer state of stage 1, step 0; its meta records where it
came from), with OUT/crystal_config.json (the derived config: pass it as --config) and the
tokenizer. Continue training with
    python -m crystal.train --config=OUT/crystal_config.json --init_from=OUT --workdir=W
The config: the model (and muP) from crystal_config.json when the folder has one (crystal
wrote it), else derived from config.json; everything else from --config, else that
crystal_config.json, else configs/crystalcoder_7b.py (llm360, stablelm) or amber_7b.py.

Both write OUT whole or not at all (a temporary sibling, renamed); OUT must not exist.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from crystal import __version__, cli, fileio
from crystal import checkpoint as ckpt_lib
from crystal import config as config_lib
from crystal import model as model_lib
from crystal import optim as optim_lib
from crystal.data.tokenizer import Tokenizer
from crystal.errors import ConversionError, CrystalError, UsageError
from crystal.interop import registry
from crystal.interop.layouts import Layout
from crystal.train import step as step_lib

CONFIG_FILE = "config.json"
CRYSTAL_CONFIG_FILE = "crystal_config.json"   # the full crystal config (provenance)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
CARD_FILE = "README.md"
DEFAULT_SHARD = "5GB"
DEFAULT_BASE = {"llama": "amber_7b", "stablelm": "crystalcoder_7b", "llm360": "crystalcoder_7b"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """'5GB', '200MB', '1000' -> bytes (powers of 10, as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--max_shard_size={text}: expected a size such as 5GB or 200MB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


# ----------------------------------------------------------------------------- weights


def write_weights(out: Path, tensors: dict, max_shard_bytes: int) -> list[str]:
    """Float32 safetensors in tensor order: one model.safetensors, or shards of at most
    `max_shard_bytes` (a larger tensor alone) with transformers' index. Returns the names."""
    shards, size = [[]], 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += x.nbytes
    n = len(shards)
    files = [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                           for i in range(n)]
    for names, fname in zip(shards, files):
        save_file({k: tensors[k] for k in names}, str(out / fname), metadata={"format": "pt"})
    if n > 1:
        index = dict(metadata=dict(total_size=int(sum(x.nbytes for x in tensors.values()))),
                     weight_map={k: files[i] for i, names in enumerate(shards) for k in names})
        fileio.write_json(out / INDEX_FILE, index, sort_keys=True)
    return files


def read_weights(src: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF folder (model.safetensors or its sharded index), as stored
    (bfloat16 and float16 widen to float32 exactly when a layout takes them)."""
    index, single = src / INDEX_FILE, src / WEIGHTS_FILE
    if index.is_file():
        wm = fileio.read_json(index, ConversionError).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ConversionError(f"{index}: no weight_map")
        files = sorted(set(wm.values()))
    elif single.is_file():
        files = [WEIGHTS_FILE]
    else:
        pickled = sorted(p.name for p in src.glob("pytorch_model*.bin"))
        why = (f"; {pickled[0]} is a pickle, which crystal never loads (convert it to "
               "safetensors first)" if pickled else "")
        raise ConversionError(f"{src}: no {WEIGHTS_FILE} or {INDEX_FILE}{why}")
    out = {}
    for fname in files:
        path = src / fname
        if not path.is_file():
            raise ConversionError(f"{path}: not found (listed in {INDEX_FILE})")
        try:
            part = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types on junk
            raise ConversionError(f"{path}: not a safetensors file ({e})") from None
        if index.is_file():
            stray = sorted(k for k in part if wm.get(k) != fname)
            if stray:
                raise ConversionError(f"{path}: holds {stray[0]}, which {INDEX_FILE} "
                                      f"places in {wm.get(stray[0])}")
        out.update(part)
    return out


# ----------------------------------------------------------------------------- tokenizer


def write_tokenizer(out: Path, model_path: Path, cfg) -> list[str]:
    """tokenizer.model plus the JSON transformers' LlamaTokenizer reads: crystal's
    sentencepiece model, its special tokens at ids base_vocab.., no BOS added (crystal
    trains without one)."""
    tok = Tokenizer.from_config(cfg, model_path)
    shutil.copyfile(model_path, out / TOKENIZER_FILE)
    specials = list(cfg.tokenizer.special_tokens)
    added = {str(tok.base_vocab_size + i): dict(content=t, lstrip=False, normalized=False,
                                                rstrip=False, single_word=False, special=True)
             for i, t in enumerate(specials)}
    common = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                  additional_special_tokens=specials)
    fileio.write_json(out / "tokenizer_config.json", dict(
        common, tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False,
        model_max_length=int(cfg.model.max_seq_len), clean_up_tokenization_spaces=False,
        added_tokens_decoder=added), sort_keys=True)
    fileio.write_json(out / "special_tokens_map.json", common, sort_keys=True)
    return [TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"]


def run_tokenizer(ckpt_dir: Path, cfg) -> Path | None:
    """The tokenizer a run trained with: WORKDIR/data/tokenizer.model, else the config's."""
    for p in (ckpt_dir.parent / "data" / TOKENIZER_FILE, Path(cfg.tokenizer.model_path or "")):
        if p.name and p.is_file():
            return p
    return None


# ----------------------------------------------------------------------------- export


def model_card(cfg, lay: Layout, source: dict, exact: bool) -> str:
    """README.md: what this is, how to load it, where it came from (no timestamps)."""
    m = cfg.model
    load = ("AutoModelForCausalLM.from_pretrained(DIR)" if lay.name != "llm360" else
            "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), after copying "
            "LLM360's configuration_crystalcoder.py and modeling_crystalcoder.py (from their "
            "CrystalCoder release on the Hub) into DIR")
    rows = "\n".join(f"| {k} | {v} |" for k, v in source.items())
    return (f"---\nlibrary_name: transformers\ntags: [crystal, llm360, {lay.name}]\n---\n\n"
            f"# {cfg.name}\n\nExported by crystal {__version__} in the `{lay.name}` layout "
            f"(`{lay.architecture}`): d_model {m.d_model}, {m.num_layers} layers, "
            f"{m.num_heads} heads, FFN {m.ffn_dim}, vocab {m.vocab_size}, {m.norm}, "
            f"float32.\nRound trip to crystal: "
            f"{'bitwise' if exact else 'to 1 ulp (muP multipliers folded into weights)'}.\n\n"
            f"## Load\n\n    from transformers import AutoModelForCausalLM\n    "
            f"{load}\n\n## Provenance\n\n| | |\n|---|---|\n{rows}\n\n"
            f"`{CRYSTAL_CONFIG_FILE}` is the full crystal config; `python -m "
            f"crystal.interop.hf import` reads this folder back.\n")


def save(params, cfg, out, layout: str = "auto", tokenizer=None,
         max_shard_bytes: int | None = None, source: dict | None = None) -> dict:
    """Writes the HF folder `out` (must not exist) for crystal `params` of `cfg`."""
    lay = registry.pick(cfg, layout)
    spec = model_lib.ModelSpec.from_config(cfg)
    tensors = lay.to_tensors(params, cfg)
    max_shard_bytes = max_shard_bytes or parse_size(DEFAULT_SHARD)
    out = Path(out)
    with fileio.atomic_dir(out) as tmp:
        fileio.write_json(tmp / CONFIG_FILE, lay.config_json(cfg), sort_keys=True)
        files = write_weights(tmp, tensors, max_shard_bytes)
        fileio.write_json(tmp / CRYSTAL_CONFIG_FILE, config_lib.to_json_dict(cfg),
                          sort_keys=True)
        if tokenizer is not None:
            files += write_tokenizer(tmp, Path(tokenizer), cfg)
        card = model_card(cfg, lay, source or {}, lay.exact(spec))
        fileio.atomic_write_bytes(tmp / CARD_FILE, card.encode(), sync=False)
    return dict(out=str(out), layout=lay.name, architecture=lay.architecture, files=files,
                bytes=int(sum(x.nbytes for x in tensors.values())), exact=lay.exact(spec),
                tokenizer=tokenizer is not None)


def export(checkpoint, out, layout: str = "auto", tokenizer=None,
           max_shard_bytes: int | None = None) -> dict:
    """A crystal checkpoint (workdir, checkpoints dir or step dir) to an HF folder; the
    config is the checkpoint's own (its meta)."""
    directory, step = ckpt_lib.find_checkpoint(checkpoint)
    with ckpt_lib.Checkpointer(directory, read_only=True) as c:
        params, meta = c.restore_params(step)
    if "config" not in meta:
        raise ConversionError(f"{directory}/{step}: checkpoint meta has no config")
    cfg = config_lib.from_json_dict(meta["config"], where=f"{directory}/{step} meta")
    tok = Path(tokenizer) if tokenizer else run_tokenizer(directory, cfg)
    source = dict(config=cfg.name, step=step, stage=meta.get("stage"),
                  tokens_seen=meta.get("tokens_seen"), data_sha256=meta.get("data_sha256"),
                  crystal_version=meta.get("crystal_version"), git_commit=meta.get("git_commit"))
    params = jax.tree.map(np.asarray, params)
    return dict(save(params, cfg, out, layout, tok, max_shard_bytes, source), step=step)


# ----------------------------------------------------------------------------- import


def _hf_config(src: Path) -> dict:
    hc = fileio.read_json(src / CONFIG_FILE, ConversionError)
    if not isinstance(hc, dict):
        raise ConversionError(f"{src / CONFIG_FILE}: not a JSON object")
    return hc


def _changed(cfg, fields: dict):
    """A validated copy of `cfg` with the dotted `fields` set."""
    return config_lib.with_overrides(
        config_lib.from_json_dict(config_lib.to_json_dict(cfg)), fields)


def _fitting_fields(src: Path, base, model: dict) -> dict:
    """What the base config's data side needs to fit the model: the folder's own
    tokenizer.model when the base trains one (else, without a tokenizer file, a base
    vocabulary that fits the model's rows, trained at prepare time); rows no longer than
    the model's positions."""
    tok, t, out = src / TOKENIZER_FILE, base.tokenizer, {}
    rows = model.get("model.vocab_size", base.model.vocab_size)
    if tok.is_file() and not t.model_path:
        out.update({"tokenizer.model_path": str(tok),
                    "tokenizer.vocab_size": Tokenizer.load(tok).base_vocab_size})
    elif not tok.is_file() and t.vocab_size + len(t.special_tokens) > rows:
        out["tokenizer.vocab_size"] = rows - len(t.special_tokens)
    positions = model.get("model.max_seq_len", base.model.max_seq_len)
    if base.data.seq_len > positions:
        out["data.seq_len"] = positions
    return out


def derive_config(src, base=None, layout: str = "auto", overrides: dict | None = None):
    """(crystal config, layout) for the HF folder `src`: the model (and muP) from its
    crystal_config.json if crystal wrote one, else from config.json; the other sections
    from `base` (a config, or a config file's name/path), else that crystal_config.json,
    else DEFAULT_BASE; `overrides` ({dotted field: value}) last."""
    src = Path(src).absolute()
    hc, where = _hf_config(src), str(src / CONFIG_FILE)
    found = registry.of_config_json(hc, where)
    lay = found if layout == "auto" else registry.get(layout)
    if lay is not found:
        raise ConversionError(f"{where}: architectures {hc.get('architectures')!r} is the "
                              f"{found.name} layout, not --layout={layout}")
    prov_path = src / CRYSTAL_CONFIG_FILE
    prov = (config_lib.from_json_dict(fileio.read_json(prov_path, ConversionError),
                                      where=str(prov_path)) if prov_path.is_file() else None)
    if base is None:
        base = prov if prov is not None else config_lib.read(DEFAULT_BASE[lay.name])
    elif isinstance(base, (str, Path)):
        base = config_lib.read(base)
    if prov is not None:
        fields = {f"{s}.{k}": v for s in ("model", "mup") for k, v in prov[s].items()}
    else:
        fields = lay.model_fields(hc, where)
    fields.update(_fitting_fields(src, base, fields))
    try:
        cfg = _changed(base, dict(fields, **(overrides or {})))
    except CrystalError as e:
        raise ConversionError(f"{where}: gives a crystal config that does not validate: "
                              f"{e}") from None
    lay.check_config(hc, cfg, where)
    return cfg, lay


def load(src, cfg=None, layout: str = "auto", overrides: dict | None = None
         ) -> tuple[dict, object, Layout]:
    """(crystal params, config, layout) of the HF folder `src`; with `cfg`, the folder
    must describe cfg's model field by field, else the config is derived (derive_config)."""
    src = Path(src)
    if cfg is None:
        cfg, lay = derive_config(src, layout=layout, overrides=overrides)
    else:
        lay = registry.of_config_json(_hf_config(src), str(src / CONFIG_FILE))
        lay.check_config(_hf_config(src), cfg, str(src / CONFIG_FILE))
    return lay.params_from(read_weights(src), cfg, where=str(src)), cfg, lay


def write_checkpoint(directory: Path, params, cfg, meta: dict) -> None:
    """A step-0 crystal checkpoint of `params`, in the training loop's layout: the full
    train state with a fresh stage-1 optimizer state (what --init_from restores)."""
    opt = optim_lib.make_optimizer(cfg, 1)
    key = jax.random.key(int(cfg.seed))
    state = jax.jit(lambda p, k: step_lib.init_state(cfg, k, opt, params=p))(params, key)
    meta = dict(meta, config=config_lib.to_json_dict(cfg), fingerprint=config_lib.fingerprint(
        cfg), stage=0, stage_step=0, stage_done=True, tokens_seen=0, skipped_steps=0)
    with ckpt_lib.Checkpointer(directory, async_save=False) as c:
        c.save(0, state.to_dict(), {}, meta)


def import_(src, out, layout: str = "auto", base=None, overrides: dict | None = None) -> dict:
    """The HF folder `src` as OUT/checkpoints/0 + OUT/crystal_config.json (+ tokenizer)."""
    src, out = Path(src).absolute(), Path(out).absolute()
    cfg, lay = derive_config(src, base, layout, overrides)
    tok = src / TOKENIZER_FILE
    if cfg.tokenizer.model_path == str(tok):
        # The model's own tokenizer, where the config will find it (OUT, after the rename).
        cfg = _changed(cfg, {"tokenizer.model_path": str(out / TOKENIZER_FILE)})
    params = lay.params_from(read_weights(src), cfg, where=str(src))
    files = {p.name: fileio.file_sha256(p) for p in sorted(src.iterdir()) if p.is_file()}
    meta = dict(imported_from=dict(path=str(src), layout=lay.name,
                                   architecture=lay.architecture, files_sha256=files))
    with fileio.atomic_dir(out) as tmp:
        if tok.is_file():
            shutil.copyfile(tok, tmp / TOKENIZER_FILE)
        fileio.write_json(tmp / CRYSTAL_CONFIG_FILE, config_lib.to_json_dict(cfg),
                          sort_keys=True)
        write_checkpoint(ckpt_lib.checkpoint_dir(tmp), params, cfg, meta)
    return dict(out=str(out), layout=lay.name, config=str(out / CRYSTAL_CONFIG_FILE),
                checkpoint=str(ckpt_lib.checkpoint_dir(out) / "0"), name=cfg.name)


# ----------------------------------------------------------------------------- CLI

FLAGS = (
    cli.Flag("action", "export (crystal checkpoint -> HF folder) or import (HF folder -> "
             "crystal checkpoint)", positional=True, required=True,
             choices=("export", "import")),
    cli.Flag("source", "export: a checkpoint (WORKDIR, WORKDIR/checkpoints or "
             "WORKDIR/checkpoints/STEP); import: an HF folder", positional=True, required=True),
    cli.Flag("out", "the folder to write (must not exist)", positional=True, required=True),
    cli.Flag("layout", "llama | stablelm | llm360 | auto (export: llama for RMSNorm, llm360 "
             "for LayerNorm; import: from config.json's architectures)", default="auto",
             choices=("auto",) + registry.NAMES),
    cli.Flag("max_shard_size", "export: largest safetensors file before sharding",
             default=DEFAULT_SHARD),
    cli.Flag("tokenizer", "export: the sentencepiece model to ship (default: the run's "
             "WORKDIR/data/tokenizer.model)"),
)


def _main(a):
    if a.action == "export":
        if a.config_file or a.overrides:
            raise UsageError("--config: export uses the checkpoint's own config")
        r = export(a.source, a.out, a.layout, a.tokenizer, parse_size(a.max_shard_size))
        print(f"crystal.interop.hf: wrote {r['out']}: step {r['step']}, {r['layout']} layout "
              f"({r['architecture']}), {len(r['files'])} files, {r['bytes'] / 1e6:.1f} MB of "
              f"float32 weights, round trip {'bitwise' if r['exact'] else 'to 1 ulp'}"
              + ("" if r["tokenizer"] else "; no tokenizer found (pass --tokenizer)"))
        return 0
    if a.tokenizer or "max_shard_size" in a.given:
        raise UsageError("--tokenizer/--max_shard_size: export only")
    r = import_(a.source, a.out, a.layout, a.cfg, a.overrides)
    print(f"crystal.interop.hf: wrote {r['checkpoint']} ({r['layout']} layout) and "
          f"{r['config']}\n  continue training: python -m crystal.train "
          f"--config={r['config']} --init_from={r['out']} --workdir=runs/{r['name']}")
    return 0


HELP = """Crystal checkpoints to Hugging Face folders and back (docs/interop.md).

  export CHECKPOINT OUT   the checkpoint's params and its own config (no --config)
  import HF_DIR OUT       OUT/checkpoints/0 + OUT/crystal_config.json; --config is the base
                          for what config.json does not say (default: the folder's
                          crystal_config.json, else configs/crystalcoder_7b.py or amber_7b.py)"""


def main(argv=None):
    return cli.run(_main, doc=HELP, flags=FLAGS,
                   config=cli.CONFIG_OPTIONAL, argv=argv, prog="python -m crystal.interop.hf")


if __name__ == "__main__":
    raise SystemExit(main())
