"""The user's path end to end (tests/dist/test_user_path_dist.py runs the CLI stages
between these two phases):

  make:     a tiny transformers NemotronHForCausalLM (its Mamba dt clamp binds; make_moe: its
            MoE twin, E layers in place of the MLP), saved by
            save_pretrained with a real tokenizer that has no <|endoftext|> (eos `</s>`), and
            a JSON Lines corpus of real English in two shards (one gzipped);
  generate: transformers loads the exported folder (model + tokenizer) and generate()
            decodes text.
"""

import gzip
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist.dtclamp_worker import hf_config  # noqa: E402
from tests.real_tokenizer import english_paragraphs, make_tokenizer_folder  # noqa: E402

PROMPT = "Beautiful is better than"


def moe_config():
    """A tiny Nemotron 3-style MoE hybrid (no dense MLP): 8 routed experts, top-2, a shared
    expert, routed_scaling_factor 2.5."""
    cfg = hf_config(0.02)
    cfg.layers_block_type = ["linear_attention", "moe", "full_attention", "moe", "linear_attention"]
    cfg.num_hidden_layers = 5
    cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size = 8, 2, 32
    cfg.moe_shared_expert_intermediate_size, cfg.routed_scaling_factor = 48, 2.5
    cfg.n_group = cfg.topk_group = 1
    return cfg


def make(wd: Path, moe: bool = False):
    from transformers import NemotronHForCausalLM

    torch.manual_seed(0)
    model = NemotronHForCausalLM(moe_config() if moe else hf_config(0.02)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dt_bias"):  # softplus(dt) mostly below the dt clamp at 0.02
                p.sub_(5.0)
    model.save_pretrained(wd / "hf")
    make_tokenizer_folder(wd / "hf")
    rng = random.Random(0)
    paras = english_paragraphs()
    (wd / "corpus").mkdir()
    for s in range(2):
        lines = "".join(json.dumps({"text": " ".join(rng.choice(paras) for _ in range(rng.randint(2, 6)))}) + "\n"
                        for _ in range(150))
        if s:
            (wd / "corpus" / f"part-{s}.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
        else:
            (wd / "corpus" / f"part-{s}.jsonl").write_text(lines)


def generate(wd: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(wd / "hf_out")
    model = AutoModelForCausalLM.from_pretrained(wd / "hf_out").eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    res = {"text": text, "prompt_ids": enc["input_ids"][0].tolist(), "out_ids": out[0].tolist(),
           "eos": tok.eos_token, "model_class": type(model).__name__,
           "time_step_limit": list(model.config.time_step_limit), "vocab_size": model.config.vocab_size,
           "hidden_size": model.config.hidden_size, "mamba_num_heads": model.config.mamba_num_heads}
    print(json.dumps(res))
    (wd / "result_generate.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    phase, workdir = sys.argv[1], Path(sys.argv[2])
    {"make": make, "make_moe": lambda wd: make(wd, moe=True), "generate": generate}[phase](workdir)
