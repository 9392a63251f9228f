"""The data-aware objective: factored identities against dense references, X_t = I, monotone ALS,
and the moments collected from a real (tiny) model."""

from __future__ import annotations

import pytest
import torch

from hydraopt_mobile.adapters import LoraFactors, build_adapter_set, load_adapter
from hydraopt_mobile.calibration import ModuleMoments, collect, identity, read_texts
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.factored import factor_space
from hydraopt_mobile.merge.budget import Budget
from hydraopt_mobile.merge.registry import MergeConfig, merge
from hydraopt_mobile.formats import NumberFormat
from hydraopt_mobile.merge.solver import fit_stored, objective, solve_layout, stored_error

D = torch.float64


def problem(T=3, d_out=10, d_in=6, r=2, seed=0):
    """Factors, dense moments S_t = X_t^T X_t / n_t (anisotropic, different per task) and their
    projection; d_in = T r, so span(Q) is the whole input space and nothing is restricted."""
    g = torch.Generator().manual_seed(seed)
    factors = [LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)) for _ in range(T)]
    X = [torch.randn(40, d_in, generator=g, dtype=D) * torch.logspace(0, 1.5, d_in, dtype=D) for _ in range(T)]
    S = [x.T @ x / 40 for x in X]
    Q = factor_space(factors).basis().to(D)
    moments = ModuleMoments(S=torch.stack([Q.T @ s @ Q for s in S]).float(), outside=torch.zeros(T))
    return factors, S, factor_space(factors, moments)


def dense_objective(factors, S, w, dW_hat):
    return sum(float(w[t]) * float(torch.trace((f.dense().to(D) - dW_hat[t]) @ S[t] @ (f.dense().to(D) - dW_hat[t]).T)) for t, f in enumerate(factors))


def solution_dense(fm, sol):
    return [(sol.B[sol.b_index[t]] @ sol.a[sol.a_index[t]] @ fm.basis().T).to(D) for t in range(fm.n_tasks)]


def test_per_task_layout_equals_the_dense_weighted_svd():
    """k_A = k_B = T at rank 1 < r: the best rank-1 M_t under ||(dW_t - M_t) L_t||, S_t = L_t L_t^T,
    is the truncated SVD of dW_t L_t times L_t^-1."""
    factors, S, fm = problem()
    w = torch.tensor([1.0, 0.5, 2.0], dtype=D)
    sol = solve_layout(fm, w, [0, 1, 2], [0, 1, 2], rank=1, max_iters=300, tol=1e-14)
    reference = []
    for f, s in zip(factors, S):
        L = torch.linalg.cholesky(s)
        U, sv, Vh = torch.linalg.svd(f.dense().to(D) @ L)
        reference.append(sv[0] * torch.outer(U[:, 0], Vh[0]) @ torch.linalg.inv(L))
    ours, ref = dense_objective(factors, S, w, solution_dense(fm, sol)), dense_objective(factors, S, w, reference)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert float(objective(fm, w, sol).sum()) == pytest.approx(ours, rel=1e-4)


def test_shared_layout_is_a_stationary_point_of_the_dense_objective():
    """k_A = 1, k_B = 2 (no closed form with per-task moments): at the ALS solution the dense
    objective's gradients in A^ and in each B^ vanish, and the factored objective equals the dense one."""
    factors, S, fm = problem(T=4, seed=1)
    w = torch.ones(4, dtype=D)
    b_index = [0, 0, 1, 1]
    sol = solve_layout(fm, w, [0] * 4, b_index, rank=2, max_iters=500, tol=1e-15)
    A = fm.to_input_space(sol.a[0]).to(D).requires_grad_(True)
    B = sol.B.to(D).clone().requires_grad_(True)
    loss = dense_objective_torch(factors, S, w, A, B, b_index)
    gA, gB = torch.autograd.grad(loss, (A, B))
    scale = float(loss.detach()) / max(float(A.detach().norm()), 1e-12)
    assert float(gA.norm()) < 1e-3 * scale and float(gB.norm()) < 1e-3 * float(loss.detach()) / float(B.detach().norm())
    assert float(objective(fm, w, sol).sum()) == pytest.approx(float(loss.detach()), rel=1e-4)


def dense_objective_torch(factors, S, w, A, B, b_index):
    total = 0
    for t, f in enumerate(factors):
        E = f.dense().to(D) - B[b_index[t]] @ A
        total = total + w[t] * torch.trace(E @ S[t] @ E.T)
    return total


def test_factored_objective_equals_dense_when_the_inputs_are_wider_than_the_span():
    """d_in > sum r_t: only Q^T S_t Q is kept, and for A^ in span(Q) that is exact."""
    g = torch.Generator().manual_seed(2)
    factors = [LoraFactors(torch.randn(2, 30, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
    X = [torch.randn(50, 30, generator=g, dtype=D) for _ in range(3)]
    S = [x.T @ x / 50 for x in X]
    Q = factor_space(factors).basis().to(D)
    fm = factor_space(factors, ModuleMoments(S=torch.stack([Q.T @ s @ Q for s in S]).float(), outside=torch.ones(3)))
    w = torch.ones(3, dtype=D)
    sol = solve_layout(fm, w, [0, 0, 0], [0, 1, 2], rank=2)
    assert float(objective(fm, w, sol).sum()) == pytest.approx(dense_objective(factors, S, w, solution_dense(fm, sol)), rel=1e-4)
    assert fm.sq_norms.tolist() == pytest.approx([float(torch.trace(f.dense().to(D) @ s @ f.dense().to(D).T)) for f, s in zip(factors, S)], rel=1e-4)


@pytest.mark.parametrize("layout", [([0, 1, 2], [0, 1, 2]), ([0, 0, 0], [0, 1, 1])])
def test_stored_errors_with_calibration_equal_dense(layout):
    """fit_stored's and stored_error's per-task errors, where the stored (int4) A leaves span(Q):
    exact against the dense ``tr(E_t S_t E_t^T)`` when S_t is isotropic outside span(Q), which is
    what calibration.py's ``outside`` assumes."""
    g = torch.Generator().manual_seed(4)
    factors = [LoraFactors(torch.randn(2, 40, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
    Q = factor_space(factors).basis().to(D)
    inside = [(lambda m: m @ m.T / 6)(torch.randn(6, 6, generator=g, dtype=D)) + 0.1 * torch.eye(6, dtype=D) for _ in range(3)]
    outside = torch.tensor([0.5, 2.0, 1.0])
    S = [Q @ s @ Q.T + float(o) * (torch.eye(40, dtype=D) - Q @ Q.T) for s, o in zip(inside, outside)]
    fm = factor_space(factors, ModuleMoments(S=torch.stack(inside).float(), outside=outside))
    w = torch.tensor([1.0, 0.5, 2.0], dtype=D)
    module, err = fit_stored(fm, w, solve_layout(fm, w, *layout, rank=2), NumberFormat("int4", 32))
    served = [module.task_factors(t).dense().to(D) for t in range(3)]
    for t in range(3):
        E = factors[t].dense().to(D) - served[t]
        assert float(err[t]) == pytest.approx(float(w[t]) * float(torch.trace(E @ S[t] @ E.T)), rel=1e-4)
    # stored_error takes the traces with the stored B directly, fit_stored (a B per task) through the
    # fit's normal equations: two fp32 formulas of one quantity, equal to ~1e-6 of w_t ||dW_t||^2
    assert stored_error(fm, w, module).tolist() == pytest.approx(err.tolist(), rel=1e-5, abs=1e-6 * float((w * fm.sq_norms).max()))


def test_als_with_calibration_never_increases():
    factors, _, fm = problem(T=5, d_in=10, seed=3)
    sol = solve_layout(fm, torch.ones(5, dtype=D), [0, 0, 1, 1, 1], [0, 1, 2, 2, 0], rank=2, max_iters=40, tol=0)
    h = sol.history
    assert len(h) > 5
    assert all(b <= a * (1 + 1e-7) for a, b in zip(h, h[1:])), h
    assert h[-1] < h[0]


def test_identity_moments_give_the_data_free_bank(make_adapters):
    aset = build_adapter_set([load_adapter(p) for p in make_adapters(n_tasks=4, noise=0.3)])
    for fraction in (0.15, 0.6):
        free = merge(aset, MergeConfig("hydraopt", budget=Budget(fraction=fraction)))
        aware = merge(aset, MergeConfig("hydraopt", budget=Budget(fraction=fraction), calibration=identity(aset)))
        assert aware.params["calibration_tokens"] == {t: 0 for t in aset.task_names}
        # a code moved across a rounding boundary (below) moves a task's relative error by ~1e-5 here
        assert aware.rel_errors == pytest.approx(free.rel_errors, rel=1e-5, abs=2e-5)
        for name, m in free.modules.items():
            n = aware.modules[name]
            assert (m.layout, m.rank, m.fmt) == (n.layout, n.rank, n.fmt)
            for t in range(4):
                # equal up to float rounding (the data-free closed form maps its A's to d_in from the
                # tasks' own A's, ALS through Q), which can move a quantised code across a rounding
                # boundary: one int8 step of B is ~5e-4 here, the updates' entries ~5e-2
                assert torch.allclose(m.task_factors(t).dense(), n.task_factors(t).dense(), atol=1e-3)
    with pytest.raises(UserError, match="does not use data"):
        merge(aset, MergeConfig("ties", calibration=identity(aset)))


def word_tokenizer():
    """A real word-level tokenizer over a dozen words, with padding (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat ran on under mat tree quickly slowly".split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", *words])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def test_collect_on_a_real_model_ignores_padding(tmp_path):
    from tests.tiny_models import tiny_llama, tiny_peft_adapter

    tokenizer = word_tokenizer()
    aset = build_adapter_set([load_adapter(tiny_peft_adapter(tmp_path / f"t{i}", seed=i + 1), f"t{i}") for i in range(2)])
    texts = {"t0": ["the cat sat", "a dog ran on the mat quickly"], "t1": ["the tree", "a cat sat under the tree slowly", "dog"]}
    for task, rows in texts.items():
        (tmp_path / f"{task}.jsonl").write_text("".join(f'{{"text": "{r}"}}\n' for r in rows))
    assert read_texts(tmp_path, ["t0", "t1"]) == texts
    model = tiny_llama(0)
    batched, single = collect(model, tokenizer, aset, texts, batch_size=3), collect(model, tokenizer, aset, texts, batch_size=1)
    assert batched.tokens == {"t0": 10, "t1": 10}
    for name in aset.module_names:
        assert torch.allclose(batched.modules[name].S, single.modules[name].S, rtol=1e-4, atol=1e-6)
    # against the inputs captured directly
    name = aset.module_names[0]
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].double()))
    with torch.no_grad():
        for text in texts["t1"]:
            model(input_ids=tokenizer(text, return_tensors="pt").input_ids)
    handle.remove()
    X = torch.cat(seen)
    Q = factor_space(aset.factors(name)).basis().double()
    M = X.T @ X
    scaled = M * (M.shape[0] / torch.trace(M))  # mean eigenvalue 1 (calibration.py)
    assert torch.allclose(batched.modules[name].S[1].double(), Q.T @ scaled @ Q, rtol=1e-4, atol=1e-6)
    inside = torch.trace(Q.T @ scaled @ Q)
    assert float(batched.modules[name].outside[1]) == pytest.approx(float((M.shape[0] - inside) / (M.shape[0] - Q.shape[1])), rel=1e-4)
    (tmp_path / "t1.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="t1.jsonl:1: not JSON"):
        read_texts(tmp_path, ["t0", "t1"])


def test_restrict_equals_collecting_the_subset(tmp_path):
    """Moments restricted to a subset of the tasks equal the subset's own collected moments (row
    basis, projected S and outside), so a leave-one-out merge needs no second pass."""
    from tests.tiny_models import tiny_llama, tiny_peft_adapter

    from hydraopt_mobile.calibration import restrict

    tokenizer = word_tokenizer()
    tasks = [load_adapter(tiny_peft_adapter(tmp_path / f"t{i}", seed=i + 1), f"t{i}") for i in range(3)]
    full, part = build_adapter_set(tasks), build_adapter_set([tasks[2], tasks[0]])
    texts = {"t0": ["the cat sat", "a dog ran"], "t1": ["the tree slowly"], "t2": ["a cat sat under the tree quickly", "dog"]}
    model = tiny_llama(0)
    restricted = restrict(collect(model, tokenizer, full, texts), full, part)
    direct = collect(model, tokenizer, part, {t: texts[t] for t in part.task_names})
    assert restricted.tasks == ["t2", "t0"] and restricted.tokens == direct.tokens
    for name in part.module_names:
        a, b = restricted.modules[name], direct.modules[name]
        assert a.S.shape == b.S.shape
        assert torch.allclose(a.S, b.S, rtol=1e-4, atol=1e-6)
        assert torch.allclose(a.outside, b.outside, rtol=1e-4, atol=1e-6)
        assert float(b.outside.abs().max()) > 0  # the complement is not empty: the check above is not vacuous
    with pytest.raises(ValueError, match="restrict"):
        restrict(direct, part, full)
