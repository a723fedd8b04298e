"""The importance file: what the `stats` stage writes and the `plan` / `search` stages read.

One `torch.save` file (`importance.pt`, CPU tensors, fp32) plus a JSON sidecar with the
metadata. All indices are GLOBAL: layer ids are positions in the model's pattern string
(ignoring '|'), head / channel / neuron indices are in the unsharded model's order (TP
slices already gathered). Scores are finalized (higher = more important):

  layers[i] for a Mamba layer ('M'):
      "mamba": {"x": [nheads, headdim], "z": [nheads, headdim], "y": [nheads, headdim]}
               L2-over-samples of the per-sample mean |activation| (paper eq. 19-24 input),
               from the x part of in_proj's output, the z part, and out_proj's input.
      "flap":  [d_inner] FLAP column scores ||W_out[:, j]||^2 * Var(y_j)  (sec. 3.3)
  layers[i] for an MLP layer ('-'):        "ffn":  [ffn_hidden_size]  linear_fc2 input (after
      the activation);  "ffn_pre": [ffn_hidden_size]  linear_fc1 output (before it: eq. 26)
  layers[i] for an attention layer ('*'):  "attn": [num_attention_heads]
  layers[i] for an MoE layer ('E', stats source "moe"; E = num_moe_experts, global expert order):
      "experts":    {"out": [E], "mass": [E], "freq": [E]}  per routed expert, over the tokens
                    routed to it: sum of ||p * expert(x)||_2 (its contribution to the layer
                    output, hidden width), sum of its routing weights p (after top-k
                    normalisation and the top-k scaling factor), number of assignments
      "expert_ffn": [E, moe_ffn_hidden_size]  RMS over its routed tokens of each neuron's
                    linear_fc2 input (p * activation); 0 rows for an expert never chosen
      "shared_ffn": [moe_shared_expert_intermediate_size]  (models with a shared expert) its
                    linear_fc2 input, aggregated as "ffn"
      (all non-negative, larger = more important; the E layer's input norm is in `hidden`)
  hidden:  [hidden_size] embedding-channel scores summed over every residual reader (eq. 27)
  depth:   {"kl": [num_layers], "cosine": [num_layers]}  (sec. 3.4; NaN where not computed)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, build

FORMAT = "megatron-minitron-importance"
VERSION = 1


def _refuse_json(path: Path) -> None:
    """A JSON file given as the importance file (its .json sidecar, a plan.json) is refused
    in one line that says what to give instead; torch.load would only say `weights_only`."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return  # torch.load reports it
    if not head.startswith((b"{", b"[")):
        return
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    kind = doc.get("format") if isinstance(doc, dict) else None
    if kind == FORMAT:
        what = (f"the metadata sidecar that `stats` writes next to {path.with_suffix('.pt')}; "
                "give that .pt file")
    elif kind == "megatron-minitron-plan":
        what = f"a plan from `plan`: it goes to `prune plan={path}`"
    else:
        what = "importance= takes the importance.pt that `stats` writes (a plan.json goes to `prune plan=`)"
    raise ConfigError(f"importance file {path} is JSON, not the importance.pt (torch.save) that "
                      f"`stats` writes: {what}" if kind else f"importance file {path} is JSON: {what}")


@dataclass
class ImportanceFile:
    model: ModelConfig
    layers: dict[int, dict[str, Any]]
    hidden: torch.Tensor
    depth: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # samples, seq_length, checkpoint, mcore version, ...

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.to_dict(),
            "layers": {int(k): v for k, v in self.layers.items()},
            "hidden": self.hidden,
            "depth": self.depth,
            "meta": self.meta,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)
        side = path.with_suffix(".json")
        side.write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                    "model": self.model.to_dict(), "meta": self.meta}, indent=2))

    @classmethod
    def random(cls, model: ModelConfig, generator: torch.Generator) -> "ImportanceFile":
        """Uniform random scores of the right shapes, for tests and benchmarks: the planner's
        logic does not depend on where scores come from."""
        def r(*shape):
            return torch.rand(*shape, generator=generator)

        layers: dict[int, dict[str, Any]] = {}
        for i, t in enumerate(model.pattern.replace("|", "")):
            if t == "M":
                layers[i] = {"mamba": {k: r(model.mamba_num_heads, model.mamba_head_dim) for k in "xzy"},
                             "flap": r(model.mamba_d_inner)}
            elif t == "-":
                layers[i] = {"ffn": r(model.ffn_hidden_size)}
            elif t == "*":
                layers[i] = {"attn": r(model.num_attention_heads)}
            else:  # E: per routed expert (global order), its FFN neurons, the shared expert's
                n = model.num_moe_experts
                layers[i] = {"experts": {k: r(n) for k in ("out", "mass", "freq")},
                             "expert_ffn": r(n, model.moe_ffn_hidden_size)}
                if model.moe_shared_expert_intermediate_size:
                    layers[i]["shared_ffn"] = r(model.moe_shared_expert_intermediate_size)
        return cls(model=model, layers=layers, hidden=r(model.hidden_size),
                   depth={"kl": r(model.num_layers), "cosine": r(model.num_layers)})

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceFile":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"importance file {path} does not exist; run the `stats` stage first")
        _refuse_json(path)
        try:  # weights_only: a foreign pickle cannot run code; truncation fails here
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError / pickle / zip errors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"importance file {path} cannot be read (truncated or not written by "
                              f"`stats`: {msg[:200]}); re-run `stats`") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a megatron-minitron importance file")
        if blob.get("version") != VERSION:
            raise ConfigError(f"{path} has importance format version {blob.get('version')}, "
                              f"this release reads version {VERSION}; re-run `stats`")
        try:
            f = cls(model=build(ModelConfig, blob["model"], "model."),
                    layers={int(k): v for k, v in blob["layers"].items()},
                    hidden=blob["hidden"], depth=blob["depth"], meta=blob.get("meta", {}))
            f.model.validate()
            f.check()
        except ConfigError as e:
            raise ConfigError(f"importance file {path}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise ConfigError(f"importance file {path} is malformed ({what}); re-run `stats`") from None
        return f

    def check(self) -> None:
        """Every score tensor the model's pattern calls for is present, fp, of the right
        shape (a hand-edited or foreign file fails here, not deep inside `plan`)."""
        m = self.model

        def want(name: str, t: Any, shape: tuple) -> None:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ConfigError(f"{name} should be a float tensor of shape {shape}, found {got}")

        want("hidden", self.hidden, (m.hidden_size,))
        for i, t in enumerate(m.pattern.replace("|", "")):
            e = self.layers.get(i)
            if not isinstance(e, dict):
                raise ConfigError(f"layer {i} ({t!r}) has no scores")
            if t == "M":
                mamba = e.get("mamba", {})
                if not isinstance(mamba, dict):
                    raise ConfigError(f"layer {i} mamba scores must be a mapping {{x, z, y}}")
                for k, v in mamba.items():
                    want(f"layer {i} mamba.{k}", v, (m.mamba_num_heads, m.mamba_head_dim))
                if "flap" in e:
                    want(f"layer {i} flap", e["flap"], (m.mamba_d_inner,))
            elif t == "-":  # ffn / ffn_pre: absent when stats ran without that source
                for k in ("ffn", "ffn_pre"):
                    if k in e:
                        want(f"layer {i} {k}", e[k], (m.ffn_hidden_size,))
            elif t == "*" and "attn" in e:
                want(f"layer {i} attn", e["attn"], (m.num_attention_heads,))
            elif t == "E":  # absent when stats ran without the "moe" source
                self._check_moe(i, e, want)
        if not isinstance(self.depth, dict):
            raise ConfigError("depth must be a mapping {kl, cosine}")
        for k, v in self.depth.items():
            want(f"depth.{k}", v, (m.num_layers,))

    def _check_moe(self, i: int, e: dict, want) -> None:
        m = self.model
        n = m.num_moe_experts
        if "experts" in e:
            ex = e["experts"]
            if not isinstance(ex, dict) or not ex:
                raise ConfigError(f"layer {i} experts scores must be a mapping {{out, mass, freq}}")
            for k, v in ex.items():
                want(f"layer {i} experts.{k}", v, (n,))
        if "expert_ffn" in e:
            want(f"layer {i} expert_ffn", e["expert_ffn"], (n, m.moe_ffn_hidden_size))
        if "shared_ffn" in e:
            if not m.moe_shared_expert_intermediate_size:
                raise ConfigError(f"layer {i} has shared_ffn scores but the model has no shared expert")
            want(f"layer {i} shared_ffn", e["shared_ffn"], (m.moe_shared_expert_intermediate_size,))
