"""Synthetic data with ground-truth sparse features, for the "does it learn" tests."""

import torch
import torch.nn.functional as F


def sample(gen, feats_FD, B, active=3):
    """B samples, each a sum of `active` random features with magnitudes U(1, 2)."""
    idx = torch.rand(B, feats_FD.shape[0], generator=gen).topk(active, dim=1).indices
    mag = 1.0 + torch.rand(B, active, generator=gen)
    return torch.einsum("bk,bkd->bd", mag, feats_FD[idx])


def recovery(W_dec_MD, feats_FD):
    """Mean over true features of the max cosine to any decoder row."""
    cos = F.normalize(feats_FD, dim=1) @ F.normalize(W_dec_MD.detach(), dim=1).T
    return float(cos.max(1).values.mean())


def train(sae, gen, feats_FD, steps: int, lr: float, batch: int = 512) -> None:
    """The training protocol of saepipe.train on fresh synthetic batches (Adam)."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        sum(sae(sample(gen, feats_FD, batch)).losses.values()).backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
