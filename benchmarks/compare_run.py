"""The measurements of ``compare_pytorch.py``: parity on shared inputs, then the timing rows, each framework's side
through its own module (``torch_side``, ``jax_side``). Holds both models; imports torch only through ``torch_side``.
"""

import gc
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import compare_common as cc
from sammed3d_jax import parity as parity_lib


def _cf(x) -> np.ndarray:
    """Channels-last -> channels-first (the PyTorch layout)."""
    return np.moveaxis(np.asarray(x, np.float32), -1, 1)


def _failure(e: BaseException) -> cc.Measurement:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return cc.Measurement(note=text[:160])


class Runner:
    """Both sides of the comparison on one device with the same weights.

    Args:
      ts: the ``torch_side`` module; js: the ``jax_side`` module.
      model: the MedIM model (eval mode, on ``device``).
      device: the torch device.
      variables: our converted variables, on the JAX device.
      cfg: our ModelConfig (float32).
      mode: the ``compare_pytorch.Mode``.
      seed: seed of the inputs and the click draws.
    """

    def __init__(self, ts, js, model, device, variables, cfg, mode, seed: int):
        self.ts, self.js, self.model, self.device = ts, js, model, device
        self.variables, self.cfg, self.mode, self.seed = variables, cfg, mode, seed
        self.platform = jax.devices()[0].platform
        self.size = cfg.image_size
        self._jax_rows = {}  # (task, JAX variant, batch) -> Measurement: one JAX measurement serves every PyTorch row

    # Parity -----------------------------------------------------------------------------------------------------
    def parity(self, clicks: int):
        """Float32 parity rows (fixture tolerances) and whether all pass; prints the table."""
        import torch

        ts, js, cfg, s, g4 = self.ts, self.js, self.cfg, self.size, self.cfg.low_res_size
        b = self.mode.parity_batch
        rng = np.random.default_rng(self.seed + 1)
        image = rng.standard_normal((b, s, s, s)).astype(np.float32)
        points = rng.integers(0, s, (b, 3, 3)).astype(np.float32)
        labels = np.array([[1, 0, -1], [1, 1, 0]] * b, np.int64)[:b]
        mask = (2.0 * rng.standard_normal((b, g4, g4, g4))).astype(np.float32)
        gt = cc.box_target(b, s).astype(bool)
        dev = self.device
        with torch.no_grad():
            emb_t = self.model.image_encoder(torch.from_numpy(image[:, None]).to(dev))
            low_t, iou_t = ts.decode_with_iou(self.model, emb_t, torch.from_numpy(points).to(dev),
                                              torch.from_numpy(labels).to(dev), torch.from_numpy(mask[:, None]).to(dev))
            full_t = ts.upsample(low_t, s)
        golden = {"image_embeddings": emb_t.cpu().numpy(), "low_res_masks_single": low_t.cpu().numpy(),
                  "iou_predictions_single": iou_t.cpu().numpy(), "masks_upsampled_single": full_t.cpu().numpy()}
        with jax.default_matmul_precision("float32"):
            enc = jax.jit(js.encode_fn(cfg))
            dec = jax.jit(js.decode_fn(cfg))
            emb_j = enc(self.variables, jnp.asarray(image[..., None]))
            low_j, iou_j = dec(self.variables, emb_j, jnp.asarray(points), jnp.asarray(labels, jnp.int32),
                               jnp.asarray(mask[..., None]))
            full_j = js.upsample_logits(low_j, s)
            computed = {"image_embeddings": _cf(emb_j), "low_res_masks_single": _cf(low_j),
                        "iou_predictions_single": np.asarray(iou_j), "masks_upsampled_single": _cf(full_j)}
            # The training interaction on both decoders, fed the same clicks (ours, drawn by the train step's rule).
            record = []
            keys = jax.vmap(lambda e: jax.random.fold_in(jax.random.key(self.seed + 2), e))(jnp.arange(b))
            schedule = cc.prompt_less_steps(clicks, cc.draw_insert(rng))
            ops_j = js.click_ops(cfg, self.variables, js.keyed_clicks(keys, record), embedding=emb_j)
            _, losses_j, _ = cc.interaction(ops_j, None, jnp.asarray(gt), schedule)
        ops_t = ts.click_ops(self.model, s, ts.replay_clicks([p for p, _ in record], [lb for _, lb in record], dev),
                             embedding=emb_t)
        with torch.no_grad():
            _, losses_t, _ = cc.interaction(ops_t, None, torch.from_numpy(gt[:, None]).to(dev), schedule)
        computed["train_loss_per_click"] = np.array([float(v) for v in losses_j], np.float32)
        golden["train_loss_per_click"] = np.array([float(v) for v in losses_t], np.float32)
        rows, _ = parity_lib.compare(computed, golden)
        print(f"parity, float32, batch {b}, PyTorch (MedIM) as the reference; train_loss_per_click: {clicks} clicks, "
              f"prompt-less at steps {[i for i, f in enumerate(schedule) if f]}")
        print(parity_lib.format_table(rows, []), flush=True)
        ok = all(r.ok for r in rows)
        print("all parity rows within tolerance" if ok else "PARITY FAILED", flush=True)
        del emb_t, low_t, full_t
        self.ts.free(dev)
        return rows, ok

    # Timings ----------------------------------------------------------------------------------------------------
    def timings(self, parts, on_row=None) -> list[cc.Row]:
        """Every timing row; ``on_row(rows)`` after each one (the caller saves partial results). ``torch.compile``
        rows come last: compiling takes minutes, and a time limit then cuts only them."""
        rows = []

        def add(row):
            rows.append(row)
            print("  " + cc.format_table([row]).splitlines()[-1], flush=True)
            if on_row is not None:
                on_row(rows)

        tasks = [t for t in ("encode", "inference") if t in parts]
        if tasks:
            self._inference_rows(tasks, [v for v in self.mode.variants], self.mode.batches, add)
        if "train" in parts:
            self._train_rows(add)
        if tasks and self.mode.compile:  # one compiled shape (the first batch): each new shape compiles again
            self._inference_rows(tasks, [("fp32+compile", "fp32")], self.mode.batches[:1], add)
        return rows

    def _jax_program(self, task: str, variant: str, batch: int, inputs: dict):
        """Compiles one of our inference programs; on an accelerator falls back to XLA attention if cuDNN fails."""
        js = self.js
        for attention in ("auto", "xla") if self.platform != "cpu" else ("xla",):
            cfg = js.with_precision(self.cfg, variant, attention)
            try:
                if task == "encode":
                    args = (self.variables, inputs["volume"])
                    compiled, cs, mib = js.compile_program(js.encode_fn(cfg), cfg, *args)
                else:
                    args = (self.variables, inputs["volume"], inputs["points"], inputs["labels"], inputs["low0"])
                    compiled, cs, mib = js.compile_program(js.inference_fn(cfg), cfg, *args)
                return compiled, args, cs, mib, attention
            except Exception as e:  # e.g. a cuDNN shape restriction
                if attention == "xla":
                    raise
                print(f"  {task} b{batch} {variant}: attention 'auto' failed ({type(e).__name__}); using XLA")
        raise AssertionError("unreachable")

    def _measure_jax(self, task, variant, batch, inputs) -> cc.Measurement:
        try:
            compiled, args, cs, mib, attention = self._jax_program(task, variant, batch, inputs)
            resident = self.js.tree_bytes(*args)
            m = self.js.measure(compiled, args, 1, max(self.mode.repeats, 3 if self.platform == "cpu" else 1),
                                self.platform, resident, cs, mib)
            if attention == "xla" and self.platform != "cpu":
                m.note = "XLA attention"
            return m
        except Exception as e:
            traceback.print_exc()
            return _failure(e)

    def _measure_torch(self, task, variant, inputs, compiled_fns) -> cc.Measurement:
        import torch

        ts, model = self.ts, self.model
        try:
            fn = model.image_encoder if task == "encode" else ts.make_inference(model, self.size)
            if variant.endswith("+compile"):
                key = (task, variant)
                if key not in compiled_fns:
                    compiled_fns[key] = torch.compile(fn)
                fn = compiled_fns[key]
            args = (inputs["t_volume"],) if task == "encode" else (
                inputs["t_volume"], inputs["t_points"], inputs["t_labels"], inputs["t_low0"])

            def call():
                with torch.inference_mode(), ts.precision(self.device, variant):
                    return fn(*args)

            warmup = self.mode.torch_warmup + (1 if variant.endswith("+compile") else 0)
            compile_s = None
            if variant.endswith("+compile"):  # the first call compiles: time it apart
                t0 = time.perf_counter()
                ts.sync(self.device)(call())
                compile_s = time.perf_counter() - t0
                warmup -= 1
            m = ts.measure(call, self.device, warmup, self.mode.repeats, ts.tensor_bytes(model, list(args)))
            m.compile_s = compile_s
            return m
        except Exception as e:
            traceback.print_exc()
            return _failure(e)
        finally:
            ts.free(self.device)

    def _inference_rows(self, tasks, variants, batches, add) -> None:
        import torch

        s, g4 = self.size, self.cfg.low_res_size
        compiled_fns = {}
        for batch in batches:
            rng = np.random.default_rng(self.seed + 10 + batch)
            vol = rng.standard_normal((batch, s, s, s)).astype(np.float32)
            pts = np.full((batch, 1, 3), s // 2, np.float32)
            lab = np.ones((batch, 1), np.int64)
            low0 = np.zeros((batch, g4, g4, g4), np.float32)
            dev = self.device
            inputs = {"volume": jnp.asarray(vol[..., None]), "points": jnp.asarray(pts),
                      "labels": jnp.asarray(lab, jnp.int32), "low0": jnp.asarray(low0[..., None]),
                      "t_volume": torch.from_numpy(vol[:, None]).to(dev), "t_points": torch.from_numpy(pts).to(dev),
                      "t_labels": torch.from_numpy(lab).to(dev), "t_low0": torch.from_numpy(low0[:, None]).to(dev)}
            for task in tasks:
                for tv, jv in variants:
                    print(f"timing {task}, batch {batch}: PyTorch {tv} vs JAX {jv} ...", flush=True)
                    mt = self._measure_torch(task, tv, inputs, compiled_fns)
                    key = (task, jv, batch)
                    if key not in self._jax_rows:
                        self._jax_rows[key] = self._measure_jax(task, jv, batch, inputs)
                    add(cc.Row(task, batch, tv, jv, mt, self._jax_rows[key]))
            del inputs
            gc.collect()

    def _train_rows(self, add) -> None:
        import torch

        ts, js, s, mode = self.ts, self.js, self.size, self.mode
        tv, jv = mode.train_variant
        b = mode.train_batch
        rng = np.random.default_rng(self.seed + 100)
        image = rng.standard_normal((b, s, s, s)).astype(np.float32)
        label = cc.box_target(b, s)
        image += 2.0 * label  # a visible target
        for clicks in mode.clicks:
            task = f"train, {clicks} click{'s' if clicks > 1 else ''}"
            print(f"timing {task}, batch {b}: PyTorch {tv} vs JAX {jv} ...", flush=True)
            trainer = None
            try:
                trainer = ts.Trainer(self.model, self.device, tv, s, self.seed)
                trainer.prime()
                x = torch.from_numpy(image[:, None]).to(self.device)
                gt = torch.from_numpy(label[:, None].astype(bool)).to(self.device)
                resident = ts.tensor_bytes(self.model, trainer.optimizer, x, gt)
                mt = ts.measure(lambda: trainer.micro_step(x, gt, clicks), self.device, mode.train_warmup,
                                mode.train_steps, resident)
            except Exception as e:
                traceback.print_exc()
                mt = _failure(e)
            finally:
                if trainer is not None:
                    trainer.close()
                ts.free(self.device)
            cfg = self.cfg.replace(remat_encoder_blocks=mode.remat_encoder)
            mj = None
            for attention in ("auto", "xla") if self.platform != "cpu" else ("xla",):
                try:
                    mj = js.time_train(js.with_precision(cfg, jv, attention), self.variables, image[..., None], label,
                                       clicks, mode.train_warmup + 1, mode.train_steps)
                    if attention == "xla" and self.platform != "cpu":
                        mj.note = "XLA attention"
                    break
                except Exception as e:
                    traceback.print_exc()
                    mj = _failure(e)
            gc.collect()
            add(cc.Row(task, b, tv, jv, mt, mj))
