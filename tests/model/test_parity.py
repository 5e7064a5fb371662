"""Stage-by-stage parity with the upstream PyTorch reference fixture, through the real checkpoint converter."""

import numpy as np
import pytest

from sammed3d_jax import parity
from sammed3d_jax.checkpoint.pth_reader import read_state_dict

EXPECTED_STAGES = {
    "image_embeddings", "dense_pe", "sparse_embeddings", "dense_embeddings_mask", "dense_embeddings_nomask",
    "masks_upsampled_single", "enc_patch_embed_pos", "enc_block0_out", "enc_first_global_block_out",
    "dec_transformer_queries", "dec_transformer_keys", "dec_upscaled_embedding",
    *(f"{k}_{m}{s}" for k in ("low_res_masks", "iou_predictions") for m in ("single", "multi") for s in ("", "_nomask")),
}


@pytest.fixture(scope="module")
def tiny_rows(tiny_fixture_dir):
    return parity.check_fixture(str(tiny_fixture_dir))


def test_every_golden_array_is_compared(tiny_rows, tiny_fixture_dir):
    rows, unknown = tiny_rows
    assert unknown == []
    with np.load(tiny_fixture_dir / "golden.npz") as g:
        outputs = set(g.files) - set(parity.INPUTS)
    assert {r.name for r in rows} == outputs == EXPECTED_STAGES


@pytest.mark.parametrize("name", sorted(EXPECTED_STAGES))
def test_stage_within_fixture_tolerance(tiny_rows, name):
    """Tolerances are the fixture README's (rtol 1e-5; atol 5e-5 encoder intermediates, 2e-5 the rest)."""
    row = {r.name: r for r in tiny_rows[0]}[name]
    assert (row.rtol, row.atol) == (parity.ENC_TOL if name.startswith("enc_") else parity.TOL)
    assert row.ok, f"{name}: max abs err {row.max_abs_err:.3e}"


def test_scanned_rematerialised_encoder_passes_too(tiny_fixture_dir):
    """The fixture's encoder (window, global) x 2 runs as a scan over the two repeats, blocks rematerialised."""
    rows, unknown = parity.check_fixture(str(tiny_fixture_dir), scan_encoder_blocks=True,
                                         remat_policy="save_qkv_attention_out")
    assert unknown == [] and {r.name for r in rows} == EXPECTED_STAGES
    assert [r.name for r in rows if not r.ok] == []


def test_cli_fails_on_a_perturbed_weight(tiny_fixture_dir, tmp_path):
    sd = read_state_dict(tiny_fixture_dir / "weights.npz")
    sd["image_encoder.blocks.0.attn.rel_pos_w"] = sd["image_encoder.blocks.0.attn.rel_pos_w"] + 1e-3
    np.savez(tmp_path / "w.npz", **sd)
    lines = []
    assert parity.main([str(tiny_fixture_dir), "--weights", str(tmp_path / "w.npz")], lines.append) == 1
    table = "\n".join(lines)
    assert "enc_block0_out" in table and "FAIL" in table
    assert parity.main([str(tiny_fixture_dir)], lines.append) == 0

