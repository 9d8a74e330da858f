"""Exact magnitude pruning in one process against torch.nn.utils.prune (2-rank ZeRO-3 shards:
tests/multirank/test_prune_runs.py)."""
import pytest
import torch
from conftest import tiny_model
from transformers.pytorch_utils import Conv1D

from dsee_scale import apply_dsee
from dsee_scale.config import PruneConfig
from dsee_scale.export import export_hf
from dsee_scale.prune import prune_unstructured, prune_targets, score_chunks, sparsity_report
from helpers.prune_reference import DEFAULTS, DSEE, recorded_input_norms, recorded_inputs, reference_masks, reference_nm_masks, signed_delta


def adapted(kind: str, task: str = "lm", **overrides):
    return apply_dsee(tiny_model(kind, task, **overrides), DSEE)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("score", ["weight", "merged"])
def test_nm_pruning_keeps_n_of_every_m_along_the_input_dimension(kind, score):
    from dsee_scale.prune import prune_nm
    from dsee_scale.semistructured import input_dim, is_nm_sparse

    model = adapted(kind)
    expected = reference_nm_masks(model, 2, 4, score)
    masks = prune_nm(model, "2:4", score=score)
    for t in prune_targets(model, DEFAULTS.include, DEFAULTS.exclude):
        assert torch.equal(masks[t.name].dense(), expected[t.name]), t.name
        assert is_nm_sparse(t.param.data, 2, 4, input_dim(t.module)), t.name
    assert sparsity_report(model)["total"] == 0.5


def calibration_batches(task: str = "lm") -> list[dict]:
    """Two padded batches: the second rows' tails are padding, which the input norms skip."""
    g = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 100, (3, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1:, 6:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        batches.append({**batch, "labels": torch.tensor([0, 1, 0])} if task == "cls" else batch)
    return batches


# DeBERTa-v2's relative-position embeddings pass through its position projections, and with
# share_att_key (v3's setting) through query_proj itself: inputs that are not per token.
@pytest.mark.parametrize("kind, overrides", [("gpt2", {}), ("llama", {}), ("bert", {}), ("deberta-v2", {}), ("deberta-v2", {"share_att_key": True})],
                         ids=["gpt2", "llama", "bert", "deberta-v2", "deberta-v2-shared-keys"])
def test_activation_score_is_wandas_on_the_merged_weight_over_real_tokens(kind, overrides):
    """|W + ΔW|·‖x_j‖: inputs along Conv1D's rows and Linear's columns, padding left out; the
    global threshold and the N:M groups as for the other scores."""
    from dsee_scale.prune import prune_nm

    batches = calibration_batches()
    model = adapted(kind, **overrides).eval()
    norms = recorded_input_norms(model, batches)
    forward = lambda batch: model(**batch)  # noqa: E731
    expected = reference_masks(model, 0.5, "global", "activation", norms)
    expected_nm = reference_nm_masks(model, 2, 4, "activation", norms)
    masks = prune_unstructured(model, 0.5, score="activation", calibration=(batches, forward))
    for name, mask in masks.items():
        assert torch.equal(mask.dense(), expected[name]), name
    by_weight = reference_masks(adapted(kind, **overrides), 0.5, "global", "merged")
    assert any(not torch.equal(expected[n], by_weight[n]) for n in expected)  # the inputs changed the choice
    model = adapted(kind, **overrides).eval()
    masks = prune_nm(model, "2:4", score="activation", calibration=(batches, lambda batch: model(**batch)))
    for name, mask in masks.items():
        assert torch.equal(mask.dense(), expected_nm[name]), name
    with pytest.raises(ValueError, match="pass calibration"):
        prune_unstructured(adapted(kind, **overrides), 0.5, score="activation")
    with pytest.raises(ValueError, match="no calibration input reached"):
        prune_unstructured(adapted(kind, **overrides), 0.5, score="activation", calibration=(batches, lambda batch: None))


def test_obs_reconstruct_is_least_squares_for_one_pruned_column():
    """Pruning only the first column: the kept weights are the exact least-squares fit."""
    from dsee_scale.prune import obs_reconstruct

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 16, generator=g), torch.randn(5, 16, generator=g)
    pruned = torch.zeros(5, 16, dtype=torch.bool)
    pruned[[0, 1, 3], 0] = True
    fit, _ = obs_reconstruct(w, x.T @ x, pruned, damp=0.0)
    for r in (0, 1, 3):
        torch.testing.assert_close(fit[r, 1:], torch.linalg.lstsq(x[:, 1:], x @ w[r]).solution, atol=1e-5, rtol=1e-4)
        assert fit[r, 0] == 0
    assert torch.equal(fit[[2, 4]], w[[2, 4]])  # rows with nothing pruned stay
    random = torch.rand(5, 300, generator=g) < 0.5  # blocks of 8 columns: the error crosses block boundaries as within one
    wide, gram = torch.randn(5, 300, generator=g), (lambda a: a.T @ a)(torch.randn(400, 300, generator=g) @ torch.randn(300, 300, generator=g))
    for kw in ({"pruned": random}, {"nm": (2, 4)}):
        small, large = obs_reconstruct(wide, gram, block=8, **kw), obs_reconstruct(wide, gram, block=128, **kw)
        assert torch.equal(small[1], large[1])
        torch.testing.assert_close(small[0], large[0], atol=1e-5, rtol=1e-4)
    dead = x.clone()
    dead[:, 5] = 0  # an input never seen: its weights are left as they are
    pruned[:, 5] = False
    assert torch.equal(obs_reconstruct(w, dead.T @ dead, pruned)[0][:, 5], w[:, 5])


def test_fit_rounds_give_every_matrix_once_balanced_and_the_same_on_every_rank():
    """The re-fit's schedule: each matrix in exactly one round, at most one per rank per round,
    the ranks' work within one matrix of each other, and for a pass of GPT-2-medium's matrices
    (13 blocks per GiB of XᵀX) on 2 ranks, rounds that take ≥ 1.8× less than one rank alone."""
    from dsee_scale.prune.refit import fit_rounds

    g = torch.Generator().manual_seed(0)
    block = [n * n * (n + out) for n, out in [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]]  # c_attn, c_proj, c_fc, mlp c_proj
    for costs, ranks in [(block * 13, 2), (torch.randint(1, 1000, (37,), generator=g).tolist(), 3), ([5, 5, 5], 4), ([], 2), ([7, 1, 3], 1)]:
        rounds = fit_rounds(costs, ranks)
        assert rounds == fit_rounds(list(costs), ranks)  # deterministic
        assert sorted(i for r in rounds for _, i in r) == list(range(len(costs)))
        for r in rounds:
            owners = [rank for rank, _ in r]
            assert len(set(owners)) == len(owners) and all(0 <= rank < ranks for rank in owners)
            assert [i for _, i in r] == sorted(i for _, i in r)  # model order within a round
        loads = [sum(costs[i] for rank, i in (p for r in rounds for p in r) if rank == k) for k in range(ranks)]
        assert max(loads, default=0) - min(loads, default=0) <= max(costs, default=0)
        if ranks == 1:
            assert [len(r) for r in rounds] == [1] * len(costs)
    rounds = fit_rounds(block * 13, 2)
    assert sum(block * 13) / sum(max(block[i % 4] for _, i in r) for r in rounds) >= 1.8


@pytest.mark.parametrize("kind, keep_sparse, pattern", [("gpt2", True, "2:4"), ("llama", True, None), ("bert", True, "2:4"), ("gpt2", False, None), ("llama", False, "2:4")])
def test_reconstruction_keeps_the_mask_and_fits_each_matrix_to_its_inputs(kind, keep_sparse, pattern):
    """W' is SparseGPT's fit on each matrix's own calibration inputs of what the masked part must
    reproduce (W + ΔW by W' + ΔW ⊙ M with keep_sparse, the re-tune's layer; W by W' otherwise),
    zero where pruned, closer than the mask alone overall. Global pruning keeps the score's mask;
    with N:M the fit chooses the N of every M it keeps."""
    from dsee_scale.prune import prune_nm, obs_reconstruct
    from dsee_scale.semistructured import input_dim, is_nm_sparse

    batches = calibration_batches()

    def pruned_model(**kw):
        model = adapted(kind).eval()
        forward = lambda batch: model(**batch)  # noqa: E731
        args = dict(score="activation", calibration=(batches, forward), **kw)
        return model, prune_nm(model, pattern, **args) if pattern else prune_unstructured(model, 0.5, **args)

    tuned = adapted(kind).eval()
    inputs = recorded_inputs(tuned, batches)
    _, plain = pruned_model()
    model, masks = pruned_model(reconstruct=True, keep_sparse=keep_sparse)
    errors = []
    for before, t in zip(prune_targets(tuned, DEFAULTS.include, DEFAULTS.exclude), prune_targets(model, DEFAULTS.include, DEFAULTS.exclude)):
        pruned = masks[t.name].dense().reshape(t.param.shape)
        out_in = (lambda m: m.t()) if isinstance(t.module, Conv1D) else (lambda m: m)
        x = inputs[t.name]
        target = before.param.detach() + (signed_delta(before) if keep_sparse else 0)
        fit, chosen = obs_reconstruct(out_in(target), x.T @ x, nm=(2, 4)) if pattern else obs_reconstruct(out_in(target), x.T @ x, out_in(pruned))
        assert torch.equal(out_in(chosen), pruned), t.name
        if pattern:
            assert is_nm_sparse(t.param.data, 2, 4, input_dim(t.module)), t.name
        else:
            assert torch.equal(masks[t.name].dense(), plain[t.name].dense()), t.name
        delta = signed_delta(before).masked_fill(pruned, 0) if keep_sparse else 0
        torch.testing.assert_close(t.param.detach(), (out_in(fit) - delta).masked_fill(pruned, 0), atol=1e-5, rtol=1e-4)
        assert (t.param[pruned] == 0).all(), t.name
        error = lambda w: (x @ out_in(w + delta - target).t()).pow(2).sum()  # noqa: E731
        errors.append((error(t.param.detach()), error(before.param.detach().masked_fill(pruned, 0))))
    fitted, masked = map(sum, zip(*errors))
    assert fitted < 0.95 * masked  # greedy, so not in every matrix: a nearly all-pruned one can end a hair worse


def test_refitted_weights_round_trip_and_a_failed_write_keeps_the_saved_ones(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from dsee_scale import checkpoint

    def weights(model):
        return {t.name: t.param for t in prune_targets(model, DEFAULTS.include, DEFAULTS.exclude)}

    saved = weights(adapted("gpt2"))
    for p in saved.values():
        p.data.normal_()  # not what the model is built with
    checkpoint.save_weights(tmp_path / "refitted", saved, writer=True)
    restored = weights(adapted("gpt2"))
    checkpoint.load_weights(tmp_path / "refitted", restored)
    for name, p in restored.items():
        assert torch.equal(p, saved[name]), name

    def full_disk(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="could not be written to .*No space left on device"):
        checkpoint.save_weights(tmp_path / "refitted", weights(adapted("gpt2")), writer=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refitted"]  # no staging folder left
    checkpoint.load_weights(tmp_path / "refitted", restored)  # the earlier ones, intact
    with pytest.raises(checkpoint.CheckpointError, match="is missing on rank"):
        checkpoint.load_weights(tmp_path / "elsewhere", restored)


def test_nm_helpers_refuse_bad_patterns_and_shapes():
    from dsee_scale.semistructured import nm_keep, parse_pattern

    assert parse_pattern("4:8") == (4, 8)
    for bad in ("2-4", "4:2", "0:4", "a:b"):
        with pytest.raises(ValueError, match="N:M pattern"):
            parse_pattern(bad)
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        nm_keep(torch.rand(3, 6), 2, 4, dim=1)
    assert nm_keep(torch.ones(1, 8), 2, 4, dim=1).tolist() == [[True, True, False, False, True, True, False, False]]  # ties: lower index
    with pytest.raises(ValueError, match="prune.pattern 1:4 prunes 75%"):
        PruneConfig(pattern="1:4", sparsity=0.5)
    with pytest.raises(ValueError, match="set prune.sparsity or prune.pattern too"):
        PruneConfig(reconstruct=True)

    def no_forward(batch):
        raise AssertionError("a bad pattern must be refused before any calibration forward")

    from dsee_scale.prune import prune_nm
    with pytest.raises(ValueError, match=r"transformer\.h\.0\..*not a multiple of M=7"):
        prune_nm(adapted("gpt2"), "3:7", calibration=([{}], no_forward), reconstruct=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_keep_sparse_retune_merges_exactly_and_stays_as_sparse_as_the_mask(kind):
    """After pruning, ΔW ⊙ M is trained: the merge is exact and zero wherever W was pruned."""
    from dsee_scale.inject import dsee_layers
    from dsee_scale.prune import unpack_mask, whole_masks

    model = adapted(kind)
    masks = prune_unstructured(model, 0.5)
    whole = whole_masks(masks)
    layers = dsee_layers(model)
    for name, layer in layers.items():
        pruned = torch.from_numpy(unpack_mask(whole[f"{name}.weight"], layer.base.weight.numel())).reshape(layer.base.weight.shape)
        layer.keep_mask(pruned == 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (2, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for layer in layers.values():
            assert layer.lora_B.abs().sum() > 0  # it trained
            layer.merge()
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for name, layer in layers.items():
        assert torch.equal(layer.base.weight.flatten() == 0, masks[f"{name}.weight"].dense()), name


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "deberta-v2", "qwen3", "gemma2", "gemma3", "phi3"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_global_prune_matches_torch_and_prunes_exactly_k(kind, sparsity):
    model = adapted(kind)
    expected = reference_masks(model, sparsity)
    masks = prune_unstructured(model, sparsity)
    for name, mask in masks.items():
        assert torch.equal(mask.dense(), expected[name]), name
    report = sparsity_report(model)
    assert report["zeros"] == round(sparsity * report["numel"])


@pytest.mark.parametrize("score", ["weight", "merged", "delta"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_scores_and_scopes_match_dense_reference(score, scope):
    model = adapted("gpt2")
    expected = reference_masks(model, 0.5, scope, score)
    masks = prune_unstructured(model, 0.5, scope=scope, score=score)
    for name, mask in masks.items():
        assert torch.equal(mask.dense(), expected[name]), name


def test_delta_scores_are_computed_per_chunk_without_a_full_matrix():
    model = adapted("llama")
    target = next(t for t in prune_targets(model, DEFAULTS.include, DEFAULTS.exclude) if t.layer is not None)
    chunks = list(score_chunks(target, "merged", chunk=100))
    assert len(chunks) > 1 and all(c.numel() <= 100 for _, c in chunks)
    dense = (target.param.data + target.layer.delta_weight()).abs().flatten()
    torch.testing.assert_close(torch.cat([c for _, c in chunks]), dense)


def test_ties_are_broken_by_index_so_exactly_k_are_pruned():
    model = adapted("gpt2")
    for t in prune_targets(model, DEFAULTS.include, DEFAULTS.exclude):
        t.param.data.fill_(0.5)  # every score ties
    prune_unstructured(model, 0.3)
    report = sparsity_report(model)
    assert report["zeros"] == round(0.3 * report["numel"])
    first = prune_targets(model, DEFAULTS.include, DEFAULTS.exclude)[0].param.data.flatten()
    assert (first == 0).all()  # the lowest (parameter, index) positions go first


def test_merged_export_is_exactly_as_sparse_as_the_mask(tmp_path):
    from transformers import AutoModelForCausalLM

    model = adapted("gpt2")
    masks = prune_unstructured(model, 0.5)
    export_hf(model, tmp_path, merge=True, remask=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    params = dict(plain.named_parameters())
    for name, mask in masks.items():
        weight = params[name].detach().flatten()
        assert torch.equal(weight == 0, mask.dense()), name


def test_bad_sparsity_and_patterns_are_named():
    with pytest.raises(ValueError, match=r"sparsity\n  Input should be less than 1"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="no weight matched the prune patterns"):
        prune_unstructured(adapted("gpt2"), 0.5, include=[r"nothing\..*"])


def test_a_registered_score_and_selector_are_chosen_by_name():
    """A new score or selector is one function: the config accepts its name, pruning uses it."""
    from dsee_scale.prune import PRUNE_SCORES, PRUNE_SELECTORS, register_score, register_selector

    @register_score("negated")
    def negated(w, delta, x_norm):  # large weights first: the opposite of magnitude pruning
        return w.abs().max() - w.abs()

    @register_selector("first_only")
    def first_only(targets, score, sparsity):
        return PRUNE_SELECTORS["global"](targets[:1], score, sparsity)

    try:
        PruneConfig(score="negated", scope="first_only")  # accepted by the config
        model = adapted("gpt2")
        targets = prune_targets(model, PruneConfig().include, PruneConfig().exclude)
        largest = targets[0].param.detach().abs().flatten().clone()
        masks = prune_unstructured(model, 0.5, scope="first_only", score="negated")
        assert list(masks) == [targets[0].name]
        pruned = masks[targets[0].name].dense()
        assert largest[pruned].min() >= largest[~pruned].max()  # the largest half went
        assert all((t.param != 0).all() for t in targets[1:])  # other weights untouched
    finally:
        del PRUNE_SCORES["negated"], PRUNE_SELECTORS["first_only"]
    with pytest.raises(ValueError, match="unknown prune.score 'negated'"):
        PruneConfig(score="negated")
    with pytest.raises(ValueError, match="unknown prune.scope 'first_only'"):
        PruneConfig(scope="first_only")


def test_sparse_backbone_plus_unmerged_adapter_export_is_the_exact_function(tmp_path):
    from transformers import AutoModelForCausalLM

    from dsee_scale import load_adapter, save_adapter

    model = adapted("gpt2")
    masks = prune_unstructured(model, 0.5)
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    expected = model(input_ids=ids).logits
    export_hf(model, tmp_path / "backbone", merge=False)
    save_adapter(model, tmp_path / "adapter", DSEE)
    backbone = AutoModelForCausalLM.from_pretrained(tmp_path / "backbone").eval()
    params = dict(backbone.named_parameters())
    for name, mask in masks.items():  # the exported backbone is exactly as sparse as the masks
        assert torch.equal(params[name].detach().flatten() == 0, mask.dense()), name
    restored = load_adapter(backbone, tmp_path / "adapter")
    torch.testing.assert_close(restored(input_ids=ids).logits, expected, atol=1e-6, rtol=0)




def test_row_scope_prunes_the_same_count_of_every_output_row_as_a_plain_sort_of_it():
    """Wanda's comparison group: round(s × in) of each output row (Linear's rows, Conv1D's
    columns), as a plain sort of each row of the whole matrix, ties to the lower index; the
    re-fit keeps those masks."""
    from dsee_scale.semistructured import input_dim

    batches = calibration_batches()
    for kind in ("gpt2", "llama"):
        model = adapted(kind).eval()
        norms = recorded_input_norms(model, batches)
        expected = reference_masks(model, 0.3, "row", "activation", norms)
        masks = prune_unstructured(model, 0.3, scope="row", score="activation", calibration=(batches, lambda batch: model(**batch)))
        for t in prune_targets(model, DEFAULTS.include, DEFAULTS.exclude):
            pruned = masks[t.name].dense()
            assert torch.equal(pruned, expected[t.name]), t.name
            along = input_dim(t.module)
            assert (pruned.reshape(t.param.shape).sum(along) == round(0.3 * t.param.shape[along])).all(), t.name
            assert (t.param.detach().flatten()[pruned] == 0).all()
    model = adapted("llama").eval()
    refitted = prune_unstructured(model, 0.3, scope="row", score="activation", calibration=(batches, lambda batch: model(**batch)), reconstruct=True)
    assert all(torch.equal(refitted[name].dense(), expected[name]) for name in expected)
    model = adapted("gpt2")
    targets = prune_targets(model, DEFAULTS.include, DEFAULTS.exclude)
    for t in targets:
        t.param.data.fill_(0.5)  # every score ties: the lowest input indices of each row go
    masks = prune_unstructured(model, 0.25, scope="row")
    for t in targets:  # Conv1D (in, out): the first quarter of the inputs, across every output
        n_in = t.param.shape[0]
        assert torch.equal(masks[t.name].dense().reshape(t.param.shape), (torch.arange(n_in) < round(0.25 * n_in))[:, None].expand_as(t.param)), t.name


def test_owl_block_sparsities_follow_the_released_code_on_a_hand_made_table():
    """Outlier ratios D = (1%, 3%, 2%, 5%) of 4 blocks at s = 0.5, λ = 0.08: scaled to
    (0, 0.08, 0.04, 0.16), mean 0.07, so s_l = 0.5 − (r_l − 0.07); the mean is s and the spread
    2λ. The released code centres the spread on the mean: 0.41 lies below s − λ."""
    from dsee_scale.prune import owl_sparsities
    from dsee_scale.prune.rows import check_owl

    got = owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.5, 0.08)
    assert got == pytest.approx([0.57, 0.49, 0.53, 0.41], abs=1e-12)
    assert sum(got) / 4 == pytest.approx(0.5, abs=1e-12) and max(got) - min(got) == pytest.approx(0.16, abs=1e-12)
    assert owl_sparsities([0.02, 0.02], 0.6, 0.08) == [0.6, 0.6]  # no block stands out: all at s
    check_owl(0.16, 0.08)  # s − 2λ = 0: every block's sparsity stays in [0, 1)
    for sparsity in (0.1, 0.9):
        with pytest.raises(ValueError, match="lower prune.owl_lambda to at most 0.05"):
            check_owl(sparsity, 0.08)


def test_owl_prunes_each_blocks_rows_at_its_own_sparsity():
    """A hand-made score table: block 0 holds outliers (100 among ones), block 1 none, so with 2
    blocks s_0 = s − λ and s_1 = s + λ, and each row loses round(s_l × in) of its lowest scores.
    On the tuned weights and activation scores (M = 2, where a tiny random model's blocks differ),
    the masks equal a plain computation of OWL's ratios and rows on the whole matrices."""
    from dsee_scale.prune.rows import outlier_ratios

    model = adapted("llama")
    targets = prune_targets(model, DEFAULTS.include, DEFAULTS.exclude)
    assert [t.block for t in targets] == [0] * 7 + [1] * 7
    for t in targets:
        t.param.data.fill_(1.0)
        if t.block == 0:
            t.param.data.view(-1)[::50] = 100.0
    numel = sum(t.param.numel() for t in targets[:7])
    assert outlier_ratios(targets, "weight", 5.0) == [sum(len(range(0, t.param.numel(), 50)) for t in targets[:7]) / numel, 0.0]
    masks = prune_unstructured(model, 0.5, scope="owl", scope_options={"owl_m": 5.0, "owl_lambda": 0.1})
    for t in targets:
        per_row = masks[t.name].dense().reshape(t.param.shape).sum(1)
        assert (per_row == round((0.4 if t.block == 0 else 0.6) * t.param.shape[1])).all(), t.name
    batches = calibration_batches()
    for kind in ("gpt2", "llama"):
        model = adapted(kind).eval()
        norms = recorded_input_norms(model, batches)
        options = {"owl_m": 2.0, "owl_lambda": 0.1}
        expected = reference_masks(model, 0.5, "owl", "activation", norms, options)
        masks = prune_unstructured(model, 0.5, scope="owl", score="activation", calibration=(batches, lambda batch: model(**batch)), scope_options=options)
        for name, mask in masks.items():
            assert torch.equal(mask.dense(), expected[name]), name
        by_block = {}
        for t in prune_targets(model, DEFAULTS.include, DEFAULTS.exclude):
            by_block.setdefault(t.block, []).append(masks[t.name].dense().float().mean().item())
        assert len({round(sum(v) / len(v), 3) for v in by_block.values()}) == 2, by_block  # the blocks' sparsities differ


def test_owl_and_row_scopes_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match=r"lie in none .*exclude them \(prune.exclude\) or choose prune.scope row or layer"):
        prune_unstructured(adapted("llama"), 0.5, scope="owl", include=[r".*layers\.0\..*weight$", r"lm_head\.weight"])
    with pytest.raises(ValueError, match="lower prune.owl_lambda to at most 0.05"):
        PruneConfig(scope="owl", sparsity=0.1)
    assert PruneConfig(scope="owl", sparsity=0.5, owl_m=3.0).scope_options("owl") == {"owl_m": 3.0, "owl_lambda": 0.08}
    assert PruneConfig(scope="row", sparsity=0.5).scope_options("row") == {}
    with pytest.raises(ValueError, match="owl_m\n  Input should be greater than 0"):
        PruneConfig(scope="owl", owl_m=0)
    with pytest.raises(ValueError, match=r"prune.pattern 2:4 keeps N of every M in each group instead: leave prune.scope unset"):
        PruneConfig(scope="row", pattern="2:4", sparsity=0.5)


def test_an_unset_scope_is_the_models_familys_row_for_decoders_global_for_encoders():
    """The global threshold empties a real decoder's early layers (the LM table in
    benchmarks/RESULTS.md): decoders compare within each output row unless the run says otherwise."""
    from types import SimpleNamespace

    from dsee_scale.arch import prune_scope_of

    assert PruneConfig(sparsity=0.5).scope is None and PruneConfig(pattern="2:4").scope is None
    assert prune_scope_of(tiny_model("llama", "lm"), "lm") == prune_scope_of(tiny_model("gpt2", "lm"), "lm") == "row"
    assert prune_scope_of(tiny_model("bert", "cls"), "cls") == "global"
    unknown = torch.nn.Linear(2, 2)
    unknown.config = SimpleNamespace(model_type="opt")
    assert (prune_scope_of(unknown, "lm"), prune_scope_of(unknown, "cls")) == ("row", "global")
