"""Choosing Ω, the support of the sparse residual S: N flat indices into one (out × in) matrix.

Methods:
- `grebsmo` (default): the paper's variant: soft threshold tau = 0.01, rank +5 per outer step up
  to 64, 2 inner bilateral (QR) steps, stops once ||W - L - S|| / ||W|| < 0.01.
- `grebsmo_released`: the released DSEE code's variant: hard threshold tau = 0.01, 100 outer
  steps (rank +5 each, new directions from the residual) × 2 inner steps; we stop early once
  top-N of |S| has not changed for 5 outer steps (only Ω is needed). The loop is path-dependent
  (on random-init matrices even float32 vs float64 changes Ω), so new directions come from a
  range finder with enough power iterations to track the exact SVD.
- `magnitude`: top-N of |W|. `random`: N distinct uniform positions (seeded).

Both GreBsmo variants find new rank directions with a randomized range finder and keep the
bilateral sketch at the current rank, so a 1600×1600 matrix takes about a second on one core.
Every method returns exactly N distinct sorted indices; ties break by index, so the result
depends only on the weight and the seed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GreBsmoParams:
    tau: float
    soft: bool
    outer: int
    inner: int
    rank_step: int
    max_rank: int | None  # None: as far as the outer steps reach (outer × rank_step)
    tol: float
    patience: int = 0  # stop once top-N of |S| has not changed for this many outer steps (0: never)
    power: int = 2  # power iterations of the randomized range finder for new rank directions


GREBSMO_VARIANTS = {
    "grebsmo": GreBsmoParams(tau=0.01, soft=True, outer=100, inner=2, rank_step=5, max_rank=64, tol=1e-2),
    # 12 power iterations: the new directions match an exact SVD's closely enough that Ω follows
    # the original (exact-SVD, float64) path: 94-97% overlap on MiniLM's matrices.
    "grebsmo_released": GreBsmoParams(tau=0.01, soft=False, outer=100, inner=2, rank_step=5, max_rank=None, tol=0.0, patience=5, power=12),
}


def top_n_indices(score: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the n largest scores; ties go to the lower index. Sorted ascending."""
    flat = score.reshape(-1)
    if n <= 0:
        return torch.zeros(0, dtype=torch.int64, device=flat.device)
    if n >= flat.numel():
        return torch.arange(flat.numel(), dtype=torch.int64, device=flat.device)
    kth = torch.topk(flat, n, sorted=False).values.min()
    above = torch.nonzero(flat > kth).flatten()
    tied = torch.nonzero(flat == kth).flatten()[: n - above.numel()]
    return torch.sort(torch.cat([above, tied])).values


def _top_directions(m: torch.Tensor, k: int, generator: torch.Generator, power: int = 2) -> torch.Tensor:
    """Rows s_i·v_iᵀ of the top-k singular triplets of m, by a randomized range finder."""
    # cpu: drawn from the seeded CPU generator, so Ω does not depend on the device
    probe = torch.randn(m.shape[1], min(k + 8, min(m.shape)), generator=generator, dtype=m.dtype, device="cpu").to(m.device)
    q = torch.linalg.qr(m @ probe).Q
    for _ in range(power):
        q = torch.linalg.qr(m @ (m.t() @ q)).Q
    u, s, vh = torch.linalg.svd(q.t() @ m, full_matrices=False)
    return s[:k, None] * vh[:k]


def _threshold(t: torch.Tensor, tau: float, soft: bool) -> torch.Tensor:
    if soft:
        return torch.sign(t) * torch.clamp(t.abs() - tau, min=0)
    return t * (t.abs() > tau)


def grebsmo_sparse_part(w: torch.Tensor, params: GreBsmoParams, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """S of W ≈ L + S by greedy bilateral smoothing (Zhou & Tao, 2013); L of growing rank.

    With params.patience, stops once the top-n entries of |S| (all Ω needs) have not changed
    for that many consecutive outer steps.
    """
    d = w.detach().to(dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)  # cpu: Ω independent of the device
    norm_d = max(d.norm().item(), 1e-30)
    reach = params.outer * params.rank_step if params.max_rank is None else params.max_rank
    max_rank = max(1, min(reach, min(d.shape)))
    y = _top_directions(d, min(params.rank_step, max_rank), generator, params.power)
    s = torch.zeros_like(d)
    last_top, unchanged = None, 0
    for _ in range(params.outer):
        for _ in range(params.inner):
            target = d - s
            x = torch.linalg.qr(target @ y.t()).Q
            y = x.t() @ target
            residual = d - x @ y
            s = _threshold(residual, params.tau, params.soft)
            if (residual - s).norm().item() / norm_d < params.tol:
                return s
        if params.patience:
            top = top_n_indices(s.abs(), n)
            unchanged = unchanged + 1 if last_top is not None and torch.equal(top, last_top) else 0
            if unchanged >= params.patience:
                break
            last_top = top
        if y.shape[0] >= max_rank:
            break
        grow = min(params.rank_step, max_rank - y.shape[0])
        y = torch.cat([y, _top_directions(d - x @ y - s, grow, generator, params.power)])
    return s


SupportMethod = Callable[[torch.Tensor, int, int], torch.Tensor]
SUPPORT_METHODS: dict[str, SupportMethod] = {}


def register(name: str) -> Callable[[SupportMethod], SupportMethod]:
    """Add a way to choose Ω: fn(w, n, seed) → n distinct sorted flat indices, 0 < n < w.numel()."""
    def add(fn: SupportMethod) -> SupportMethod:
        SUPPORT_METHODS[name] = fn
        return fn
    return add


def _grebsmo_support(params: GreBsmoParams) -> SupportMethod:
    def choose(w: torch.Tensor, n: int, seed: int) -> torch.Tensor:
        sparse = grebsmo_sparse_part(w, params, n, seed).abs().reshape(-1)
        survivors = torch.nonzero(sparse).flatten()
        if survivors.numel() >= n:
            return top_n_indices(sparse.to(torch.float32), n)
        # Fewer survivors than N: keep them all and fill the rest by |W| (never a dense mask).
        fill_score = w.detach().abs().to(torch.float32).reshape(-1).clone()
        fill_score[survivors] = -1.0
        fill = top_n_indices(fill_score, n - survivors.numel())
        return torch.sort(torch.cat([survivors, fill])).values
    return choose


for _name, _params in GREBSMO_VARIANTS.items():
    register(_name)(_grebsmo_support(_params))


@register("magnitude")
def magnitude_support(w: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return top_n_indices(w.detach().abs().to(torch.float32), n)


@register("random")
def random_support(w: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)  # cpu: Ω independent of the device
    return torch.sort(torch.randperm(w.numel(), generator=generator, device="cpu")[:n]).values.to(w.device)  # cpu: as above


def choose_support(w: torch.Tensor, n: int, method: str, seed: int = 0) -> torch.Tensor:
    """Ω for one matrix: exactly min(n, numel) distinct flat indices, sorted ascending."""
    if method not in SUPPORT_METHODS:
        raise ValueError(f"unknown support method {method!r}: choose one of {', '.join(SUPPORT_METHODS)}")
    n = min(n, w.numel())
    if n == 0 or n == w.numel():
        return top_n_indices(w.detach().abs().to(torch.float32), n)
    return SUPPORT_METHODS[method](w, n, seed)


@dataclass(frozen=True)
class SupportJob:
    """One matrix to choose Ω for: rows [start, stop) of a (possibly partitioned) weight."""

    name: str
    weight: torch.Tensor
    transposed: bool
    rows: tuple[int, int]

    def matrix(self) -> torch.Tensor:
        w = self.weight.data.t() if self.transposed else self.weight.data
        return w[self.rows[0] : self.rows[1]]


def choose_supports(jobs: list[SupportJob], n: int, method: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ω per job, identical on every rank. Job i is computed by rank i % world_size.

    Weights are gathered one round of world_size matrices at a time; each rank keeps only its own
    matrix of the round, computes, and the indices are broadcast from their owners.
    """
    from dsee_scale import dist, zero
    from dsee_scale.layer import name_seed

    rank, world = dist.rank(), dist.world_size()
    result: dict[str, torch.Tensor] = {}
    for start in range(0, len(jobs), world):
        round_jobs = jobs[start : start + world]
        mine: SupportJob | None = None
        matrix: torch.Tensor | None = None
        for offset, job in enumerate(round_jobs):
            with zero.gathered([job.weight]):
                if offset == rank:
                    mine, matrix = job, job.matrix().detach().clone()
        local = None
        if mine is not None:
            local = choose_support(matrix, n, method, seed=name_seed(seed, mine.name))
        for offset, job in enumerate(round_jobs):
            size = min(n, (job.rows[1] - job.rows[0]) * zero.full_shape(job.weight)[0 if job.transposed else 1])
            buf = local if offset == rank else torch.empty(size, dtype=torch.int64, device=job.weight.device)
            result[job.name] = dist.broadcast(buf, src=offset)
    return result
