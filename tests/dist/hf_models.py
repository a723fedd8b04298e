"""Helpers for the small transformers NemotronH models of the hf, dtclamp and oracle workers:
random weights off every init value (so a wrong index or a missed tensor shows in the
logits), fixed input tokens, and the model's fp32 logits on them."""

import torch


def randomize(model, dt_bias_mean: float, dt_bias_std: float = 1.0, seed: int = 1) -> None:
    """A_log: log of U(0.5, 4.5); dt_bias: N(dt_bias_mean, dt_bias_std) (the caller picks
    where softplus(dt) falls against the dt clamp, time_step_limit); 1-D tensors (norms, D, conv bias):
    1 + 0.3 N; matrices: 0.15 N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 4 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * dt_bias_std + dt_bias_mean)
            elif p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def fixed_tokens(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def eval_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """A transformers causal LM's logits (fp32) in eval mode, without autograd."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()
