"""The fast merge's identities against dense references, and a merge streamed from disk."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydraopt_mobile.adapters import AdapterError, LoraFactors, build_adapter_set, load_adapter
from hydraopt_mobile.bundle import load_bundle, write_bundle
from hydraopt_mobile.calibration import identity
from hydraopt_mobile.factored import b_gram, factor_space, whitened
from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.merge.budget import Budget, InfeasibleBudget
from hydraopt_mobile.merge.candidates import HydraOptConfig, build_modules, plan_candidates
from hydraopt_mobile.merge.registry import MergeConfig, merge_budgets, merge_to_bundles
from hydraopt_mobile.merge import solver
from hydraopt_mobile.merge.solver import closed_form_errors, fit_stored, input_space_A, row_spaces, solve_layout, stored_A, stored_errors
from hydraopt_mobile.merge.spill import StoredASpill
from hydraopt_mobile.storage import BLOB, FILE_METADATA, TensorSpec, factor_specs, file_order, header_bytes


def random_factors(T=5, d_out=24, d_in=40, ranks=(3, 4, 2, 4, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)) for r in ranks[:T]]


@pytest.mark.parametrize("d_in", [40, 9])  # 9 < sum of ranks: the stacked A's span all of d_in
def test_factored_gram_equals_stacked(d_in):
    """D^T D of the stacked dense updates = Q (sum_t a_t^T B_t^T B_t a_t) Q^T, and A_t = a_t Q^T."""
    factors = random_factors(d_in=d_in)
    fm = factor_space(factors)
    dense = torch.cat([f.dense().double() for f in factors])
    middle = sum(fm.a[t].T.double() @ (fm.B[t].T.double() @ fm.B[t].double()) @ fm.a[t].double() for t in range(5))
    Q = fm.to_input_space(torch.eye(fm.q)).T.double()  # (d_in, q): Q's columns
    assert torch.allclose(Q.T @ Q, torch.eye(fm.q, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(fm.basis().double(), Q, atol=1e-6)  # the one place Q is formed
    rows = torch.randn(3, d_in)
    assert torch.allclose(fm.to_coords(rows).double(), rows.double() @ Q, atol=1e-5)
    assert torch.allclose(Q @ middle @ Q.T, dense.T @ dense, rtol=1e-4, atol=1e-3)
    for t, f in enumerate(factors):
        assert torch.allclose(fm.to_input_space(fm.a[t, : f.rank]), f.A, atol=1e-5)
    assert torch.allclose(fm.sq_norms.double(), torch.stack([(f.dense().double() ** 2).sum() for f in factors]), rtol=1e-4)


@pytest.mark.parametrize("b_index", [[0] * 5, [0, 0, 1, 1, 2]])
@pytest.mark.parametrize("d_out", [24, 6])  # 6: the B-groups' rows do not span Q, so the rows themselves are decomposed
def test_shared_a_row_spaces_from_the_b_gram_equal_the_qr_ones(b_index, d_out):
    """A shared A's row spaces from the module's B Gram (no QR of each B-group, solver._shared_a_gram)
    equal those from the B-groups' QRs: the same squared singular values and the same leading
    subspaces, and the shared-A layouts the planner tries at every rank give the same error."""
    factors = random_factors(d_out=d_out)
    fm = factor_space(factors)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    (qr,) = row_spaces(fm, w, [0] * 5, b_index, top=6)
    (gram,) = row_spaces(fm, w, [0] * 5, b_index, top=6, b_gram=b_gram(fm.B))
    assert gram.members == qr.members and (gram.coef is None) == (qr.coef is None)  # the Gram where the rows span Q
    assert d_out == 6 or gram.coef is None
    assert torch.allclose(gram.s2, qr.s2, rtol=1e-4, atol=1e-5 * float(qr.s2[0]))
    for k in (1, 3):
        P, P0 = gram.vh[:k].T @ gram.vh[:k], qr.vh[:k].T @ qr.vh[:k]
        assert torch.allclose(P, P0, atol=1e-4)
    errors = closed_form_errors(fm, w, [gram], [1, 3, 6]), closed_form_errors(fm, w, [qr], [1, 3, 6])
    assert errors[0] == pytest.approx(errors[1], rel=1e-4)


@pytest.mark.parametrize("groups", [[[0, 1, 2, 3, 4]], [[0, 1], [2, 3], [4]], [[0, 3], [1, 2, 4]], [[t] for t in range(5)]])
@pytest.mark.parametrize("d_in,white", [(40, False), (40, True), (9, False)])  # 9: a is not square (q = 9 < T r = 20)
def test_shared_a_gram_equals_the_dense_sum(groups, d_in, white):
    """solver._shared_a_gram (trmm with the triangular stacked a where it is square, plain or
    whitened; general products where it is not) equals sum_h C_h^T G_h C_h / W_h in float64."""
    fm = factor_space(random_factors(d_in=d_in))
    w = torch.rand(5, dtype=torch.float64) + 0.5
    if white:
        g = torch.Generator().manual_seed(3)
        X = torch.randn(5, fm.q, 2 * fm.q, generator=g)
        fm = whitened(replace(fm, S=X @ X.transpose(1, 2) / X.shape[2] + 0.1 * torch.eye(fm.q)), w)
    assert fm.square_a == (d_in == 40)
    if fm.square_a:
        assert torch.equal(fm.a.reshape(fm.q, fm.q), fm.a.reshape(fm.q, fm.q).tril())
    gb = b_gram(fm.B)
    r = fm.a.shape[1]
    dense = torch.zeros(fm.q, fm.q, dtype=torch.float64)
    for h in groups:
        C = fm.a[h].reshape(len(h) * r, fm.q).double()
        G = (gb[h][:, :, h].double() * (w[h].view(-1, 1, 1, 1) * w[h].view(1, 1, -1, 1))).reshape(len(h) * r, len(h) * r)
        dense += C.T @ G @ C / w[h].sum()
    got = solver._shared_a_gram(fm, w.float(), groups, gb).double()
    assert torch.allclose(got, dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max()))


@pytest.mark.parametrize("a_index", [[0, 1, 2, 3, 4], [0, 0, 1, 1, 0], [0] * 5])
def test_group_solutions_map_to_input_space_without_Q(a_index):
    """With a B per task, each A-group's A^ from its own tasks' A's equals a^ Q^T."""
    factors = random_factors()
    fm = factor_space(factors)
    sol = solve_layout(fm, torch.rand(5, dtype=torch.float64) + 0.5, a_index, list(range(5)), rank=3)
    assert (sol.A_coef is not None) == (a_index != [0] * 5)  # one shared A of all tasks goes through Q
    assert torch.allclose(input_space_A(fm, sol), fm.to_input_space(sol.a), atol=1e-5)


@pytest.mark.parametrize("layout", [([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), ([0, 0, 1, 1, 0], [0, 1, 2, 3, 4]), ([0] * 5, [0, 0, 1, 1, 2])])
@pytest.mark.parametrize("fmt", ["int4-g32", "int8", "fp16"])
def test_stored_errors_equal_dense_errors(layout, fmt):
    """fit_stored's per-task errors (from A_t Aq^T, never Q coordinates) are those of the dense
    updates against what is stored, parts of the stored A outside span(Q) included."""
    factors = random_factors()
    w = torch.rand(5, dtype=torch.float64) + 0.5
    fm = factor_space(factors)
    module, err = fit_stored(fm, w, solve_layout(fm, w, *layout, rank=3), NumberFormat.parse(fmt))
    for t, f in enumerate(factors):
        served = module.task_factors(t)
        dense = float(w[t]) * float(((f.dense().double() - served.dense().double()) ** 2).sum())
        scale = float(w[t]) * float((f.dense().double() ** 2).sum())  # fp32 traces: error to ~1e-6 of ||dW_t||^2
        assert float(err[t]) == pytest.approx(dense, rel=1e-4, abs=1e-5 * scale)


@pytest.mark.parametrize("a_index, rank", [([0] * 5, 3), ([0] * 5, 20), ([0, 0, 1, 1, 2], 6)])  # rank 20 > q: zero rows, a singular A Gram
@pytest.mark.parametrize("fmt", ["int4-g32", "int8"])
def test_per_task_errors_through_normal_equations_equal_direct_traces(a_index, rank, fmt):
    """With a B per task, fit_stored measures ||dW_t - (F_t + E_t) A^||^2 as ||dW_t||^2 - ||F_t A^||^2 +
    ||E_t A^||^2 (the least-squares fit's residual is orthogonal to any X A^): equal to the direct
    traces with the stored B's (solver.stored_error), pseudo-inverse of a singular Gram included."""
    factors = random_factors()
    fm = factor_space(factors)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    module, err = fit_stored(fm, w, solve_layout(fm, w, a_index, list(range(5)), rank=rank), NumberFormat.parse(fmt))
    direct = solver.stored_error(fm, w, module)
    assert float((err - direct).abs().max()) <= 1e-6 * float((w * fm.sq_norms).max())
    assert float(err.min()) > 0  # rounding: a non-zero error to compare


def test_planner_price_is_the_parts_a_file_holds():
    """The planner prices a factor by NumberFormat.nbytes: exactly the bytes of the parts it adds to its file's blob."""
    for fmt in (NumberFormat("fp16"), NumberFormat("int8"), NumberFormat("int4", 32), NumberFormat("int4", 64)):
        for n, length in ((1, 1), (5, 300), (16, 2048), (3, 33)):
            assert fmt.nbytes(n, length) == sum(s.nbytes for s in factor_specs(12, "B", 3, fmt, n, length)), (fmt.label(), n, length)


@pytest.mark.parametrize("fmt", ["int4-g32", "int8", "fp16"])
def test_stacked_encoding_equals_one_by_one(fmt):
    fmt = NumberFormat.parse(fmt)
    m = torch.randn(3, 70, 5)
    stack, values = StoredFactor.encode_stack(m, fmt, transposed=True)
    for i in range(3):
        one = StoredFactor.encode(m[i], fmt, transposed=True)
        assert all(torch.equal(one.data[k], stack[i].data[k]) for k in one.data)
        assert torch.equal(one.values(), values[i])


def test_header_bytes_are_safetensors_own(tmp_path):
    """BundleWriter writes storage.header_bytes itself: it must be what safetensors writes for the blob."""
    tensors = {"3.B.q": torch.randint(0, 255, (4, 33), dtype=torch.uint8), "3.B.scale": torch.randn(4, 2).half(), "10.A0.w": torch.randn(2, 7)}
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    blob = torch.cat([tensors[s.key].reshape(-1).view(torch.uint8) for s in file_order(specs)])
    save_file({BLOB: blob}, str(tmp_path / "x.safetensors"), metadata=FILE_METADATA)
    raw = (tmp_path / "x.safetensors").read_bytes()
    head = header_bytes(specs)
    assert raw[: len(head)] == head and len(raw) == len(head) + blob.numel()


@pytest.mark.parametrize("method, calibrated", [("hydraopt", False), ("hydraopt", True), ("compeft", False)])
def test_streamed_merge_writes_the_same_bundle(make_adapters, tmp_path, method, calibrated):
    """A bank merged from adapters read module by module and written as it is built is the same
    bundle, byte for byte (tensor files and manifest), as the in-memory merge written at the end."""
    paths = make_adapters(n_tasks=5, rank=4, noise=0.3)
    eager = build_adapter_set([load_adapter(p) for p in paths])
    config = MergeConfig(method, calibration=identity(eager) if calibrated else None)
    budgets = [Budget(fraction=f) for f in (0.001, 0.2, 0.5)]  # the first is infeasible
    banks = merge_budgets(eager, config, budgets, strict=False)
    lazy = build_adapter_set([load_adapter(p, lazy=True) for p in paths])
    outs = [tmp_path / f"streamed{i}" for i in range(3)]
    written = merge_to_bundles(lazy, config, budgets, outs)
    assert isinstance(banks[0], InfeasibleBudget) and isinstance(written[0], InfeasibleBudget) and not outs[0].exists()
    for i in (1, 2):
        write_bundle(banks[i], tmp_path / f"memory{i}")
        files = sorted(p.relative_to(outs[i]) for p in outs[i].rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(tmp_path / f"memory{i}") for p in (tmp_path / f"memory{i}").rglob("*") if p.is_file())
        assert len(files) > 2
        for rel in files:
            assert (outs[i] / rel).read_bytes() == (tmp_path / f"memory{i}" / rel).read_bytes(), rel
        assert json.loads((outs[i] / "manifest.json").read_text())["rel_errors"] == banks[i].rel_errors
        reread = load_bundle(outs[i])
        assert reread.modules.keys() == banks[i].modules.keys()


def test_lazy_adapter_reads_modules_on_use_and_names_bad_values(make_adapters):
    (p,) = make_adapters(n_tasks=1, rank=4)
    eager, lazy = load_adapter(p), load_adapter(p, lazy=True)
    assert lazy.module_meta() == eager.module_meta() and list(lazy.modules) == list(eager.modules)
    for name, f in eager.modules.items():
        assert torch.equal(lazy.modules[name].A, f.A) and torch.equal(lazy.modules[name].B, f.B)
    st = p / "adapter_model.safetensors"
    tensors = load_file(str(st))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(st))
    lazy = load_adapter(p, lazy=True)  # the header is fine
    lazy.modules["model.layers.0.self_attn.q_proj"]  # so is another module
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: tensor '.*layers\.1\.self_attn\.v_proj\.lora_B\.weight' contains NaN"):
        lazy.modules["model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lazy_reads_at_the_headers_offsets_equal_the_library(make_adapters, dtype):
    """A lazy adapter reads each tensor at the offsets its header gave on opening (adapters.LazyModules):
    in every float dtype adapters come in, its modules equal the eager load's (the library's reader)."""
    (p,) = make_adapters(n_tasks=1, rank=4)
    st = p / "adapter_model.safetensors"
    save_file({k: t.to(dtype) for k, t in load_file(str(st)).items()}, str(st))
    eager, lazy = load_adapter(p), load_adapter(p, lazy=True)
    assert len(eager.modules) == len(lazy.modules) > 1
    for name, f in eager.modules.items():
        assert torch.equal(lazy.modules[name].A, f.A) and torch.equal(lazy.modules[name].B, f.B), name


def test_lazy_adapter_cut_short_after_opening_names_the_tensor(make_adapters):
    (p,) = make_adapters(n_tasks=1, rank=4)
    lazy = load_adapter(p, lazy=True)
    st = p / "adapter_model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[: 8 + int.from_bytes(raw[:8], "little") + 4])  # the header and 4 bytes of data
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: tensor '.*' is cut short"):
        lazy.modules[next(iter(lazy.modules))]


@pytest.mark.parametrize("layout", [([0] * 5, list(range(5))), (list(range(5)), list(range(5))), ([0, 0, 1, 1, 2], list(range(5)))])
def test_a_closed_forms_leading_rows_are_its_lower_rank(layout):
    """The planner encodes a closed form's A's once at its largest rank and cuts them for every
    smaller rank (candidates.py, StoredA.leading): the codes equal encoding the smaller rank's A's,
    and the fitted errors equal fitting that rank from scratch."""
    factors = random_factors()
    w = torch.rand(5, dtype=torch.float64) + 0.5
    fm = factor_space(factors)
    fmt = NumberFormat.parse("int4-g32")
    top = stored_A(fm, solve_layout(fm, w, *layout, rank=6, with_B=False), fmt)
    for rank in (1, 3, 6):
        sol = solve_layout(fm, w, *layout, rank=rank, with_B=False)
        cut, fresh = top.leading(rank), stored_A(fm, sol, fmt)
        for a, b in zip(cut.factors, fresh.factors, strict=True):
            assert a.shape == b.shape == (rank, 40)
            assert all(torch.equal(a.data[k], b.data[k]) for k in b.data)
        _, err_cut = fit_stored(fm, w, sol, fmt, cut)
        _, err_fresh = fit_stored(fm, w, sol, fmt)
        assert torch.allclose(err_cut, err_fresh, rtol=1e-4, atol=1e-6 * float(err_fresh.max()))


def test_merge_bytes_do_not_depend_on_the_thread_count(make_adapters, tmp_path):
    """Modules run one per thread, each op on one thread (parallel.py): a merge on two threads
    writes the same bundles, byte for byte, as on one, and leaves the caller's thread count as it was."""
    lazy = build_adapter_set([load_adapter(p, lazy=True) for p in make_adapters(n_tasks=6, rank=8, noise=0.3, hidden=256, kv=64)])
    budgets = [Budget(fraction=f) for f in (0.15, 0.5)]
    before = torch.get_num_threads()
    files = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs = [tmp_path / f"t{threads}-{i}" for i in range(len(budgets))]
            merge_to_bundles(lazy, MergeConfig("hydraopt"), budgets, outs)
            assert torch.get_num_threads() == threads
            files[threads] = {(i, p.relative_to(out)): p.read_bytes() for i, out in enumerate(outs) for p in sorted(out.rglob("*")) if p.is_file()}
    finally:
        torch.set_num_threads(before)
    assert len(files[1]) > 4 and files[1] == files[2]


def test_a_merges_recorded_errors_are_the_banks_own(make_adapters):
    """The relative errors a merge records from its module workers (MergedModule.sq_errors: for
    modules built from the first pass's stored A's, the fit's own errors in the factored space)
    equal the bank's errors recomputed from its stored factors against the same adapters, to float32
    rounding; a copy made with replace() (as bundle writing does when it reorders tasks) does not carry them."""
    import dataclasses

    adapters = build_adapter_set([load_adapter(p) for p in make_adapters(n_tasks=5, rank=4, noise=0.3)])
    for method in ("hydraopt", "compeft"):
        bank = merge_budgets(adapters, MergeConfig(method), [Budget(fraction=0.3)])[0]
        assert bank.measured_relative_errors() is not None
        assert bank.rel_errors == pytest.approx(bank.relative_errors(adapters), rel=1e-5)
        assert max(bank.rel_errors.values()) > 0
        module = next(iter(bank.modules.values()))
        assert dataclasses.replace(module, a_index=list(module.a_index)).sq_errors is None


def test_modules_built_from_the_spilled_A_are_the_rebuilt_ones(make_adapters, tmp_path):
    """The build pass takes each chosen candidate's encoded A's from the file the candidate pass
    left (spill.py) instead of rebuilding the factored space: for every candidate the planner
    measured (each as the choice of one plan), the module is the rebuilt one, byte for byte, and its
    recorded errors equal the recomputed ones to float32 rounding."""
    adapters = build_adapter_set([load_adapter(p) for p in make_adapters(n_tasks=6, rank=8, noise=0.3, hidden=256, kv=64)])
    cfg = HydraOptConfig(formats=tuple(NumberFormat.parse(f) for f in ("int4-g32", "int8", "fp16")))
    (tmp_path / "spill").mkdir()
    spill = StoredASpill(tmp_path / "spill")
    candidates = plan_candidates(adapters, cfg, spill=spill)
    assert len(list((tmp_path / "spill").iterdir())) == len(adapters.module_names)
    n = max(len(c) for c in candidates.values())
    plans = [{name: cands[min(i, len(cands) - 1)] for name, cands in candidates.items()} for i in range(n)]
    spilled, rebuilt = build_modules(adapters, cfg, plans, spill=spill), build_modules(adapters, cfg, plans)
    closed_forms = from_fit = 0
    for plan, a, b in zip(plans, spilled, rebuilt, strict=True):
        for name, chosen in plan.items():
            x, y = a[name], b[name]
            closed_forms += chosen.rank > 0
            from_fit += not torch.equal(x.sq_errors[0], y.sq_errors[0])  # the fit's errors, not recomputed: built from the spill
            assert (x.shape, x.a_index, x.b_index) == (y.shape, y.a_index, y.b_index)
            for f, g in zip(x.A + x.B, y.A + y.B, strict=True):
                assert (f.fmt, f.shape, f.transposed) == (g.fmt, g.shape, g.transposed)
                assert f.data.keys() == g.data.keys() and all(torch.equal(f.data[k], g.data[k]) for k in f.data)
            assert torch.allclose(x.sq_errors[0], y.sq_errors[0], rtol=1e-4, atol=1e-6 * float(y.sq_errors[1].max()))
            assert torch.allclose(x.sq_errors[1], y.sq_errors[1], rtol=1e-5)
    assert closed_forms > 2 * len(adapters.module_names) and from_fit > len(adapters.module_names)


@pytest.mark.parametrize("b_index", [list(range(5)), [0, 0, 1, 1, 2], [1, 0, 1, 0, 0], [0] * 5])
def test_b_fits_in_chunks_equal_one_fit(monkeypatch, b_index):
    """Fitting and measuring B's a few groups at a time (solver.CHUNK_BYTES, which keeps the large
    temporaries of 8B-sized modules out of mmap) gives the codes and errors of one fit of all groups."""
    factors = random_factors()
    fm = factor_space(factors)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    fmt = NumberFormat.parse("int4-g32")
    sol = solve_layout(fm, w, [0, 0, 1, 1, 0], b_index, rank=3)
    stored = stored_A(fm, sol, fmt)
    whole, err = fit_stored(fm, w, sol, fmt, stored)
    measured = stored_errors(fm, w, sol, fmt, stored)
    monkeypatch.setattr(solver, "CHUNK_BYTES", 4 * 24 * 3)  # one B-group per chunk
    chunked, err_chunked = fit_stored(fm, w, sol, fmt, stored)
    assert torch.equal(err, err_chunked) and torch.equal(measured, stored_errors(fm, w, sol, fmt, stored)) and torch.equal(err, measured)
    assert len(chunked.B) == len(whole.B) == max(b_index) + 1
    for f, g in zip(whole.B, chunked.B, strict=True):
        assert f.shape == g.shape and all(torch.equal(f.data[k], g.data[k]) for k in f.data)


@pytest.mark.parametrize("a_index", [list(range(5)), [0, 0, 1, 1, 2], [1, 0, 1, 0, 0]])
def test_a_encoded_in_chunks_equal_one_encoding(monkeypatch, a_index):
    """Encoding a closed form's A's and their products a few A-groups at a time (solver.CHUNK_BYTES)
    gives the codes and products of one encoding of all groups."""
    factors = random_factors()
    fm = factor_space(factors)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    sol = solve_layout(fm, w, a_index, list(range(5)), rank=3, with_B=False)
    assert sol.A_coef is not None
    whole = stored_A(fm, sol, NumberFormat.parse("int4-g32"))
    monkeypatch.setattr(solver, "CHUNK_BYTES", 4 * 40 * 3)  # one A-group per chunk
    chunked = stored_A(fm, sol, NumberFormat.parse("int4-g32"))
    assert torch.equal(whole.cross, chunked.cross) and torch.equal(whole.gram, chunked.gram) and whole.index == chunked.index
    assert len(whole.factors) == len(chunked.factors) == max(a_index) + 1
    for f, g in zip(whole.factors, chunked.factors, strict=True):
        assert f.shape == g.shape and all(torch.equal(f.data[k], g.data[k]) for k in f.data)
