"""Ω selection: planted recovery, exact sizes in every edge case, determinism."""
import pytest
import torch

from dsee_scale.support import choose_support

METHODS = ["grebsmo", "grebsmo_released", "magnitude", "random"]


def planted(m=256, n=192, rank=8, n_sparse=64, seed=0, spike=0.08):
    """Weight-scale matrix: rank-8 part (entries ~0.04, peaks ~0.4) + small dense noise +
    n_sparse spikes of 0.08-0.16, smaller than the low-rank peaks."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) * (0.04 / rank**0.5)
    w = (low + 0.004 * torch.randn(m, n, generator=g)).view(-1)
    positions = torch.randperm(m * n, generator=g)[:n_sparse]
    signs = torch.randint(0, 2, (n_sparse,), generator=g) * 2 - 1
    w[positions] += signs * spike * (1.0 + torch.rand(n_sparse, generator=g))
    return w.view(m, n), set(positions.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grebsmo_recovers_planted_entries_and_magnitude_does_not(seed):
    w, truth = planted(seed=seed)
    found = set(choose_support(w, 64, "grebsmo").tolist())
    recall = len(found & truth) / len(truth)
    magnitude_recall = len(set(choose_support(w, 64, "magnitude").tolist()) & truth) / len(truth)
    assert recall >= 0.95, recall
    assert magnitude_recall < 0.5, magnitude_recall


def test_released_variant_finds_most_planted_entries():
    w, truth = planted(spike=0.15)
    assert len(set(choose_support(w, 64, "grebsmo_released").tolist()) & truth) / 64 >= 0.8


def check_exact(index, n, numel):
    assert index.dtype == torch.int64
    assert index.numel() == n
    assert index.unique().numel() == n
    assert (index >= 0).all() and (index < numel).all()
    assert torch.equal(index, index.sort().values)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape, n",
    [((1, 1), 1), ((1, 1), 0), ((3, 2), 6), ((3, 2), 5), ((7, 5), 0), ((7, 5), 35), ((16, 8), 10), ((40, 30), 64)],
)
def test_exactly_n_distinct_indices(method, shape, n):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    check_exact(choose_support(w, n, method), n, w.numel())


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_weight_still_gives_n_indices(method):
    check_exact(choose_support(torch.zeros(20, 12), 17, method), 17, 240)


@pytest.mark.parametrize("method", ["grebsmo", "grebsmo_released"])
def test_fewer_survivors_than_n_are_filled_by_magnitude(method):
    # Exactly rank 1 and tiny: nothing survives the 0.01 threshold, Ω is filled by |W|.
    w = torch.outer(torch.arange(1.0, 21.0), torch.arange(1.0, 11.0)) * 1e-4
    index = choose_support(w, 30, method)
    check_exact(index, 30, w.numel())
    assert torch.equal(index, choose_support(w, 30, "magnitude"))


@pytest.mark.parametrize("method", METHODS)
def test_same_weights_and_seed_give_same_support(method):
    w, _ = planted(64, 48, n_sparse=16)
    a, b = choose_support(w, 16, method, seed=5), choose_support(w.clone(), 16, method, seed=5)
    assert torch.equal(a, b)


def test_random_support_depends_on_seed():
    w = torch.randn(50, 50)
    assert not torch.equal(choose_support(w, 20, "random", seed=1), choose_support(w, 20, "random", seed=2))


def test_a_registered_support_method_is_chosen_by_name():
    from dsee_scale import DSEEConfig
    from dsee_scale.support import SUPPORT_METHODS, register

    @register("first_rows")
    def first_rows(w, n, seed):
        return torch.arange(n, device=w.device)

    try:
        DSEEConfig(support="first_rows")  # accepted by the config
        assert torch.equal(choose_support(torch.randn(8, 8), 5, "first_rows"), torch.arange(5))
    finally:
        del SUPPORT_METHODS["first_rows"]
    with pytest.raises(ValueError, match="unknown support method 'first_rows'"):
        DSEEConfig(support="first_rows")
