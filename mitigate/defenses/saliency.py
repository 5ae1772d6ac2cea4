"""Per-token saliency of a classifier's prediction: input-embedding gradient norms (IMBERT-G)
and the attention each token receives in the last layer (IMBERT-A)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def gradient_saliency(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``g[b, i] = ||dL_b / de_{b,i}||_2`` with ``L_b`` the cross-entropy of sample b against the
    model's own prediction and ``e_{b,i}`` the input (word) embedding of its sub-token i.

    One backward pass serves the whole batch: in eval mode samples do not interact, so the
    gradient of the SUM of per-sample losses w.r.t. sample b's embeddings is sample b's own.
    Returns (saliency (B, L), logits (B, C)). Works inside ``torch.inference_mode`` (Lightning's
    test loop) by leaving it for the duration.
    """
    with torch.inference_mode(False), torch.enable_grad():
        ids, attn = input_ids.clone(), attention_mask.clone()  # normal tensors, not inference ones
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=attn).logits
        loss = F.cross_entropy(logits.float(), logits.argmax(-1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, embeds)
    return grad.float().norm(dim=-1).detach(), logits.detach()


@torch.no_grad()
def attention_saliency(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s[b, i] = 1/(H n) sum_h sum_j A_h[j, i]``: the attention token i RECEIVES in the last
    layer, averaged over heads and the n real tokens attending to it (padding rows excluded;
    the row-sum form printed in the paper is 1 for every softmax row). The model must run
    eager attention (``attn_implementation="eager"``) to return attention probabilities.
    Returns (saliency (B, L), logits (B, C))."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    if not out.attentions or out.attentions[-1] is None:
        raise RuntimeError("the model returned no attentions: load it with attn_implementation='eager'")
    att = out.attentions[-1].float()  # (B, H, L_query, L_key)
    rows = attention_mask[:, None, :, None].to(att.dtype)
    n = attention_mask.sum(-1).clamp(min=1).to(att.dtype)
    s = (att * rows).sum(dim=(1, 2)) / (att.shape[1] * n[:, None])
    return s * attention_mask, out.logits
