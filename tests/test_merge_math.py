"""HydraOpt's factored solver against dense references, planted structure and its guarantees."""

import pytest
import torch

from hydraopt_mobile.adapters import LoraFactors
from hydraopt_mobile.factored import factor_space, factored_sq_error
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.solver import objective, solve_layout
from hydraopt_mobile.merge.allocator import Candidate, allocate, allocate_best, lower_hull
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.similarity import column_space_overlap, row_space_overlap, update_cosine

torch.manual_seed(0)


def random_factors(T=5, d_out=24, d_in=40, ranks=(3, 4, 2, 4, 3)):
    return [LoraFactors(torch.randn(r, d_in), torch.randn(d_out, r)) for r in ranks[:T]]


def dense_closed_form(factors, w, rank):
    """Dense reference of the one-shared-A layout: SVD of the stacked, weighted dW_t."""
    stacked = torch.cat([w[t].sqrt() * f.dense().double() for t, f in enumerate(factors)], dim=0)
    A = torch.linalg.svd(stacked, full_matrices=False)[2][:rank]
    return A, [f.dense().double() @ A.T for f in factors]


def test_factored_error_equals_dense():
    f, g = random_factors(2, ranks=(3, 5))
    assert factored_sq_error(f, g) == pytest.approx(float(((f.dense() - g.dense()) ** 2).sum()), rel=1e-4)


def test_closed_form_matches_dense_reference():
    factors = random_factors()
    w = torch.rand(5, dtype=torch.float64) + 0.5
    fm = factor_space(factors)
    sol = solve_layout(fm, w, [0] * 5, list(range(5)), rank=6)
    A_ref, B_ref = dense_closed_form(factors, w, 6)
    A = fm.to_input_space(sol.a[0])
    # same row space and the same reconstruction of every task
    assert torch.allclose((A.T @ A).double(), A_ref.T @ A_ref, atol=1e-4)
    for t in range(5):
        assert torch.allclose((sol.B[t] @ A).double(), B_ref[t] @ A_ref, rtol=1e-4, atol=1e-3)  # solved in fp32
    dense_obj = sum(w[t] * ((factors[t].dense().double() - B_ref[t] @ A_ref) ** 2).sum() for t in range(5))
    assert float(objective(fm, w, sol).sum()) == pytest.approx(float(dense_obj), rel=1e-4)


def test_als_objective_never_increases_and_matches_dense_value():
    factors = random_factors()
    w = torch.ones(5, dtype=torch.float64)
    fm = factor_space(factors)
    a_index, b_index = [0, 0, 1, 1, 1], [0, 1, 1, 2, 2]
    sol = solve_layout(fm, w, a_index, b_index, rank=4, max_iters=40, tol=0)
    h = sol.history
    assert len(h) > 5
    assert all(b <= a * (1 + 1e-6) for a, b in zip(h, h[1:]))  # fp32 rounding
    assert h[-1] < h[0]
    A = [fm.to_input_space(sol.a[g]).double() for g in range(2)]
    dense = sum(float(((factors[t].dense().double() - sol.B[b_index[t]].double() @ A[a_index[t]]) ** 2).sum()) for t in range(5))
    assert h[-1] == pytest.approx(dense, rel=1e-4)


def test_one_per_task_layout_is_exact():
    factors = random_factors()
    fm = factor_space(factors)
    sol = solve_layout(fm, torch.ones(5, dtype=torch.float64), list(range(5)), list(range(5)), rank=4)
    total = sum(float((f.dense() ** 2).sum()) for f in factors)
    assert float(objective(fm, torch.ones(5, dtype=torch.float64), sol).sum()) < 1e-6 * total


def test_planted_shared_A_recovered_to_noise_floor(make_adapters, tmp_path):
    from hydraopt_mobile.adapters import build_adapter_set, load_adapter

    for noise, bound in ((0.0, 2e-3), (0.05, 0.06)):
        paths = make_adapters(n_tasks=6, noise=noise, root=tmp_path / f"noise{noise}")
        aset = build_adapter_set([load_adapter(p) for p in paths])
        params = {"k_a": "1", "k_b": "6", "rank": "4"}
        bank = merge(aset, MergeConfig("hydraopt", fmt=NumberFormat("fp16"), budget=Budget(fraction=1.0), params=params))
        errs = bank.relative_errors(aset)
        assert max(errs.values()) < bound, (noise, errs)
        assert all(m.layout == (1, 6) for m in bank.modules.values())
        # one merged adapter cannot represent six different B's
        single = merge(aset, MergeConfig("svd"))
        assert min(single.relative_errors(aset).values()) > 0.5


def test_more_budget_never_more_error(make_adapters):
    from hydraopt_mobile.adapters import build_adapter_set, load_adapter

    paths = make_adapters(n_tasks=5, noise=0.3)
    aset = build_adapter_set([load_adapter(p) for p in paths])
    previous, sizes = float("inf"), []
    for frac in (0.08, 0.15, 0.25, 0.4, 0.6, 0.8, 1.0):
        bank = merge(aset, MergeConfig("hydraopt", budget=Budget(fraction=frac)))
        assert bank.total_file_bytes() <= frac * aset.reference_file_bytes()
        total = sum(e**2 for e in bank.relative_errors(aset).values())
        assert total <= previous * (1 + 1e-9) + 1e-12
        previous = total
        sizes.append(bank.total_file_bytes())
    assert previous < 1e-4  # at the full budget the inputs come back (to fp16 precision)
    assert sizes[0] < sizes[-1]


def test_infeasible_budget_names_smallest(make_adapters):
    from hydraopt_mobile.adapters import build_adapter_set, load_adapter

    aset = build_adapter_set([load_adapter(p) for p in make_adapters(n_tasks=3)])
    with pytest.raises(InfeasibleBudget, match=r"smallest feasible budget is [\d,]+ bytes \(0\.\d+ of fp16 one-adapter-per-task, in file bytes"):
        merge(aset, MergeConfig("hydraopt", budget=Budget(nbytes=10)))


def test_planner_hull_and_prefix():
    c = [Candidate(1, 1, 1, "fp16", b, e) for b, e in ((10, 9.0), (20, 5.0), (30, 4.9), (40, 1.0), (25, 8.0))]
    hull = lower_hull(c)
    assert [h.nbytes for h in hull] == [10, 20, 40]
    assert sorted(x.nbytes for x in allocate({"m": c, "n": c}, budget_bytes=35).values()) == [10, 20]
    assert sorted(x.nbytes for x in allocate({"m": c, "n": c}, budget_bytes=45).values()) == [20, 20]
    assert sorted(x.nbytes for x in allocate({"m": c, "n": c}, budget_bytes=80).values()) == [40, 40]
    with pytest.raises(InfeasibleBudget):
        allocate({"m": c, "n": c}, budget_bytes=19)


def test_allocate_best_is_never_worse_than_a_subset():
    """The prefix of upgrades sorted by gain can do worse with more candidates: module m's extra
    cheap upgrade (12 bytes) is taken first, and then n's upgrade no longer fits (error 6 + 10), where
    without it m's own upgrade fills the budget exactly (5 + 10)."""
    own = [Candidate(2, 2, 1, "int4", 10, 10.0), Candidate(2, 2, 2, "int4", 20, 5.0)]
    shared = Candidate(1, 2, 2, "int4", 12, 6.0)
    cands = {"m": own + [shared], "n": list(own)}
    no_sharing = lambda c: c.k_a == c.k_b == 2  # noqa: E731
    everything = lambda c: True  # noqa: E731
    assert sum(c.error for c in allocate(cands, 30).values()) == 16.0
    best = allocate_best(cands, 30, (no_sharing, everything))
    assert sum(c.error for c in best.values()) == 15.0 and shared not in best.values()
    # a tie goes to the first subset: at 40 bytes both give 5 + 5, without the shared candidate
    best = allocate_best(cands, 40, (no_sharing, everything))
    assert sum(c.error for c in best.values()) == 10.0 and all(no_sharing(c) for c in best.values())
    # where only the larger set fits, it is taken; where nothing fits, the error says so
    cheap = {"m": own + [Candidate(1, 2, 1, "int4", 4, 12.0)], "n": list(own)}
    assert allocate_best(cheap, 15, (no_sharing, everything))["m"].nbytes == 4
    with pytest.raises(InfeasibleBudget, match="smallest feasible budget is 14 bytes"):
        allocate_best(cheap, 13, (no_sharing, everything))


def test_planner_shares_only_where_it_beats_its_own_per_task_plan(make_adapters):
    """At every budget the planner's objective is at most that of the plan of its no-sharing
    candidates alone, and where it shares nothing it is that plan."""
    from hydraopt_mobile.adapters import build_adapter_set, load_adapter
    from hydraopt_mobile.formats import FORMAT_NAMES
    from hydraopt_mobile.merge.budgeted import plan_budget
    from hydraopt_mobile.merge.candidates import HydraOptConfig, plan_candidates

    aset = build_adapter_set([load_adapter(p) for p in make_adapters(n_tasks=6, noise=0.2, seed=3)])
    T = len(aset.tasks)
    cands = plan_candidates(aset, HydraOptConfig(formats=tuple(NumberFormat(n) for n in FORMAT_NAMES)))
    alone = {m: [c for c in cs if c.k_a == c.k_b == T] for m, cs in cands.items()}
    ref = aset.reference_file_bytes()
    shared_somewhere = alone_somewhere = False
    for frac in (0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.4, 0.6):
        plan, own = plan_budget(cands, Budget(fraction=frac), ref, T), plan_budget(alone, Budget(fraction=frac), ref, T)
        if isinstance(own, InfeasibleBudget):
            continue
        assert sum(c.error for c in plan.values()) <= sum(c.error for c in own.values())
        shares = any(c.k_a < T or c.k_b < T for c in plan.values())
        shared_somewhere |= shares
        alone_somewhere |= not shares
        if not shares:
            assert {m: c.spec for m, c in plan.items()} == {m: c.spec for m, c in own.items()}
    assert shared_somewhere and alone_somewhere  # the planted shared A pays at some budgets, not at all: both branches are covered


def dense_overlap(u, v):
    """Mean squared cosine of the principal angles between the spans of the columns of u and v."""
    bases = [torch.linalg.svd(m, full_matrices=False)[0] for m in (u, v)]
    bases = [b[:, : torch.linalg.matrix_rank(m)] for b, m in zip(bases, (u, v))]
    return float(((bases[0].T @ bases[1]) ** 2).sum()) / min(b.shape[1] for b in bases)


def test_similarity_matches_dense_updates():
    """The planner's similarities (also the heatmaps') from factors equal those of the dense dW_t."""
    factors = random_factors()
    factors[1] = LoraFactors(factors[0].A[:2].clone(), torch.randn(24, 2))  # rows inside task 0's row space
    factors[2] = LoraFactors(torch.randn(2, 40), factors[3].B[:, :2] @ torch.randn(2, 2))  # columns inside task 3's
    fm = factor_space(factors)
    dense = [f.B.double() @ f.A.double() for f in factors]
    rows, cols, cos = row_space_overlap(fm), column_space_overlap(fm), update_cosine(fm)
    for s in range(5):
        for t in range(5):
            assert float(rows[s, t]) == pytest.approx(dense_overlap(dense[s].T, dense[t].T), abs=1e-4)
            assert float(cols[s, t]) == pytest.approx(dense_overlap(dense[s], dense[t]), abs=1e-4)
            expected = float((dense[s] * dense[t]).sum() / (dense[s].norm() * dense[t].norm()))
            assert float(cos[s, t]) == pytest.approx(expected, abs=1e-5)
    assert float(rows[0, 1]) == pytest.approx(1.0, abs=1e-5) and float(cols[2, 3]) == pytest.approx(1.0, abs=1e-5)


def test_heatmaps_show_the_planners_similarity():
    from hydraopt_mobile.analysis import module_similarity

    factors = random_factors()
    fm = factor_space(factors)
    sims = module_similarity(factors)
    assert torch.equal(torch.tensor(sims["subspace_A"], dtype=torch.float64), row_space_overlap(fm))
    assert torch.equal(torch.tensor(sims["cos_dW"], dtype=torch.float64), update_cosine(fm).double())
