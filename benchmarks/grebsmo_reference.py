"""A straight re-implementation of the released DSEE code's GreBsmo loop: the baseline for
bench_support.py. Float64 (NumPy's default), a full SVD of the residual for every rank
increment and a QR of the whole sketch at every inner step — no randomization, no early stop."""
import torch


def grebsmo_reference(w: torch.Tensor, tau: float = 0.01, outer: int = 100, inner: int = 2, rank_step: int = 5) -> torch.Tensor:
    d = w.double()
    max_rank = min(outer * rank_step, min(d.shape))
    _, s, vh = torch.linalg.svd(d, full_matrices=False)
    y = s[:rank_step, None] * vh[:rank_step]
    sparse = torch.zeros_like(d)
    for _ in range(outer):
        for _ in range(inner):
            target = d - sparse
            x, _ = torch.linalg.qr(target @ y.t())
            y = x.t() @ target
            residual = d - x @ y
            sparse = residual * (residual.abs() > tau)
        if y.shape[0] >= max_rank:
            break
        grow = min(rank_step, max_rank - y.shape[0])
        _, s, vh = torch.linalg.svd(d - x @ y - sparse, full_matrices=False)
        y = torch.cat([y, s[:grow, None] * vh[:grow]])
    return sparse
