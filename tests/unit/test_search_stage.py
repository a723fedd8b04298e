"""The search stage's checks before any work, its ranking rule and its recipes.

Analytic counts and the budget / divisibility filter are tested in test_search_space.py;
the end-to-end search and resume in tests/dist/test_search_dist.py."""

import json
from pathlib import Path

import pytest
import torch

from megatron_minitron.config import (ConfigError, DataConfig, ModelConfig, ParallelConfig, TrainConfig, build,
                                      load_stage_config, load_yaml)
from megatron_minitron.importance.io import ImportanceFile
from megatron_minitron.search.space import SearchSpace, enumerate_candidates
from megatron_minitron.search.stage import (SearchConfig, State, _fingerprint, rank, run_search,
                                            table_markdown, validate)

REPO = Path(__file__).resolve().parents[2]
TEACHER = ModelConfig(pattern="M-*-M-", hidden_size=64, ffn_hidden_size=128, mamba_num_heads=4,
                      mamba_head_dim=16, mamba_num_groups=2, mamba_state_dim=8, mamba_chunk_size=16,
                      num_attention_heads=4, num_query_groups=2, kv_channels=16, vocab_size=4096,
                      seq_length=64)
SPACE = SearchSpace(num_layers=[5, 6], hidden_size=[48, 64], ffn_hidden_size=[64, 128],
                    mamba_num_heads=[2, 4], mamba_head_dim=[8, 16])


def _importance(model: ModelConfig, depth=True) -> ImportanceFile:
    g = torch.Generator().manual_seed(0)
    layers = {}
    for i, t in enumerate(model.pattern):
        if t == "M":
            layers[i] = {"mamba": {k: torch.rand(model.mamba_num_heads, model.mamba_head_dim, generator=g)
                                   for k in "xzy"}}
        elif t == "-":
            layers[i] = {"ffn": torch.rand(model.ffn_hidden_size, generator=g)}
        else:
            layers[i] = {"attn": torch.rand(model.num_attention_heads, generator=g)}
    n = len(model.pattern)
    kl = torch.rand(n, generator=g) if depth else torch.full((n,), float("nan"))
    return ImportanceFile(model=model, layers=layers, hidden=torch.rand(model.hidden_size, generator=g),
                          depth={"kl": kl, "cosine": kl.clone()})


@pytest.fixture
def setup(tmp_path, real_data, monkeypatch):
    """A checkpoint folder holding only its model config (no weights: nothing may load it),
    an importance file for that model, and a guard that fails if any model is built."""
    ck = tmp_path / "teacher"
    ck.mkdir()
    (ck / "model_config.json").write_text(json.dumps(TEACHER.to_dict()))
    (ck / "meta.json").write_text(json.dumps({"iteration": 0}))
    _importance(TEACHER).save(tmp_path / "imp.pt")

    def no_build(*a, **k):
        raise AssertionError("a model was built before the configuration was validated")
    import megatron_minitron.model as M
    monkeypatch.setattr(M, "build_model", no_build)
    data = DataConfig(prefix=real_data["prefix"], tokenizer=real_data["tokenizer"], split="90,10,0")

    def cfg(**kw):
        base = dict(teacher=str(ck), importance=str(tmp_path / "imp.pt"), output_dir=str(tmp_path / "out"),
                    space=SPACE, budget=440_000, tolerance=0.03, data=data, short_kd_steps=4)
        base.update(kw)
        return SearchConfig(**base)
    return tmp_path, cfg


def test_valid_config_enumerates_without_building(setup):
    _, cfg = setup
    t_cfg, imp, cands, info, drop = validate(cfg())
    assert len(cands) == 14 and info["combinations"] == 32
    assert sorted(drop) == list(range(6))
    assert len(validate(cfg(max_candidates=3))[2]) == 3


def test_unreachable_budget_is_a_clear_error_before_any_model(setup):
    tmp, cfg = setup
    with pytest.raises(ConfigError) as e:
        run_search(cfg(budget=100_000))
    msg = str(e.value)
    assert "no candidate architecture" in msg and "32 combinations" in msg
    assert "32 budget" in msg and "tolerance" in msg and "widen the space" in msg
    assert not (tmp / "out").exists()


def test_empty_space_is_a_clear_error(setup):
    _, cfg = setup
    # every value larger than the teacher's: nothing can be pruned to it
    with pytest.raises(ConfigError, match=r"8 larger_than_teacher"):
        run_search(cfg(space=SearchSpace(hidden_size=[96, 128], ffn_hidden_size=[256, 512],
                                         mamba_num_heads=[8, 16])))
    # odd Mamba head counts with 2 groups: divisibility
    with pytest.raises(ConfigError, match=r"divisibility"):
        run_search(cfg(space=SearchSpace(mamba_num_heads=[1, 3])))


@pytest.mark.parametrize("change, match", [
    (dict(teacher="/nonexistent/teacher"), r"teacher=.*no checkpoint"),
    (dict(importance="/nonexistent/imp.pt"), r"importance file .* does not exist"),
    (dict(budget=0), r"budget, active_budget and memory_budget_gib are all 0"),
    (dict(budget=-5), r"budget=-5"),
    (dict(active_budget=-1), r"active_budget=-1"),
    (dict(memory_state_dtype="fp16"), r"memory_state_dtype='fp16'"),
    (dict(expert_score="max"), r"expert_score='max'"),
    (dict(expert_score="mass"), r"expert_score='mass' ranks the experts .* no candidate prunes experts"),
    (dict(space=SearchSpace(num_moe_experts=[4])), r"space.num_moe_experts is set but the teacher"),
    (dict(top_k=0), r"top_k=0"),
    (dict(tie_tolerance=1.5), r"tie_tolerance"),
    (dict(depth_metric="l1"), r"depth_metric"),
    (dict(space=SearchSpace(hidden_size="64:32:8")), r"search.space.hidden_size"),
    (dict(short_kd_steps=2), r"kd.warmup_steps"),
])
def test_bad_values_name_the_key(setup, change, match):
    _, cfg = setup
    with pytest.raises(ConfigError, match=match):
        run_search(cfg(**change))


def test_importance_of_another_model_is_refused(setup):
    tmp, cfg = setup
    other = ModelConfig(**{**TEACHER.to_dict(), "hidden_size": 32})
    _importance(other).save(tmp / "other.pt")
    with pytest.raises(ConfigError, match=r"another model.*hidden_size"):
        run_search(cfg(importance=str(tmp / "other.pt")))


def test_depth_axis_needs_depth_scores(setup):
    tmp, cfg = setup
    _importance(TEACHER, depth=False).save(tmp / "nodepth.pt")
    with pytest.raises(ConfigError, match=r"no complete depth scores"):
        run_search(cfg(importance=str(tmp / "nodepth.pt")))
    # width only: fine without depth scores
    validate(cfg(importance=str(tmp / "nodepth.pt"), space=SearchSpace(hidden_size=[48], ffn_hidden_size=[64, 128],
                                                                        mamba_num_heads=[2, 4])))


def test_rank_breaks_near_ties_by_throughput():
    rows = [dict(name="a", distilled_loss=2.000, tokens_per_s=100.0),
            dict(name="b", distilled_loss=2.001, tokens_per_s=300.0),
            dict(name="c", distilled_loss=2.100, tokens_per_s=900.0),
            dict(name="d", distilled_loss=1.999, tokens_per_s=50.0)]
    assert [r["name"] for r in rank(rows, 0.0)] == ["d", "a", "b", "c"]
    # within 0.2% of the best (1.999 -> up to 2.003): d, a, b tie -> fastest first; c stays last
    out = rank(rows, 0.002)
    assert [r["name"] for r in out] == ["b", "a", "d", "c"] and [r["rank"] for r in out] == [1, 2, 3, 4]
    md = table_markdown([dict(r, params=1_000_000, zero_shot_loss=3.0, num_layers=5, hidden_size=1,
                              ffn_hidden_size=1, mamba_num_heads=1, mamba_head_dim=1) for r in out])
    assert md.count("\n") == 6 and "| 1 | 5 |" in md
    assert "Mamba heads" in md and "experts" not in md
    md = table_markdown([dict(r, params=1, zero_shot_loss=3.0, num_moe_experts=4) for r in out], moe=True,
                        mamba=False)
    assert "Mamba heads" not in md.splitlines()[0] and "| experts | expert FFN | shared FFN |" in md


def test_recipes_load_and_the_paper_candidate_is_in_the_8b_space():
    default = load_stage_config("search", str(REPO / "configs/search_default.yaml"), ["top_k=2"])
    assert default.top_k == 2 and default.teacher == "runs/default/teacher"
    tiny = build(ModelConfig, load_yaml(REPO / "configs/model/tiny_hybrid.yaml")["model"], "model.")
    cands, _ = enumerate_candidates(tiny, default.space, default.budget, default.tolerance,
                                    list(range(7)), default.parallel.tp, default.parallel.pp)
    assert len(cands) >= default.top_k
    # about half the teacher's 4.13M parameters, hidden shrunk
    assert all(1.9e6 < c.params < 2.2e6 and c.hidden_size < tiny.hidden_size for c in cands)

    paper = load_stage_config("search", str(REPO / "configs/search_nemotron_h_8b_to_4b.yaml"), [])
    h8b = build(ModelConfig, load_yaml(REPO / "configs/model/nemotron_h_8b.yaml")["model"], "model.")
    cands, info = enumerate_candidates(h8b, paper.space, paper.budget, paper.tolerance,
                                       list(range(52)), paper.parallel.tp, paper.parallel.pp)
    names = {c.name for c in cands}
    assert "L52-h3072-f12288-mh112-hd64" in names  # table 1, candidate #1
    assert len(cands) > 100  # "over a hundred candidate architectures"
    assert info["grid"]["num_layers"][0] == 26 and info["grid"]["mamba_num_heads"] == list(range(64, 129, 8))


def test_the_published_30b_a3b_target_is_in_the_nano_recipes_space():
    """Model Optimizer's Nemotron 3 Nano target (hidden 2304, 104 experts, shared 3072, expert
    FFN 1856, 52 layers; published as about 22.3B total / 3.0B active) is a candidate of
    configs/search_nemotron_3_nano_30b_a3b.yaml at its layout (tp=2, ep=8), the closest to its
    budgets, and the same model as the distill recipe's student; the teacher itself is
    outside the memory bound. Which layers a depth candidate drops does not matter for it."""
    from megatron_minitron.model import count_parameters
    from megatron_minitron.search.stage import budget_of

    nano = load_stage_config("search", str(REPO / "configs/search_nemotron_3_nano_30b_a3b.yaml"), [])
    t = build(ModelConfig, load_yaml(REPO / "configs/model/nemotron_3_nano_30b_a3b.yaml")["model"], "model.")
    student = build(ModelConfig, load_yaml(REPO / "configs/model/nemotron_3_nano_22b_a3b.yaml")["model"],
                    "model.")
    b = budget_of(nano, t.seq_length)
    assert (b.params, b.active_params, b.memory_gib, b.memory_seq_length) == (22_280_000_000, 3_000_000_000,
                                                                               48, 131072)
    cands, info = enumerate_candidates(t, nano.space, b, drop_order=list(range(52))[::-1],
                                       tp=nano.parallel.tp, pp=nano.parallel.pp, ep=nano.parallel.ep)
    assert info["combinations"] == 3 * 6 * 2 * 5 * 3 * 10 and 20 <= len(cands) <= 200
    c = cands[0]
    assert c.name == "L52-h2304-f1856-mh64-hd64-e104-ef1856-sh3072", [x.name for x in cands[:3]]
    n = count_parameters(student)
    assert (c.params, c.active_params) == (n["total"], n["active"])
    assert c.params / 1e9 == pytest.approx(22.28, abs=0.01) and c.active_params / 1e9 == pytest.approx(3.00, abs=0.01)
    assert c.model_config(t) == student
    assert b.memory(t)["total"] > 48 * 2 ** 30 >= c.memory_bytes
    assert info["rejected"]["memory_budget"] > 0


def test_state_refuses_another_configuration_and_ignores_search_width(setup, tmp_path):
    _, cfg = setup
    c = cfg()
    fp = _fingerprint(c, Path(c.teacher))
    # widening the search or raising top_k keeps every finished result valid ...
    assert _fingerprint(cfg(top_k=5, budget=450_000, tolerance=0.1, max_candidates=2), Path(c.teacher)) == fp
    # ... as do other bounds (a candidate's loss does not depend on them; the tables count
    # sizes afresh) and an expert score when no MoE axis is searched
    assert _fingerprint(cfg(active_budget=400_000, memory_budget_gib=1.0, memory_seq_length=64,
                            memory_batch_size=4, memory_state_dtype="bf16", expert_score="mass"),
                        Path(c.teacher)) == fp
    assert _fingerprint(cfg(expert_score="mass", space=SearchSpace(num_moe_experts=[4])), Path(c.teacher)) != \
        _fingerprint(cfg(space=SearchSpace(num_moe_experts=[4])), Path(c.teacher))
    # ... a different KD recipe or evaluation set does not
    assert _fingerprint(cfg(short_kd_steps=5), Path(c.teacher)) != fp
    assert _fingerprint(cfg(eval_iters=2), Path(c.teacher)) != fp
    st = State(tmp_path / "state.json", fp, resume=True)
    st.put("zero_shot", "x", {"zero_shot_loss": 1.0})
    again = State(tmp_path / "state.json", fp, resume=True)
    assert again.data["zero_shot"]["x"]["id"] == st.data["zero_shot"]["x"]["id"]
    assert again.resumed == {"zero_shot": 1, "kd": 0}
    with pytest.raises(ConfigError, match=r"different configuration.*resume=false"):
        State(tmp_path / "state.json", "other", resume=True)
    assert State(tmp_path / "state.json", "other", resume=False).data["zero_shot"] == {}


def test_multi_process_layouts_are_checked_before_any_model(setup, monkeypatch):
    """Under torchrun (WORLD_SIZE) the layout must divide the world, and the fixed validation
    set and the KD batch must split over the data-parallel ranks."""
    _, cfg = setup
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tp x parallel.pp = 2"):
        validate(cfg(parallel=ParallelConfig(tp=2)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    kd = TrainConfig(steps=4, global_batch_size=8, micro_batch_size=4, warmup_steps=1)
    with pytest.raises(ConfigError, match="eval_iters=3 is not divisible by the data-parallel size 2"):
        validate(cfg(eval_iters=3, kd=kd))
    with pytest.raises(ConfigError, match="kd.global_batch_size=8 is not divisible"):
        validate(cfg(eval_iters=4))  # the default KD micro-batch of 8 x DP 2 exceeds the batch
    assert validate(cfg(eval_iters=4, kd=kd))[2]  # DP=2: eval_iters 4, KD batch 8 = 4 x 2
    assert validate(cfg(parallel=ParallelConfig(tp=2)))[2]  # TP=2, DP=1
    with pytest.raises(ConfigError, match="exit_duration_minutes"):
        validate(cfg(exit_duration_minutes=-5))
