"""The PyTorch comparison's pure pieces, without torch: weight perturbation, the shared click loop (checked against
our train step), the DiceCE reference, timing helpers, the table, and the command's refusals."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests" / "adversarial"))

import cli_assert  # noqa: E402
import compare_common as cc  # noqa: E402

from sammed3d_jax.model import ModelConfig, Sam3D, init_variables  # noqa: E402
from sammed3d_jax.training import losses, step as step_lib  # noqa: E402

SCRIPT = REPO / "benchmarks" / "compare_pytorch.py"


# Weights ------------------------------------------------------------------------------------------------------------
def _state_dict():
    return {"image_encoder.pos_embed": np.zeros((1, 2, 2, 2, 4), np.float32),
            "image_encoder.blocks.0.attn.rel_pos_d": np.zeros((27, 4), np.float32),
            "image_encoder.blocks.0.norm1.weight": np.ones(4, np.float32),
            "mask_decoder.iou_token.weight": np.arange(8, dtype=np.float64).reshape(2, 4)}


def test_perturbation_leaves_no_zero_tensor_and_changes_every_entry():
    sd = _state_dict()
    assert cc.zero_tensors(sd) == ["image_encoder.pos_embed", "image_encoder.blocks.0.attn.rel_pos_d"]
    out = cc.perturb_state_dict(sd, seed=3, scale=0.02)
    assert list(out) == list(sd)
    assert cc.zero_tensors(out) == []
    for name, x in out.items():
        assert x.dtype == np.float32 and x.shape == sd[name].shape
        assert np.all(x != sd[name]), name  # every element moved
        noise = x - sd[name].astype(np.float32)
        assert 0.005 < noise.std() < 0.05 or noise.size < 10, name
        assert np.count_nonzero(x) == x.size, name


def test_perturbation_is_seeded_per_name_not_per_order():
    sd = _state_dict()
    a = cc.perturb_state_dict(sd, seed=7)
    b = cc.perturb_state_dict(dict(reversed(list(sd.items()))), seed=7)
    c = cc.perturb_state_dict(sd, seed=8)
    for name in sd:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
    # Two entries of equal shape and value draw different noise.
    twins = cc.perturb_state_dict({"a": np.zeros(16), "b": np.zeros(16)}, seed=7)
    assert not np.array_equal(twins["a"], twins["b"])
    with pytest.raises(ValueError, match="seed"):
        cc.perturb_state_dict(sd, seed=-1)


# Click schedule and loop --------------------------------------------------------------------------------------------
def test_prompt_less_schedule_is_upstreams():
    assert cc.prompt_less_steps(11, 4) == tuple(s in (4, 10) for s in range(11))
    assert cc.prompt_less_steps(1, 5) == (True,)  # one click: the only step is the last one
    assert cc.prompt_less_steps(3, 2) == (False, False, True)
    with pytest.raises(ValueError):
        cc.prompt_less_steps(0, 2)
    rng = np.random.default_rng(0)
    draws = {cc.draw_insert(rng) for _ in range(500)}
    assert draws == set(range(2, 9))  # upstream's np.random.randint(2, 9)


def test_interaction_bookkeeping_with_recording_ops():
    """Encoder once, decoder per click, previous logits fed back, newest click only, prompt-less steps, sum."""
    calls = []

    def encode(x):
        calls.append(("encode",))
        return x + 100.0

    def decode(emb, pts, lbl, low):
        calls.append(("decode", None if pts is None else int(pts[0, 0, 0]), float(low[0])))
        return low + 1.0

    def next_click(step, gt, full):
        calls.append(("click", step, None if full is None else float(full[0])))
        return np.full((1, 1, 3), step, np.float32), np.ones((1, 1), np.int64)

    ops = cc.ClickOps(encode=encode, decode=decode, upsample=lambda low: low * 10.0,
                      loss=lambda full, gt: float(full[0]), next_click=next_click, zero_logits=lambda e: np.zeros(1))
    total, per_click, full = cc.interaction(ops, np.zeros(1), None, cc.prompt_less_steps(4, 1))
    assert calls == [("encode",), ("click", 0, None),
                     ("decode", 0, 0.0), ("click", 1, 10.0),
                     ("decode", None, 1.0), ("click", 2, 20.0),   # prompt-less step 1: its click is drawn, not fed
                     ("decode", 2, 2.0), ("click", 3, 30.0),
                     ("decode", None, 3.0)]                        # the last step is prompt-less
    assert per_click == [10.0, 20.0, 30.0, 40.0] and total == 100.0 and full[0] == 40.0
    with pytest.raises(ValueError):
        cc.interaction(ops, np.zeros(1), None, ())


@pytest.mark.slow
def test_click_loop_equals_our_train_step():
    """The loop the PyTorch side runs, driven by our model and the train step's click keys, reproduces
    ``training.step.interactive_loss`` click by click: both sides of the comparison train the same thing."""
    import jax_side

    cfg = ModelConfig.variant("tiny")
    rng = np.random.default_rng(0)  # non-zero pos/rel-pos tables and biases (numpy noise: no extra compilation)
    variables = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                             init_variables(cfg, jax.random.key(0)))
    s, b = cfg.image_size, 2
    gt = cc.box_target(b, s)
    image = (rng.standard_normal((b, s, s, s)) + 2.0 * gt).astype(np.float32)[..., None]
    keys = step_lib.sample_keys(jax.random.key(5), jnp.arange(b))  # The step's per-sample click keys.
    step_cfg = step_lib.StepConfig()  # upstream: 11 clicks, prompt-less at a step in 2..8 and at the last
    _, insert_at = step_lib.draw_interaction(jax.random.key(6), step_cfg)
    insert_at = int(insert_at)
    with jax.default_matmul_precision("float32"):
        loss_ref, aux = jax.jit(lambda p, bf, batch, k: step_lib.interactive_loss(
            p, bf, batch, k, jnp.int32(11), jnp.int32(insert_at), model=Sam3D(cfg), cfg=step_cfg))(
            variables["params"], variables["buffers"], {"image": jnp.asarray(image), "label": jnp.asarray(gt)}, keys)
        record = []
        ops = jax_side.click_ops(cfg, variables, jax_side.keyed_clicks(keys, record))
        total, per_click, _ = cc.interaction(ops, jnp.asarray(image), jnp.asarray(gt > 0),
                                             cc.prompt_less_steps(11, insert_at))
    np.testing.assert_allclose(np.array([float(v) for v in per_click]), np.asarray(aux["loss_per_click"]),
                               rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(float(total), float(loss_ref), rtol=2e-5)
    assert len(record) == 11 and set(np.unique(np.concatenate([lb for _, lb in record]))) <= {0, 1}


def test_dice_ce_reference_matches_our_loss():
    rng = np.random.default_rng(1)
    logits = (3.0 * rng.standard_normal((3, 8, 8, 8))).astype(np.float32)
    gt = rng.random((3, 8, 8, 8)) < 0.3
    loss = jax.jit(losses.dice_ce_loss, static_argnums=2)
    ours = float(loss(jnp.asarray(logits), jnp.asarray(gt), True))
    np.testing.assert_allclose(ours, cc.dice_ce_reference(logits, gt), rtol=1e-5)
    dice_only = float(loss(jnp.asarray(logits), jnp.asarray(gt), False))
    np.testing.assert_allclose(dice_only, cc.dice_ce_reference(logits, gt, use_bce=False), rtol=1e-5)
    # A confident, correct prediction costs almost nothing; the opposite costs Dice 1 plus a large BCE.
    sure = np.where(gt, 30.0, -30.0)
    assert cc.dice_ce_reference(sure, gt) < 1e-6
    assert cc.dice_ce_reference(-sure, gt) > 25.0
    with pytest.raises(ValueError, match="shape"):
        cc.dice_ce_reference(logits, gt[:2])


def test_box_target_is_a_nonempty_box_per_sample():
    gt = cc.box_target(3, 32)
    assert gt.shape == (3, 32, 32, 32) and gt.dtype == np.uint8
    for g in gt:
        idx = np.argwhere(g)
        lo, hi = idx.min(0), idx.max(0) + 1
        assert g.sum() == np.prod(hi - lo) > 1000  # one solid box, large enough for upstream's crop rule


# Timing and reporting -----------------------------------------------------------------------------------------------
def test_time_calls_counts_and_syncs():
    seen = []
    times = cc.time_calls(lambda: seen.append("call") or len(seen), lambda r: seen.append(("sync", r)),
                          warmup=2, repeats=3)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert seen == ["call", ("sync", 1), "call", ("sync", 3), "call", ("sync", 5), "call", ("sync", 7),
                    "call", ("sync", 9)]
    with pytest.raises(ValueError):
        cc.time_calls(lambda: None, lambda r: None, warmup=0, repeats=0)
    cpu = []
    burn = lambda: sum(i * i for i in range(200_000))  # noqa: E731
    wall = cc.time_calls(burn, lambda r: None, warmup=0, repeats=2, cpu_times=cpu)
    assert len(cpu) == 2 and all(0 < c <= 4 * w + 0.05 for c, w in zip(cpu, wall))


def test_measure_cpu_reports_time_cpu_and_memory():
    m = cc.measure_cpu(lambda: np.ones(32 * 2 ** 20 // 8).sum(), lambda r: None, warmup=1, repeats=3,
                       resident_bytes=10 * 2 ** 20)
    assert m.ok and len(m.times) == 3 and m.seconds == sorted(m.times)[1]
    assert m.cpu_seconds is not None and m.cpu_seconds > 0
    assert m.peak_mib >= 10  # what was resident counts even if the sampler missed the short allocation


def test_rss_sampler_sees_a_large_allocation():
    if cc.RssSampler.rss_bytes() is None:
        pytest.fail("/proc/self/statm unreadable on this Linux machine")
    with cc.RssSampler(interval_s=0.001) as rss:
        block = np.ones(64 * 2 ** 20 // 8)  # 64 MiB, touched
        for _ in range(50):
            if cc.RssSampler.rss_bytes() - rss.baseline_bytes > 48 * 2 ** 20:
                break
            block += 1.0
    assert rss.peak_bytes >= 48 * 2 ** 20
    del block


def _rows():
    m = cc.Measurement
    return [
        cc.Row("encode", 1, "fp32", "fp32", m(seconds=2.0, peak_mib=900.0), m(seconds=0.1, peak_mib=400.0)),
        cc.Row("encode", 8, "fp32", "fp32", m(seconds=8.0, peak_mib=3000.0), m(seconds=1.0, peak_mib=900.0)),
        cc.Row("inference", 1, "amp-fp16", "bf16", m(seconds=0.5), m(note="cuDNN refused the shape")),
        cc.Row("train, 11 clicks", 12, "amp-fp16", "bf16", m(seconds=0.4, peak_mib=65000.0),
               m(seconds=0.02, peak_mib=7000.0)),
    ]


def test_table_ratio_line_and_json():
    rows = _rows()
    table = cc.format_table(rows).splitlines()
    assert table[0].startswith("| task | batch | PyTorch | JAX |") and table[1] == "|" + "---|" * 11
    assert all(line.count("|") == 12 for line in table)
    assert table[2] == "| encode | 1 | fp32 | fp32 | 2,000.0 | 100.0 | 0.50 | 10.00 | 900 | 400 | 20.00x |"
    assert "failed (cuDNN refused the shape)" in table[4] and table[4].endswith("| — | — |")
    assert table[5].endswith("| 30.00 | 600.00 | 65,000 | 7,000 | 20.00x |")
    assert cc.ratio_line(rows) == "ratio torch/jax encode: 20.00x"  # batch 1, not batch 8's 8x
    assert cc.ratio_line(rows[2:]) == "ratio torch/jax encode: not measured"
    assert cc.cpu_ratio_line(rows) is None  # no CPU times measured (accelerator rows)
    rows[0].torch.cpu_seconds, rows[0].jax.cpu_seconds = 3.0, 0.2
    assert cc.cpu_ratio_line(rows) == "ratio torch/jax encode, process CPU time: 15.00x"
    data = json.loads(json.dumps(cc.rows_to_json(rows)))
    assert data[0]["ratio_torch_over_jax"] == 20.0 and data[0]["jax"]["samples_per_s"] == 10.0
    assert data[2]["jax"]["seconds"] is None and data[2]["jax"]["note"] == "cuDNN refused the shape"


# The command's refusals (no torch needed) ---------------------------------------------------------------------------
def test_command_refuses_bad_arguments_and_a_missing_extra(tmp_path):
    proc = cli_assert.run_cli([SCRIPT, "--parts", "parity,speed"])
    cli_assert.assert_refused(proc, mentions=["--parts", "speed"])
    proc = cli_assert.run_cli([SCRIPT, "--device", "gpu", "--quick"])
    cli_assert.assert_refused(proc, mentions=["--quick"])
    existing = tmp_path / "out.json"
    existing.write_text("{}")
    before = cli_assert.snapshot([existing])
    proc = cli_assert.run_cli([SCRIPT, "--quick", "--json", existing])
    cli_assert.assert_refused(proc, mentions=["--json", "already exists"], unchanged=before)
    # Without the compare extra: one line naming the missing package and the install command. A stand-in `medim`
    # that fails to import plays the missing extra whether or not torch is installed here.
    fake = tmp_path / "site"
    (fake / "medim").mkdir(parents=True)
    (fake / "medim" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'medim'\", name='medim')\n")
    out = tmp_path / "never.json"
    proc = cli_assert.run_cli([SCRIPT, "--quick", "--json", out], env={"PYTHONPATH": f"{fake}:{REPO}"})
    cli_assert.assert_refused(proc, mentions=["medim", "[compare]"], absent=[out])
