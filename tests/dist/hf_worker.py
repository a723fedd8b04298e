"""Hugging Face interop checks, in three launches (WORKDIR holds everything):

  make (1 process):   a small random transformers NemotronHForCausalLM (M, * and - layers,
                      2 Mamba groups), saved sharded with save_pretrained + our tokenizer;
                      its logits on fixed tokens (time_step_min 0.001, as NVIDIA's releases,
                      and no dt clamp; and with a clamp time_step_limit=(0.001, inf), to show
                      that time_step_min would bind were it a clamp).
  par  (2 processes): import-hf at TP=1 (DP=2) and TP=2: megatron logits. A "pruned-like"
                      model of ours (6 Mamba heads of dim 12, odd FFN, random weights incl.
                      norms, D, dt_bias) saved at TP=2, and its logits.
  exp  (1 process):   export-hf of the pruned-like checkpoint (fp32, several shards) and of
                      the TP=2 import; transformers from_pretrained logits; import of the
                      pruned export back; tensors compared bit for bit; a bf16 export.

tests/dist/test_hf_dist.py asserts on the files written here.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist.hf_models import eval_logits, fixed_tokens, randomize  # noqa: E402

SEQ, BATCH = 40, 2  # 40 is not a multiple of the chunk size (16): the padded path runs


def hf_config(time_step_limit=(0.0, float("inf"))):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=256, hidden_size=64, layers_block_type=["linear_attention", "full_attention",
                                                           "linear_attention", "mlp",
                                                           "linear_attention", "full_attention",
                                                           "linear_attention", "mlp"],
        intermediate_size=96, mlp_hidden_act="relu2", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8,
        conv_kernel=4, chunk_size=16, max_position_embeddings=64, layer_norm_epsilon=1e-5,
        time_step_min=0.001, time_step_limit=time_step_limit, tie_word_embeddings=False, pad_token_id=1, eos_token_id=0,
        bos_token_id=None,
    )


def tokens():
    return fixed_tokens(256, BATCH, SEQ, seed=7)


def hf_logits(model):
    return eval_logits(model, tokens())


def make(wd: Path):
    from transformers import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(hf_config()).float()
    randomize(model, dt_bias_mean=-4.0, dt_bias_std=2.0)  # wide: some heads have dt below 0.001
    model.save_pretrained(wd / "hf", max_shard_size="60KB")
    info = json.loads((wd / "data.json").read_text())
    shutil.copy2(info["tokenizer"], wd / "hf" / "tokenizer.json")
    (wd / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<pad>"}))
    torch.save(hf_logits(model), wd / "logits_hf.pt")
    # the same weights with dt clamped at time_step_min (what transformers <= 5.24 did)
    m2 = NemotronHForCausalLM(hf_config((0.001, float("inf")))).float()
    m2.load_state_dict(model.state_dict())
    torch.save(hf_logits(m2), wd / "logits_hf_clamp.pt")
    n_files = len(list((wd / "hf").glob("*.safetensors")))
    (wd / "result_make.json").write_text(json.dumps({"hf_shards": n_files}))


def gathered_logits(model, par):
    from megatron_minitron.model import causal_mask

    model.eval()
    t = tokens()
    pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    with torch.no_grad():
        local = model(t, pos, causal_mask(SEQ))
    if par.tp > 1:
        parts = [torch.empty_like(local) for _ in range(par.tp)]
        dist.all_gather(parts, local.contiguous(), group=par.pg.tp)
        local = torch.cat(parts, dim=-1)
    return local.float()


PRUNED = dict(pattern="M*M-M-", hidden_size=64, ffn_hidden_size=74, mamba_num_heads=6,
              mamba_head_dim=12, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
              num_attention_heads=2, num_query_groups=2, kv_channels=24, vocab_size=256,
              seq_length=64, position_embedding="none")


def par(wd: Path):
    from megatron_minitron import dist as D
    from megatron_minitron.config import ModelConfig, ParallelConfig
    from megatron_minitron.hf.stage import ImportHFConfig, run_import_hf
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    # PP=2: checked through its export (tests compare the re-exported tensors bit for bit)
    run_import_hf(ImportHFConfig(hf_dir=str(wd / "hf"), output_dir=str(wd / "imp_pp2"),
                                 parallel=ParallelConfig(pp=2)), shutdown=False)
    for tp in (1, 2):
        run_import_hf(ImportHFConfig(hf_dir=str(wd / "hf"), output_dir=str(wd / f"imp_tp{tp}"),
                                     parallel=ParallelConfig(tp=tp)), shutdown=False)
        p = D.init(ParallelConfig(tp=tp), seed=1)
        cfg = ckpt.read_model_config(wd / f"imp_tp{tp}")
        m = build_model(cfg, p)
        ckpt.load_model_weights(wd / f"imp_tp{tp}", m)
        lg = gathered_logits(m, p)
        if dist.get_rank() == 0:
            torch.save(lg, wd / f"logits_imp_tp{tp}.pt")
    # a pruned-like checkpoint of ours, written at TP=2
    cfg = ModelConfig(**PRUNED)
    p = D.init(ParallelConfig(tp=2), seed=3)
    m = build_model(cfg, p)
    g = torch.Generator().manual_seed(100 + p.tp_rank)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if name.endswith("A_log"):
                prm.copy_(torch.log(torch.rand(prm.shape, generator=g) * 4 + 0.5))
            elif name.endswith("dt_bias"):
                prm.copy_(torch.randn(prm.shape, generator=g) - 2.0)
            elif prm.dim() == 1:
                prm.copy_(1.0 + 0.3 * torch.randn(prm.shape, generator=g))
            else:
                prm.add_(0.1 * torch.randn(prm.shape, generator=g))
    # replicated params (layer norms) must agree across TP ranks
    for prm in m.parameters():
        if not getattr(prm, "tensor_model_parallel", False):
            dist.broadcast(prm.data, src=0)
    ckpt.save(wd / "pruned", 1, cfg, {"model": m.sharded_state_dict()}, {"tp": 2, "pp": 1})
    lg = gathered_logits(m, p)
    if dist.get_rank() == 0:
        torch.save(lg, wd / "logits_pruned.pt")
    D.shutdown()


def exp(wd: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.hf.stage import (CheckpointReader, ExportHFConfig, ImportHFConfig,
                                            run_export_hf, run_import_hf)
    from megatron_minitron.train import checkpoint as ckpt

    res = {}
    s = run_export_hf(ExportHFConfig(checkpoint=str(wd / "pruned"), output_dir=str(wd / "exp_pruned"),
                                     dtype="fp32", max_shard_size="50KB",
                                     tokenizer=json.loads((wd / "data.json").read_text())["tokenizer"]), shutdown=False)
    res["pruned_shards"] = s["shards"]
    hf = AutoModelForCausalLM.from_pretrained(wd / "exp_pruned")
    res["pruned_hf_class"] = type(hf).__name__
    res["pruned_hf_dtype"] = str(next(hf.parameters()).dtype)
    torch.save(hf_logits(hf), wd / "logits_exp_pruned.pt")
    tok = AutoTokenizer.from_pretrained(wd / "exp_pruned")
    res["tokenizer"] = {"class": type(tok).__name__, "eos": tok.eos_token, "pad": tok.pad_token,
                        "ids": tok("To be, or not to be")["input_ids"]}
    from megatron_minitron.data import Tokenizer

    res["tokenizer"]["ours"] = Tokenizer(json.loads((wd / "data.json").read_text())["tokenizer"]).tokenize(
        "To be, or not to be")
    # export of the TP=2 and PP=2 imports: must give back the original HF tensors bit for bit
    from megatron_minitron.hf.stage import HFFolder

    for lay in ("tp2", "pp2"):
        run_export_hf(ExportHFConfig(checkpoint=str(wd / f"imp_{lay}"), output_dir=str(wd / f"exp_imp_{lay}"),
                                     dtype="fp32", max_shard_size="1GB"), shutdown=False)
        a, b = HFFolder(wd / "hf"), HFFolder(wd / f"exp_imp_{lay}")
        res[f"reexport_{lay}_same_names"] = sorted(a.weight_map) == sorted(b.weight_map)
        res[f"reexport_{lay}_max_abs_diff"] = max((a.get(k) - b.get(k)).abs().max().item()
                                                  for k in a.weight_map)
        res[f"reexport_{lay}_tokenizer_files"] = sorted(p.name for p in (wd / f"exp_imp_{lay}").glob("tokenizer*"))
    # import of the pruned export round-trips bit-exactly (checkpoint tensor by tensor)
    run_import_hf(ImportHFConfig(hf_dir=str(wd / "exp_pruned"), output_dir=str(wd / "reimp"),
                                 parallel=ParallelConfig(tp=1)), shutdown=False)
    r0, r1 = CheckpointReader(ckpt.require(wd / "pruned")), CheckpointReader(ckpt.require(wd / "reimp"))
    res["roundtrip_same_keys"] = sorted(r0.meta) == sorted(r1.meta)
    keys = sorted(r0.meta)
    t0, t1 = r0.load(keys), r1.load(keys)
    res["roundtrip_max_abs_diff"] = max((t0[k] - t1[k]).abs().max().item() for k in keys)
    res["roundtrip_config_equal"] = (ckpt.read_model_config(wd / "pruned").to_dict()
                                     == ckpt.read_model_config(wd / "reimp").to_dict())
    # bf16 export loads as bf16
    run_export_hf(ExportHFConfig(checkpoint=str(wd / "pruned"), output_dir=str(wd / "exp_bf16"),
                                 dtype="bf16", tokenizer="none"), shutdown=False)
    hb = AutoModelForCausalLM.from_pretrained(wd / "exp_bf16")
    res["bf16_dtype"] = str(next(hb.parameters()).dtype)
    torch.save(hf_logits(hb), wd / "logits_exp_bf16.pt")
    (wd / "result_exp.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    {"make": make, "par": par, "exp": exp}[phase](workdir)
