"""Hugging Face interop of mixture-of-experts (E / "moe") layers, against transformers' own
NemotronH MoE (the independent oracle), in two launches (WORKDIR holds everything):

  par (2 processes): rank 0 builds one small random transformers NemotronHForCausalLM per
                     router option (VARIANTS: layers mamba, moe, attention, moe, mlp; 8
                     experts; random router weights and e_score_correction_bias so routing
                     is non-trivial), saves it with save_pretrained and its logits. Then every
                     variant is imported (run_import_hf) at TP=1 EP=1 (DP=2) and EP=2, some at
                     TP=2; a model built from each imported checkpoint gives its logits. The
                     EP=2 import of the base variant is also loaded at TP=1 EP=1 (another
                     layout than it was saved at).
  exp (1 process):   export-hf of every EP=2 import; transformers from_pretrained logits; the
                     exported tensors against the original folder's; an MTP folder (faked:
                     mtp.* tensors added, num_nextn_predict_layers=1) refused without
                     drop_mtp and imported with it.

tests/dist/test_moe_hf_dist.py asserts on the files written here.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist.hf_models import randomize  # noqa: E402
from tests.dist.hf_worker import gathered_logits, hf_logits, tokens  # noqa: E402  (vocab 256, 2 x 40)

BASE = dict(
    vocab_size=256, hidden_size=64,
    layers_block_type=["linear_attention", "moe", "full_attention", "moe", "mlp"],
    intermediate_size=96, mlp_hidden_act="relu2", num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
    chunk_size=16, max_position_embeddings=64, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
    n_routed_experts=8, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48,
    n_shared_experts=1, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=1.0,
    n_group=1, topk_group=1, moe_latent_size=None,
)
# one folder per router option (top-k 2 with a shared expert is the base)
VARIANTS = {
    "shared_top2": {},
    "no_shared": {"n_shared_experts": 0},  # transformers still builds the shared MLP: zeroed
    "grouped": {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 4},
    "latent": {"moe_latent_size": 24},
    "top1": {"num_experts_per_tok": 1, "norm_topk_prob": False},
    "top6": {"num_experts_per_tok": 6},
    "scaled": {"routed_scaling_factor": 2.5},
}
# layouts of the 2-process world (TP=2 x EP=2 needs 4; its slicing is unit-tested)
LAYOUTS = {"tp1": dict(tp=1, ep=1), "ep2": dict(tp=1, ep=2), "tp2": dict(tp=2, ep=1)}
TP2_VARIANTS = ("shared_top2", "latent", "grouped")


def make_one(wd: Path, name: str) -> dict:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from megatron_minitron.hf.mapping import EXPORT_TIME_STEP_MIN

    cfg = NemotronHConfig(**{**BASE, **VARIANTS[name]}, time_step_min=EXPORT_TIME_STEP_MIN)
    torch.manual_seed(0)
    model = NemotronHForCausalLM(cfg).float()
    randomize(model, dt_bias_mean=-2.0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for mname, mod in model.named_modules():
            if mname.endswith("mixer.gate"):  # a buffer: randomize only sees parameters
                mod.e_score_correction_bias.copy_(0.1 * torch.randn(mod.e_score_correction_bias.shape, generator=g))
            if mname.endswith("shared_experts") and not cfg.n_shared_experts:
                for p in mod.parameters():
                    p.zero_()
    model.save_pretrained(wd / name / "hf")
    torch.save(hf_logits(model), wd / name / "logits_hf.pt")
    return routing_stats(model, cfg)


def routing_stats(model, cfg) -> dict:
    """How non-trivial the routing is: experts chosen at least once, and tokens whose top-k set
    the correction bias changes (from the router logits transformers records)."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=tokens(), output_router_logits=True)
    used, changed, grouped, total = set(), 0, 0, 0
    k, ng = cfg.num_experts_per_tok, cfg.n_group
    gates = [m for n, m in model.named_modules() if n.endswith("mixer.gate")]
    for logits, gate in zip(out.router_logits, gates):
        s = logits.float().sigmoid()
        b = s + gate.e_score_correction_bias
        choice = b.topk(k, dim=-1)[1].sort(-1)[0]
        used |= set(choice.flatten().tolist())
        changed += int((choice != s.topk(k, dim=-1)[1].sort(-1)[0]).any(-1).sum())
        if ng > 1:  # tokens whose choice the group limit changes (groups: sum of their top 2)
            top_groups = b.view(-1, ng, 8 // ng).topk(2, dim=-1)[0].sum(-1).topk(cfg.topk_group, dim=-1)[1]
            mask = torch.zeros(b.shape[0], ng, dtype=torch.bool).scatter_(1, top_groups, True)
            limited = b.masked_fill(~mask.repeat_interleave(8 // ng, dim=1), float("-inf"))
            grouped += int((limited.topk(k, dim=-1)[1].sort(-1)[0] != choice).any(-1).sum())
        total += s.shape[0]
    return {"experts_used": len(used), "bias_changed_tokens": changed, "group_changed_tokens": grouped,
            "tokens": total}


def par(wd: Path):
    from megatron_minitron import dist as D
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.hf.stage import ImportHFConfig, run_import_hf
    from megatron_minitron.model import build_model
    from megatron_minitron.train import checkpoint as ckpt

    D.init(ParallelConfig(), seed=1)
    if dist.get_rank() == 0:
        stats = {}
        for name in VARIANTS:
            (wd / name).mkdir(parents=True, exist_ok=True)
            stats[name] = make_one(wd, name)
        (wd / "result_make.json").write_text(json.dumps(stats, indent=2))
    D.barrier()

    def logits_of(run: Path, layout: dict, out: Path):
        p = D.init(ParallelConfig(**layout), seed=1)
        m = build_model(ckpt.read_model_config(run), p)
        ckpt.load_model_weights(run, m)
        lg = gathered_logits(m, p)
        if dist.get_rank() == 0:
            torch.save(lg, out)

    for name in VARIANTS:
        for lay, layout in LAYOUTS.items():
            if lay == "tp2" and name not in TP2_VARIANTS:
                continue
            run = wd / name / f"imp_{lay}"
            run_import_hf(ImportHFConfig(hf_dir=str(wd / name / "hf"), output_dir=str(run),
                                         parallel=ParallelConfig(**layout)), shutdown=False)
            logits_of(run, layout, wd / name / f"logits_imp_{lay}.pt")
    # saved at EP=2, loaded at TP=1 EP=1 and at TP=2
    for lay in ("tp1", "tp2"):
        logits_of(wd / "shared_top2" / "imp_ep2", LAYOUTS[lay], wd / "shared_top2" / f"logits_ep2_as_{lay}.pt")
    D.shutdown()


def exp(wd: Path):
    from transformers import AutoModelForCausalLM

    from megatron_minitron.config import ConfigError
    from megatron_minitron.hf.stage import ExportHFConfig, HFFolder, ImportHFConfig, run_export_hf, run_import_hf

    res = {}
    for name in VARIANTS:
        out = wd / name / "exp"
        run_export_hf(ExportHFConfig(checkpoint=str(wd / name / "imp_ep2"), output_dir=str(out), dtype="fp32",
                                     tokenizer="none"), shutdown=False)
        hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        torch.save(hf_logits(hf.float()), wd / name / "logits_exp.pt")
        a, b = HFFolder(wd / name / "hf"), HFFolder(out)
        same = [k for k in a.weight_map if k in b.weight_map and a.shape(k) == b.shape(k)]
        cfg = json.loads((out / "config.json").read_text())
        res[name] = {
            "loading_info": {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v},
            "only_in_hf": sorted(set(a.weight_map) - set(same)),
            "only_in_export": sorted(set(b.weight_map) - set(same)),
            "max_abs_diff_tensors": max((a.get(k) - b.get(k)).abs().max().item() for k in same),
            "bias_dtype": str(b.get("backbone.layers.1.mixer.gate.e_score_correction_bias").dtype),
            "config": {k: cfg.get(k) for k in ("layers_block_type", "n_routed_experts", "num_experts_per_tok",
                                               "n_shared_experts", "moe_shared_expert_intermediate_size",
                                               "moe_latent_size", "routed_scaling_factor", "n_group",
                                               "topk_group", "norm_topk_prob", "num_nextn_predict_layers")},
        }
    # a folder with multi-token-prediction layers (as NVIDIA's Nemotron 3 releases): faked
    from safetensors.torch import load_file, save_file

    mtp = wd / "mtp_hf"
    shutil.copytree(wd / "shared_top2" / "hf", mtp)
    t = load_file(mtp / "model.safetensors")
    for k in [k for k in t if k.startswith("backbone.layers.1.")]:  # an E layer's tensors
        t["mtp.layers.0." + k[len("backbone.layers.1."):]] = t[k].clone()
    save_file(t, mtp / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((mtp / "config.json").read_text())
    c.update(num_nextn_predict_layers=1, mtp_layers_block_type=["moe"])
    (mtp / "config.json").write_text(json.dumps(c))
    try:
        run_import_hf(ImportHFConfig(hf_dir=str(mtp), output_dir=str(wd / "mtp_refused")), shutdown=False)
        res["mtp_refusal"] = None
    except ConfigError as err:
        res["mtp_refusal"] = str(err)
    s = run_import_hf(ImportHFConfig(hf_dir=str(mtp), output_dir=str(wd / "mtp_imp"), drop_mtp=True), shutdown=False)
    res["mtp_summary"] = {"dropped_mtp": s["dropped_mtp"], "notes": s["notes"],
                          "file": json.loads((wd / "mtp_imp" / "summary.json").read_text())["dropped_mtp"]}
    res["mtp_refused_wrote_nothing"] = not (wd / "mtp_refused").exists()
    (wd / "result_exp.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    {"par": par, "exp": exp}[phase](workdir)
