"""Faithful Mamba dt clamp through import -> (prune) -> export, against transformers.

  make: a small transformers NemotronHForCausalLM whose dt clamp binds (time_step_limit=
        (0.02, inf), dt_bias low: most heads' softplus(dt) fall below it), saved with a real
        tokenizer; its logits, and the same weights' logits without the clamp (to show it
        binds). The same for an upper clamp: time_step_limit=(0, 0.05), dt_bias high.
  run:  import-hf -> our logits; export-hf -> transformers' logits; a keep-all plan with
        every head / channel / neuron / hidden dimension permuted -> prune -> export-hf ->
        transformers' logits (upper clamp: import and export only). One process, the
        stages' Python entry points.

tests/dist/test_dtclamp_dist.py asserts on the files written here.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.real_tokenizer, tests.dist.hf_models

from tests.dist.hf_models import eval_logits, fixed_tokens, randomize  # noqa: E402

SEQ, BATCH, TMIN, TMAX = 40, 2, 0.02, 0.05


def hf_config(dt_min, dt_max=float("inf")):
    """The test model; its Mamba dt clamp is time_step_limit=(dt_min, dt_max) (transformers
    >= 5.25 and mamba_ssm's kernels; time_step_min is left at its default, an init bound)."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=384, hidden_size=64,
        layers_block_type=["linear_attention", "full_attention", "linear_attention", "mlp", "linear_attention"],
        intermediate_size=96, mlp_hidden_act="relu2", num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=8,
        conv_kernel=4, chunk_size=16, max_position_embeddings=64, layer_norm_epsilon=1e-5,
        time_step_limit=(dt_min, dt_max), tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
        pad_token_id=2)


def tokens():
    return fixed_tokens(384, BATCH, SEQ, seed=7)


def hf_logits(model):
    return eval_logits(model, tokens())


def make(wd: Path):
    from transformers import NemotronHForCausalLM

    from tests.real_tokenizer import make_tokenizer_folder

    for name, limit, dt_bias in (("hf", (TMIN,), -6.0),  # softplus(-6) = 0.0025 < 0.02: binds
                                 ("hf_upper", (0.0, TMAX), 0.0)):  # softplus(0) = 0.69 > 0.05
        torch.manual_seed(0)
        model = NemotronHForCausalLM(hf_config(*limit)).float()
        randomize(model, dt_bias_mean=dt_bias)
        model.save_pretrained(wd / name)
        make_tokenizer_folder(wd / name)
        torch.save(hf_logits(model), wd / f"logits_{name}.pt")
        free = NemotronHForCausalLM(hf_config(0.0)).float()  # time_step_limit (0, inf): no clamp
        free.load_state_dict(model.state_dict())
        torch.save(hf_logits(free), wd / f"logits_{name}_noclamp.pt")


def _perm(n, g):
    return torch.randperm(n, generator=g).tolist()


def _keepall_plan(cfg, g):
    from megatron_minitron.plan.targets import assemble_plan

    def grouped(n, groups):
        per = n // groups
        return [gi * per + j for gi in range(groups) for j in _perm(per, g)]

    layers = {}
    for i, t in enumerate(cfg.pattern):
        if t == "M":
            layers[i] = {"mamba_heads": grouped(cfg.mamba_num_heads, cfg.mamba_num_groups),
                         "mamba_channels": _perm(cfg.mamba_head_dim, g)}
        elif t == "-":
            layers[i] = {"ffn": _perm(cfg.ffn_hidden_size, g)}
        else:
            layers[i] = {"attention_heads": grouped(cfg.num_attention_heads, cfg.num_query_groups)}
    return assemble_plan(cfg, _perm(cfg.hidden_size, g), layers)


def run(wd: Path):
    from transformers import AutoModelForCausalLM

    from megatron_minitron import dist as D
    from megatron_minitron.config import ParallelConfig
    from megatron_minitron.hf.stage import ExportHFConfig, ImportHFConfig, run_export_hf, run_import_hf
    from megatron_minitron.model import build_model, causal_mask
    from megatron_minitron.rewrite.stage import PruneConfig, run_prune
    from megatron_minitron.train import checkpoint as ckpt

    res = {}
    for sfx in ("", "_upper"):  # import -> our logits; export -> transformers' logits
        imp = run_import_hf(ImportHFConfig(hf_dir=str(wd / f"hf{sfx}"), output_dir=str(wd / f"imp{sfx}")),
                            shutdown=False)
        res[f"import_notes{sfx}"] = imp["notes"]
        cfg = ckpt.read_model_config(wd / f"imp{sfx}")
        res[f"dt_clamp{sfx}"] = [cfg.mamba_dt_clamp_min, cfg.mamba_dt_clamp_max]
        par = D.init(ParallelConfig(), seed=1)
        model = build_model(cfg, par)
        ckpt.load_model_weights(wd / f"imp{sfx}", model)
        model.eval()
        with torch.no_grad():
            lg = model(tokens(), torch.arange(SEQ)[None].expand(BATCH, SEQ), causal_mask(SEQ))
        torch.save(lg.float(), wd / f"logits_imp{sfx}.pt")
        run_export_hf(ExportHFConfig(checkpoint=str(wd / f"imp{sfx}"), output_dir=str(wd / f"exp{sfx}"),
                                     dtype="fp32"), shutdown=False)
        res[f"exp_time_step_limit{sfx}"] = json.loads((wd / f"exp{sfx}" / "config.json").read_text())[
            "time_step_limit"]
        torch.save(hf_logits(AutoModelForCausalLM.from_pretrained(wd / f"exp{sfx}")), wd / f"logits_exp{sfx}.pt")
    cfg = ckpt.read_model_config(wd / "imp")
    _keepall_plan(cfg, torch.Generator().manual_seed(5)).save(wd / "plan_keepall.json")
    run_prune(PruneConfig(checkpoint=str(wd / "imp"), plan=str(wd / "plan_keepall.json"),
                          output=str(wd / "pruned"), fsync=False))
    pcfg = ckpt.read_model_config(wd / "pruned")
    res["pruned_dt_clamp"] = [pcfg.mamba_dt_clamp_min, pcfg.mamba_dt_clamp_max]
    run_export_hf(ExportHFConfig(checkpoint=str(wd / "pruned"), output_dir=str(wd / "exp_pruned"),
                                 dtype="fp32", tokenizer=str(wd / "imp" / "tokenizer")), shutdown=False)
    torch.save(hf_logits(AutoModelForCausalLM.from_pretrained(wd / "exp_pruned")), wd / "logits_exp_pruned.pt")
    (wd / "result.json").write_text(json.dumps(res, indent=2))
    D.shutdown()


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    {"make": make, "run": run}[phase](workdir)
