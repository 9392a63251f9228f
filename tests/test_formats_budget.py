import pytest
import torch

from hydraopt_mobile.formats import NumberFormat, StoredFactor
from hydraopt_mobile.errors import UserError
from hydraopt_mobile.merge.budget import Budget


@pytest.mark.parametrize("label,max_rel", [("fp16", 1e-3), ("int8", 1e-2), ("int4-g32", 0.15), ("int4-g128", 0.2)])
def test_roundtrip_error_and_exact_bytes(label, max_rel):
    fmt = NumberFormat.parse(label)
    m = torch.randn(8, 200)  # 200 is not a multiple of the group size: padding is counted
    for transposed in (False, True):
        st = StoredFactor.encode(m if not transposed else m.T.contiguous(), fmt, transposed)
        back = st.values()
        assert back.shape == st.shape
        rel = float((back - (m if not transposed else m.T)).norm() / m.norm())
        assert rel < max_rel
        payload = sum(t.numel() * t.element_size() for t in st.data.values())
        assert payload == st.nbytes()


def test_int4_packs_two_values_per_byte():
    fmt = NumberFormat("int4", 32)
    assert fmt.nbytes(4, 64) == 4 * 32 + 2 * 4 * 2
    assert fmt.nbytes(1, 33) == 64 // 2 + 2 * 2  # padded to 64


def test_bad_format_named():
    with pytest.raises(ValueError, match="--format 'int3'"):
        NumberFormat("int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--group-size 48"):
        NumberFormat("int4", 48)


def test_budget_parse():
    assert Budget.parse("0.5").resolve(1000) == 500
    assert Budget.parse("12MB").resolve(1) == 12_000_000
    assert Budget.parse("1KiB").nbytes == 1024
    for bad in ("1.5", "abc", "3 parsecs"):
        with pytest.raises(UserError, match="--budget"):
            Budget.parse(bad)
