"""`import-hf` and `export-hf` stages: Hugging Face Nemotron-H folders <-> our checkpoints.

import-hf (torchrun at any TP/PP/EP): every rank builds its own shard of the megatron model,
then walks its layers one at a time: it reads that layer's tensors from the safetensors
shards (only the files that hold them), converts them to the checkpoint's global layout
(mapping.hf_to_ours; routed experts stacked [E, ...]), cuts out this rank's TP slice (and
its EP ranks' experts) and copies it in, parameters and persistent buffers (the MoE
routers' expert_bias) alike. Memory: the rank's model shard plus one layer's full tensors. The result is saved with train/checkpoint.save
(model_config.json included); tokenizer files go to <output_dir>/tokenizer/.

export-hf (one process, no model built): reads the checkpoint's metadata, then loads one
unit (embedding, a layer, final norm + output layer) at a time as full global tensors via
megatron's dist_checkpointing (it re-assembles whatever TP/PP layout the checkpoint was
saved at), converts it (mapping.ours_to_hf) and appends it to the current safetensors shard,
which is written when the next unit would overflow max_shard_size. Memory: at most one
shard (or one unit when a unit is larger).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch

from .. import dist as D
from ..config import ConfigError, ModelConfig, ParallelConfig
from . import mapping as M

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")
HF_DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"),
             "fp16": (torch.float16, "float16")}


@dataclass
class ImportHFConfig:
    hf_dir: str = ""  # a folder written by NemotronHForCausalLM.save_pretrained
    output_dir: str = "runs/imported"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    params_dtype: str = "fp32"  # fp32 | bf16: dtype of the megatron parameters
    # config.json time_step_limit [min, max] clamps Mamba dt in transformers (>= 5.25) and in
    # mamba_ssm's kernels; the import keeps that clamp (model.mamba_dt_clamp_min / max).
    # true = drop it: the model computes the unclamped function of megatron-core's mixer.
    # ([0.0, Infinity], as in NVIDIA's releases, is no clamp; time_step_min is init only.)
    ignore_time_step_limit: bool = False
    seq_length: int = 0  # 0: config.json max_position_embeddings
    # multi-token-prediction layers (config.json num_nextn_predict_layers > 0, mtp.* tensors):
    # megatron-core 0.16's hybrid model has none, so a folder with them is refused unless
    # drop_mtp=true, which imports the main model without them (summary.json says so)
    drop_mtp: bool = False

    # keys of earlier versions, refused with what replaced them (config.build)
    REMOVED_KEYS: ClassVar[dict] = {
        "ignore_time_step_min": (
            "use ignore_time_step_limit. The Mamba dt clamp is now config.json time_step_limit, "
            "as in transformers >= 5.25 and mamba_ssm's kernels; time_step_min only sets the "
            "dt_bias init and no longer clamps (transformers <= 5.24's CPU path clamped at it). "
            "ignore_time_step_limit=true drops a clamp that time_step_limit asks for "
            "([0.0, Infinity], as in NVIDIA's releases, asks for none)"),
    }


@dataclass
class ExportHFConfig:
    checkpoint: str = "runs/pruned"  # run dir or iteration folder of ours (any TP/PP layout)
    output_dir: str = "runs/export_hf"
    dtype: str = "bf16"  # bf16 | fp32 | fp16 (tensors written)
    max_shard_size: str = "5GB"  # safetensors shard size; several shards -> index json
    # tokenizer: "auto" = <run>/tokenizer/ (written by import-hf), else data/default/tokenizer.json;
    # a tokenizer.json path or a folder of tokenizer files; "none" = write no tokenizer.
    tokenizer: str = "auto"
    overwrite: bool = False


# ----------------------------------------------------------------------------- reading HF


class HFFolder:
    """Tensor access to an HF folder: model.safetensors or sharded with an index json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"hf_dir={str(path)!r} has no config.json; give a folder written "
                              "by save_pretrained")
        self.config = json.loads((self.path / "config.json").read_text())
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(f"hf_dir={str(path)!r} has neither model.safetensors nor "
                              "model.safetensors.index.json (only safetensors folders are supported)")
        missing = sorted({f for f in self.weight_map.values() if not (self.path / f).is_file()})
        if missing:
            raise ConfigError(f"hf_dir={str(path)!r}: shard file(s) {missing} listed in "
                              "model.safetensors.index.json are missing; copy the complete folder")
        self._open: dict = {}

    def get(self, name: str) -> Optional[torch.Tensor]:
        found = self._locate(name)
        return None if found is None else found[0].get_tensor(found[1])

    def shape(self, name: str) -> Optional[tuple]:
        """Shape from the safetensors header (no tensor data is read)."""
        found = self._locate(name)
        return None if found is None else tuple(found[0].get_slice(found[1]).get_shape())

    def _locate(self, name: str):
        """(open safetensors shard, stored name) holding `name`, or None. NVIDIA's and
        transformers' files store `backbone.*`; `model.*` is the in-memory naming."""
        fname = self.weight_map.get(name)
        if fname is None and name.startswith("backbone."):
            name = "model." + name[len("backbone."):]
            fname = self.weight_map.get(name)
        if fname is None:
            return None
        if fname not in self._open:
            from safetensors import safe_open

            self._open[fname] = safe_open(str(self.path / fname), "pt")
        return self._open[fname], name

    def check_shapes(self, mcfg: ModelConfig) -> None:
        """Every tensor the model needs is present with the shape config.json implies; the
        tensors our model has no place for are zero (hf_zero_tensors) or MTP (checked by the
        caller); anything else in the folder is refused rather than dropped."""
        used = set()
        for unit in M.layer_units(mcfg):
            for name, shape in M.expected_hf_shapes(mcfg, unit).items():
                used.add(name)
                got = self.shape(name)
                if got is None and not M.hf_optional(name):
                    raise M.HFMappingError(f"tensor {name} is missing from hf_dir={str(self.path)!r} "
                                           f"(expected shape {list(shape)})")
                if got is not None and got != tuple(shape):
                    raise M.HFMappingError(
                        f"tensor {name} in hf_dir={str(self.path)!r} has shape {list(got)} but "
                        f"config.json implies {list(shape)}; the folder's config.json and weights disagree")
            for name in M.hf_zero_tensors(mcfg, unit):
                used.add(name)
                x = self.get(name)
                if x is not None and x.count_nonzero():
                    raise M.HFMappingError(
                        f"config.json n_shared_experts=0 but tensor {name} in hf_dir={str(self.path)!r} "
                        "is not zero: transformers' NemotronH ignores n_shared_experts and applies the "
                        "shared MLP; set n_shared_experts=1 (and moe_shared_expert_intermediate_size) "
                        "to import it")
        if not mcfg.untie_embeddings:
            used.add("lm_head.weight")  # tied: transformers ties it to the embedding whatever is stored
        stored = {"backbone." + n[len("model."):] if n.startswith("model.") else n for n in self.weight_map}
        extra = sorted(n for n in stored - used if not M.is_mtp(n))
        if extra:
            raise M.HFMappingError(
                f"hf_dir={str(self.path)!r} has {len(extra)} tensor(s) that config.json gives no place "
                f"in the model, e.g. {extra[:4]}; refusing to drop them (the folder's config.json and "
                "weights disagree)")

    def close(self):
        self._open.clear()


# ----------------------------------------------------------------------------- import


def validate_import_settings(cfg: ImportHFConfig) -> None:
    """Settings errors, no file read (the run, --dry-run and --print-config)."""
    if not cfg.hf_dir:
        raise ConfigError("hf_dir is empty; give the Hugging Face model folder, e.g. hf_dir=/models/nemotron-h-8b")
    if cfg.params_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"params_dtype={cfg.params_dtype!r}: use fp32 or bf16")
    cfg.parallel.validate()


def _check_import(cfg: ImportHFConfig) -> tuple[HFFolder, ModelConfig]:
    validate_import_settings(cfg)
    folder = HFFolder(cfg.hf_dir)
    model_cfg = M.model_config_from_hf(folder.config, cfg.params_dtype, cfg.ignore_time_step_limit)
    if cfg.seq_length:
        model_cfg.seq_length = cfg.seq_length
    par = cfg.parallel
    if par.ep > 1 and not model_cfg.is_moe:
        raise ConfigError(f"parallel.ep={par.ep} splits mixture-of-experts layers, but hf_dir's "
                          f"pattern {model_cfg.pattern!r} has none; use parallel.ep=1")
    model_cfg.validate(par.tp, par.pp, ep=par.ep)
    n_mtp, n_mtp_tensors = M.mtp_layers(folder.config, folder.weight_map)
    if n_mtp and not cfg.drop_mtp:
        raise ConfigError(
            f"hf_dir={cfg.hf_dir!r} has {n_mtp} multi-token-prediction layer(s) (config.json "
            f"num_nextn_predict_layers={folder.config.get('num_nextn_predict_layers', 0)}, "
            f"{n_mtp_tensors} mtp.* tensors): megatron-core 0.16's hybrid model has no MTP, so they "
            "cannot be imported. Set drop_mtp=true to import the main model without them (the "
            "checkpoint then predicts the next token only; summary.json records the drop)")
    # headers only (plus the tensors that must be zero): fails before any model is built
    folder.check_shapes(model_cfg)
    return folder, model_cfg


def run_import_hf(cfg: ImportHFConfig, shutdown: bool = True) -> dict:
    from ..train import checkpoint as ckpt
    from ..model import build_model, count_parameters

    folder, mcfg = _check_import(cfg)  # every user error before any model is built
    t0 = time.time()
    par = D.init(cfg.parallel, seed=1234)
    model = build_model(mcfg, par, initialize=False)  # every parameter is filled next (checked)
    fill_from_hf(model, mcfg, par, folder.get, log=D.print0)
    folder.close()
    out = Path(cfg.output_dir)
    meta = {"tp": par.tp, "pp": par.pp, "ep": par.ep, "source": "import-hf",
            "hf_dir": str(Path(cfg.hf_dir).resolve()), "hf_time_step_limit": folder.config.get("time_step_limit")}
    n_mtp, n_mtp_tensors = M.mtp_layers(folder.config, folder.weight_map)
    if n_mtp:
        meta["dropped_mtp_layers"] = n_mtp
    it = ckpt.save(out, 0, mcfg, {"model": model.sharded_state_dict()}, meta)
    summary = {}
    if D.is_rank0():
        tok = _copy_tokenizer(Path(cfg.hf_dir), out / "tokenizer")
        summary = {
            "stage": "import-hf", "hf_dir": str(Path(cfg.hf_dir).resolve()), "checkpoint": str(it),
            "model": mcfg.to_dict(), "parameters": count_parameters(mcfg)["total"],
            "tp": par.tp, "pp": par.pp, "ep": par.ep, "tokenizer_files": tok,
            "seconds": round(time.time() - t0, 2),
            "dropped_mtp": {"layers": n_mtp, "tensors": n_mtp_tensors} if n_mtp else None,
            "notes": _import_notes(folder.config, mcfg, (n_mtp, n_mtp_tensors)),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        D.print0(f"[import-hf] {cfg.hf_dir} -> {it} ({summary['parameters']:,} parameters, "
                 f"pattern {mcfg.pattern}, TP={par.tp} PP={par.pp} EP={par.ep}); tokenizer: {tok or 'none found'}")
        for n in summary["notes"]:
            D.print0(f"[import-hf] note: {n}")
    D.barrier()
    if shutdown:
        D.shutdown()
    return summary


def _import_notes(hf: dict, mcfg: ModelConfig, mtp: tuple[int, int] = (0, 0)) -> list[str]:
    notes = []
    if "M" in M.hf_pattern(hf):
        lim = M.hf_dt_limit(hf)
        if lim != (0.0, float("inf")) and (mcfg.mamba_dt_clamp_min or mcfg.mamba_dt_clamp_max):
            notes.append(f"Mamba dt clamped to time_step_limit={list(lim)} as in transformers and "
                         f"mamba_ssm's kernels (model.mamba_dt_clamp_min={mcfg.mamba_dt_clamp_min}, "
                         f"mamba_dt_clamp_max={mcfg.mamba_dt_clamp_max}; 0 = no bound)")
        elif lim != (0.0, float("inf")):
            notes.append(f"config.json time_step_limit={list(lim)} clamps Mamba dt in transformers; "
                         "dropped (ignore_time_step_limit=true): the model computes the unclamped "
                         "function")
        tmin = float(hf.get("time_step_min") or 0.0)
        if tmin > M.EXPORT_TIME_STEP_MIN and tmin != lim[0]:
            notes.append(f"config.json time_step_min={tmin} only sets the dt_bias init: not a dt "
                         "clamp (transformers >= 5.25, mamba_ssm's kernels; transformers <= 5.24's "
                         "CPU path clamped at it)")
    if mtp[0]:
        notes.append(f"dropped {mtp[0]} multi-token-prediction layer(s) ({mtp[1]} mtp.* tensors; "
                     "drop_mtp=true): megatron-core 0.16's hybrid model has no MTP; the checkpoint "
                     "predicts the next token only, as transformers' NemotronH does")
    if "E" in mcfg.pattern and not int(hf.get("n_shared_experts", 1) or 0):
        notes.append("config.json n_shared_experts=0: imported without a shared expert (its "
                     "shared_experts tensors, which transformers applies regardless, are zero)")
    return notes


def fill_from_hf(model, mcfg: ModelConfig, par, get, log=None) -> None:
    """Copy HF tensors (fetched by name with `get`) into this rank's model shard, one unit
    (layer) at a time: every parameter and every persistent buffer (the MoE routers'
    expert_bias, which named_parameters does not list). Works at any TP/PP/EP: local layer j
    is global layer mcfg.layer_offset(pp, pp_rank) + j; local expert le of EP rank r is
    expert r * E/ep + le."""
    offset = mcfg.layer_offset(par.pp, par.pp_rank)
    by_unit: dict = {}
    for name, p in list(model.named_parameters()) + persistent_buffers(model):
        key = M.global_key_of_param(name, offset, mcfg.pattern)
        key, expert = M.expert_of_key(key, mcfg.num_moe_experts, par.ep, par.ep_rank)
        if key == "output_layer.weight" and not mcfg.untie_embeddings:
            key = "embedding.word_embeddings.weight"  # tied: the last stage's copy
        by_unit.setdefault(M.unit_of_key(key), []).append((key, expert, p))
    units = [u for u in M.layer_units(mcfg) if u in by_unit]
    left = sorted(k for u in set(by_unit) - set(units) for k, _, _ in by_unit[u])
    if left:  # the model was built uninitialised: an unfilled parameter would be garbage
        raise M.HFMappingError(f"internal: no Hugging Face source for parameters {left}")
    from ..train.engine import Progress

    prog = Progress(len(units), 0, D.is_rank0(), "import-hf")
    for n, unit in enumerate(units):
        tensors = M.hf_to_ours(mcfg, unit, get)
        if unit[0] == "final" and not mcfg.untie_embeddings and any(
                k == "embedding.word_embeddings.weight" for k, _, _ in by_unit[unit]):
            tensors.update(M.hf_to_ours(mcfg, ("embedding", -1), get))
        for key, expert, p in by_unit[unit]:
            if key not in tensors and M.fused_parts(key) is None:
                raise M.HFMappingError(f"internal: no Hugging Face source for {key} (unit {unit})")
            # routed experts: TP over the expert-TP group, whose size and rank are the TP
            # ones (megatron's default expert_tensor_parallel_size = tp; dist.init sets no other)
            local = M.local_from_global(key, tensors, par.tp, par.tp_rank,
                                        _tp_dim(key, p, tensors, par.tp, expert), expert)
            if tuple(local.shape) != tuple(p.shape):
                raise M.HFMappingError(f"{key}: converted slice has shape {list(local.shape)}, the "
                                       f"model's parameter {list(p.shape)} (tp_rank {par.tp_rank}, "
                                       f"expert {expert})")
            with torch.no_grad():
                p.copy_(local)
        del tensors
        prog.update(n + 1, {"unit": f"{unit[0]}{'' if unit[1] < 0 else unit[1]}"})
    prog.close()


def persistent_buffers(model) -> list:
    """(name, buffer) of the buffers a state dict holds (not the non-persistent ones, such as
    the routers' local_tokens_per_expert counters, which start at zero)."""
    out = []
    for mname, mod in model.named_modules():
        for bname, buf in mod._buffers.items():
            if buf is not None and bname not in mod._non_persistent_buffers_set:
                out.append((f"{mname}.{bname}" if mname else bname, buf))
    return out


def _tp_dim(key: str, p, tensors: dict, tp: int, expert=None):
    """The dim along which parameter `p` is this rank's 1/tp of the global tensor (of its
    row, for a routed expert), None when replicated. From the shapes: megatron sets
    `partition_dim` only when it initialises."""
    if tp == 1 or M.fused_parts(key) is not None:  # fused parts: sliced part by part on dim 0
        return 0
    full = tensors[key].shape if expert is None else tensors[key].shape[1:]
    split = [d for d in range(len(full)) if d < p.dim() and p.shape[d] != full[d]]
    if len(split) == 1 and p.shape[split[0]] * tp == full[split[0]]:
        return split[0]
    return None  # replicated, or a shape mismatch that the caller reports


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    files = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if files:
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(src / f, dst / f)
    return files


# ----------------------------------------------------------------------------- export


def validate_export_settings(cfg: ExportHFConfig) -> int:
    """Settings errors, no file read (the run, --dry-run and --print-config); returns the
    shard size in bytes."""
    if cfg.dtype not in HF_DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r}: use one of {sorted(HF_DTYPES)}")
    max_bytes = M.parse_size(cfg.max_shard_size)
    if max_bytes <= 0:
        raise ConfigError(f"max_shard_size={cfg.max_shard_size!r} must be positive")
    return max_bytes


def _check_export(cfg: ExportHFConfig):
    from ..train import checkpoint as ckpt

    max_bytes = validate_export_settings(cfg)
    it = ckpt.require(cfg.checkpoint)
    mcfg = ckpt.read_model_config(it)
    tok = _tokenizer_source(cfg, it)
    n_tok = _tokenizer_vocab_size(tok)
    if n_tok is not None and n_tok > mcfg.vocab_size:
        msg = (f"tokenizer {tok} has {n_tok} tokens but the model's vocab_size is {mcfg.vocab_size}: "
               "ids past the vocabulary would fail in transformers")
        if cfg.tokenizer == "auto" and tok == Path("data/default/tokenizer.json"):
            # the project's own tokenizer as a last guess: refuse it; anything else: warn
            raise ConfigError(f"{msg}. tokenizer=auto fell back to it: it is not this model's tokenizer; "
                              "give the right one with tokenizer=PATH (e.g. the <run>/tokenizer/ "
                              "folder import-hf wrote) or tokenizer=none")
        D.print0(f"[export-hf] warning: {msg}")
    special = _special_tokens(tok)
    hf_cfg = M.hf_config_from_model(mcfg, HF_DTYPES[cfg.dtype][1], special)  # refusals here
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"output_dir={cfg.output_dir!r} exists and is not empty; set overwrite=true "
                          "or choose another folder")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("export-hf runs in one process (it streams one layer at a time); "
                          "launch it with python, not torchrun")
    return it, mcfg, hf_cfg, tok, max_bytes


def _tokenizer_source(cfg: ExportHFConfig, it: Path) -> Optional[Path]:
    if cfg.tokenizer == "none":
        return None
    if cfg.tokenizer != "auto":
        p = Path(cfg.tokenizer)
        if not p.exists():
            raise ConfigError(f"tokenizer={cfg.tokenizer!r} not found; give a tokenizer.json, a folder "
                              "of tokenizer files, 'auto' or 'none'")
        return p
    for cand in (it.parent.parent / "tokenizer", it / "tokenizer", Path("data/default/tokenizer.json")):
        if cand.exists():
            return cand
    raise ConfigError(f"tokenizer=auto found no tokenizer for {it} (looked in <run>/tokenizer/ and "
                      "data/default/tokenizer.json); set tokenizer=PATH or tokenizer=none")


def _tokenizer_vocab_size(tok: Optional[Path]) -> Optional[int]:
    """Tokens of a tokenizer.json (file or in a folder), added tokens included; None when
    there is none to read (no tokenizer, or a SentencePiece-only folder)."""
    path = None if tok is None else (tok / "tokenizer.json" if tok.is_dir() else tok)
    if path is None or not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:
        raise ConfigError(f"tokenizer {path} is not a readable tokenizer.json ({err})") from None


def _special_tokens(tok: Optional[Path]) -> dict:
    """bos/eos/pad ids and strings from a tokenizer (ours: <|endoftext|> and <pad>)."""
    if tok is None:
        return {}
    path = tok / "tokenizer.json" if tok.is_dir() else tok
    out: dict = {}
    if tok.is_dir() and (tok / "tokenizer_config.json").is_file():
        tc = json.loads((tok / "tokenizer_config.json").read_text())
        for k in ("bos", "eos", "pad"):
            v = tc.get(f"{k}_token")
            out[f"{k}_token"] = v.get("content") if isinstance(v, dict) else v
    else:
        from ..data import EOD_TOKEN, PAD_TOKEN

        out.update(eos_token=EOD_TOKEN, pad_token=PAD_TOKEN, bos_token=None)
    if path.is_file():
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(path))
        for k in ("bos", "eos", "pad"):
            s = out.get(f"{k}_token")
            out[f"{k}_token_id"] = t.token_to_id(s) if s else None
    return out


def _write_tokenizer(tok: Optional[Path], out: Path, special: dict) -> list[str]:
    if tok is None:
        return []
    if tok.is_dir():
        files = _copy_tokenizer(tok, out)
        if "tokenizer_config.json" in files or "tokenizer.json" not in files:
            return files
    else:
        shutil.copy2(tok, out / "tokenizer.json")
        files = ["tokenizer.json"]
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1000000000,
          "clean_up_tokenization_spaces": False}
    for k in ("bos", "eos", "pad"):
        if special.get(f"{k}_token"):
            tc[f"{k}_token"] = special[f"{k}_token"]
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return files + ["tokenizer_config.json"]


class CheckpointReader:
    """Full global tensors of one of our distributed checkpoints, a few keys at a time."""

    def __init__(self, it: Path):
        from ..compat import mcore

        self.it = it
        self.dc = mcore.dist_checkpointing
        self.meta = self.dc.load_tensors_metadata(str(it))

    def load(self, keys: list[str]) -> dict:
        from ..compat.mcore import ShardedTensor

        missing = [k for k in keys if k not in self.meta]
        if missing:
            raise M.HFMappingError(f"checkpoint {self.it} lacks tensors {missing}")
        sd = {k: ShardedTensor.from_rank_offsets(
            k, torch.empty(self.meta[k].global_shape, dtype=self.meta[k].dtype), replica_id=0)
            for k in keys}
        return self.dc.load(sd, str(self.it))


def grouped_mm_note(mcfg, esize: int) -> str | None:
    """transformers' default experts kernel (grouped_mm, on CPU and GPU) refuses expert widths
    whose rows are not a multiple of 16 bytes ('strides should be multiple of 16 bytes'),
    which a pruned MoE model can have (e.g. an expert FFN of 18 in fp32, 20 in bf16); the
    per-expert loop (experts_implementation="eager") runs any width."""
    if not mcfg.is_moe:
        return None
    widths = {"moe_ffn_hidden_size": mcfg.moe_ffn_hidden_size,
              ("moe_latent_size" if mcfg.moe_latent_size else "hidden_size"): mcfg.moe_latent_size or mcfg.hidden_size}
    bad = {k: v for k, v in widths.items() if (v * esize) % 16}
    if not bad:
        return None
    per = 16 // esize if 16 % esize == 0 else 16
    return (f"{', '.join(f'{k}={v}' for k, v in bad.items())} is not a multiple of {per} at {esize} bytes "
            "per element: transformers' default experts kernel (grouped_mm) refuses it; load with "
            "from_pretrained(..., experts_implementation='eager'), or prune to multiples of 8")


def run_export_hf(cfg: ExportHFConfig, shutdown: bool = True) -> dict:
    from safetensors.torch import save_file

    it, mcfg, hf_cfg, tok, max_bytes = _check_export(cfg)
    t0 = time.time()
    D.init(ParallelConfig(), seed=0)  # a world of one: dist_checkpointing needs a process group
    reader = CheckpointReader(it)
    dtype, dtype_name = HF_DTYPES[cfg.dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    units = M.layer_units(mcfg)
    sizes = [(u, sum(M.numel(s) for s in M.exported_hf_shapes(mcfg, u).values()) * esize) for u in units]
    shards = M.shard_plan(sizes, max_bytes)
    out = Path(cfg.output_dir)
    if out.exists() and cfg.overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    from ..train.engine import Progress

    prog = Progress(len(units), 0, True, "export-hf")
    weight_map, total, done = {}, 0, 0
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        buf: dict = {}
        for unit in shard:
            got = reader.load(M.our_keys(mcfg, unit))
            for name, x in M.ours_to_hf(mcfg, unit, got).items():
                fp32 = name.endswith(M.HF_FP32_SUFFIXES)  # the router's correction bias
                buf[name] = x.to(torch.float32 if fp32 else dtype).contiguous()
                weight_map[name] = fname
                total += buf[name].numel() * buf[name].element_size()
            del got
            done += 1
            prog.update(done, {"unit": f"{unit[0]}{'' if unit[1] < 0 else unit[1]}"})
        save_file(buf, str(out / fname), metadata={"format": "pt"})
        del buf
    prog.close()
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    special = _special_tokens(tok)
    tok_files = _write_tokenizer(tok, out, special)
    summary = {"stage": "export-hf", "checkpoint": str(it), "output_dir": str(out.resolve()),
               "dtype": dtype_name, "shards": len(shards), "bytes": total,
               "tensors": len(weight_map), "pattern": mcfg.pattern, "model": mcfg.to_dict(),
               "tokenizer_files": tok_files, "seconds": round(time.time() - t0, 2)}
    note = grouped_mm_note(mcfg, esize)
    if note:
        summary["notes"] = [note]
    (out / "export_summary.json").write_text(json.dumps(summary, indent=2))
    D.print0(f"[export-hf] {it} -> {out} ({len(weight_map)} tensors, {total / 1e6:.1f} MB {dtype_name}, "
             f"{len(shards)} shard(s)); load with transformers.AutoModelForCausalLM.from_pretrained('{out}')"
             + (f"\n[export-hf] note: {note}" if note else ""))
    if shutdown:
        D.shutdown()
    return summary
