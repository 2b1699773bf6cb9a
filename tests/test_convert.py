"""Exact LoRA factors of every LoHa/LoKr variant (docs/format.md#factor-shapes): ``up @ down``
equals the module's ΔW within 1e-6 relative, on real LyCORIS files, at the rank ``exact_rank`` says."""

from __future__ import annotations

import pytest
import torch
from lycoris_oracle import VARIANTS
from test_spec_vectors import TV1, TV4, pat

from lohakr import LohakrError, load_adapter
from lohakr.loaders.convert import exact_lora, exact_rank

PLAIN = sorted(v for v in VARIANTS if "dora" not in v)


@pytest.mark.parametrize("variant", PLAIN)
def test_exact_lora_equals_the_update_of_every_variant(lycoris_file, variant):
    adapter = load_adapter(lycoris_file("sdxl", variant).path)
    assert adapter.modules
    for name, module in adapter.modules.items():
        shape = module.weight_shape
        factors = exact_lora(module)
        expected = module.delta(shape)
        error = float((factors.delta(shape) - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        assert error <= 1e-6, (name, error)
        assert factors.rank == exact_rank(module), name


def test_loha_rank_is_the_product_of_the_branch_ranks_and_lokr_of_the_factor_ranks():
    loha = load_adapter({f"m.{k}": v for k, v in TV1.items()}).modules["m"]
    assert exact_rank(loha) == 2 * 2 and torch.equal(exact_lora(loha).delta((4, 6)), loha.delta((4, 6)))
    lokr = load_adapter({f"m.{k}": v for k, v in TV4.items()} | {"m.alpha": torch.tensor(0.5)}).modules["m"]
    assert exact_rank(lokr) == 2 * 1  # full 2×2 w1 (rank 2) ⊗ rank-1 w2
    assert torch.allclose(exact_lora(lokr).delta((4, 6)), lokr.delta((4, 6)), rtol=0, atol=1e-7)


def test_dora_has_no_exact_lora(lycoris_file):
    adapter = load_adapter(lycoris_file("sdxl", "lokr_dora_out").path)
    module = next(m for m in adapter.modules.values() if m.dora)
    with pytest.raises(LohakrError, match="DoRA rescales by the patched weight's norms"):
        exact_lora(module)


def test_locon_with_a_tucker_mid_and_a_full_diff():
    up, down, mid = pat((5, 2, 1, 1), 1), pat((3, 4, 1, 1), 2), pat((2, 3, 3, 3), 3)
    locon = load_adapter({"m.lora_up.weight": up, "m.lora_down.weight": down, "m.lora_mid.weight": mid,
                          "m.alpha": torch.tensor(3.0)}).modules["m"]
    assert torch.allclose(exact_lora(locon).delta((5, 4, 3, 3)), locon.delta((5, 4, 3, 3)), rtol=0, atol=1e-6)
    diff = load_adapter({"m.diff": pat((4, 6), 4)}).modules["m"]
    assert exact_rank(diff) == 4 and torch.equal(exact_lora(diff).delta((4, 6)), diff.delta((4, 6)))


def relative_error(conversion, module):
    shape = module.weight_shape
    delta = module.delta(shape)
    return float((conversion.factors.delta(shape) - delta).norm() / delta.norm())


@pytest.mark.parametrize("max_error", [1e-1, 1e-2, 1e-3])
def test_svd_at_a_requested_error_stays_within_it_and_reports_it(lycoris_file, max_error):
    from lohakr.loaders.convert import to_lora

    adapter = load_adapter(lycoris_file("sdxl", "loha").path)  # rank-4 branches: exact rank 16
    for name, module in list(adapter.modules.items())[:40]:
        conversion = to_lora(module, rank=64, max_error=max_error)
        actual = relative_error(conversion, module)
        assert conversion.method == "svd" and actual <= max_error * (1 + 1e-3) + 1e-6, (name, actual)
        assert abs(actual - conversion.error) <= 1e-4 + 1e-3 * conversion.error, (name, actual, conversion.error)
        assert conversion.rank <= exact_rank(module)


def test_rank_chooses_between_exact_and_svd(lycoris_file):
    from lohakr.loaders.convert import to_lora

    module = next(iter(load_adapter(lycoris_file("sdxl", "loha").path).modules.values()))
    assert exact_rank(module) == 16
    assert to_lora(module, rank=16).method == "exact" and to_lora(module).method == "exact"
    low = to_lora(module, rank=3)
    assert low.method == "svd" and low.rank == 3 and low.error == pytest.approx(relative_error(low, module), abs=1e-4)
    with pytest.raises(LohakrError, match="a rank is a positive integer"):
        to_lora(module, rank=0)
