"""``python -m sammed3d_jax.cvpr25 {predict,evaluate,make-cases}``: the CVPR 2025 interactive 3-D challenge protocol.

- ``predict --inputs DIR --outputs DIR --checkpoint W``: the challenge container's job. For every ``<case>.npz`` of
  the inputs writes ``<case>.npz`` with ``segs`` (uint8 class ids 1..K in the order of the case's boxes/clicks).
- ``evaluate --cases DIR [--gts DIR] --checkpoint W --out O``: the official six-step loop in one process (box, then
  five simulated clicks); writes ``O/<case>.npz`` (``segs``, ``all_segs``, ``clicks``, ``clicks_order``),
  ``O/metrics.csv`` (official columns, rewritten after every case), ``O/summary.json`` and ``O/dsc_nsd_vs_step.png``;
  ``--resume`` continues an interrupted run.
- ``make-cases DATASET OUT``: challenge cases (``imgs`` 0-255, ``spacing``, ``gts``, ``boxes``) from an nnU-Net/MSD or
  upstream-layout dataset.

JAX's persistent compilation cache is on for ``predict`` and ``evaluate`` (``--cache-dir``, default
``$SAMMED3D_JAX_CACHE`` or ``~/.cache/sammed3d_jax/jax``; ``--no-compilation-cache`` turns it off), so a process that
starts for every step, as the challenge's container does, compiles the model once per machine rather than per step.

Bad input ends a command with one ``error:`` line and exit status 2; a case that fails is reported and skipped,
and the command then exits with status 1.
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence

from sammed3d_jax import cli
from sammed3d_jax.compile_cache import CACHE_ENV, default_cache_dir  # noqa: F401  (re-exported)
from sammed3d_jax.compile_cache import enable as enable_compilation_cache

EXIT_SOME_FAILED = 1


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="params dir, training workdir, Orbax dir or .pth file")
    p.add_argument("--config", default="", help="model variant/config JSON for checkpoints without one")
    p.add_argument("--dtype", default="", help="compute dtype override, e.g. float32")
    p.add_argument("--box-mode", choices=("auto", "box", "click"), default="auto",
                   help="auto: box prompt if the checkpoint has box embeddings, else a click at the box centre; "
                        "box: require box embeddings; click: always the centre click")
    p.add_argument("--spacing-order", choices=("xyz", "zyx"), default="xyz",
                   help="order of the files' spacing (xyz: SimpleITK's, the challenge's; zyx: array order)")
    p.add_argument("--orientation", choices=("LPS", "RAS"), default="LPS",
                   help="direction of the files' axes (they store none; LPS = SimpleITK identity)")
    p.add_argument("--max-clicks", type=int, default=16, help="click buffer per class (default 16)")
    p.add_argument("--max-windows", type=int, default=27, help="most overlapping windows per class (default 27)")
    p.add_argument("--cache-dir", default="", help=f"persistent compilation cache (default ${CACHE_ENV} or "
                                                   "~/.cache/sammed3d_jax/jax)")
    p.add_argument("--no-compilation-cache", action="store_true", help="do not use the persistent cache")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _predictor(args):
    from sammed3d_jax.cvpr25.adapter import ChallengePredictor
    from sammed3d_jax.evaluation.checkpoints import load_checkpoint

    if args.max_clicks < 1 or args.max_windows < 1:
        raise cli.UsageError("--max-clicks and --max-windows must be at least 1")
    if not args.no_compilation_cache:
        enable_compilation_cache(args.cache_dir or default_cache_dir())
    loaded = load_checkpoint(args.checkpoint, args.config or None, args.dtype)
    predictor = ChallengePredictor.from_model(
        loaded.variables, loaded.cfg, max_clicks=args.max_clicks, box_mode=args.box_mode,
        spacing_order=args.spacing_order, orientation=args.orientation, max_windows=args.max_windows)
    return loaded, predictor


def _predict(args) -> int:
    from sammed3d_jax.cvpr25.cases import read_case
    from sammed3d_jax.cvpr25.evaluate import case_files
    from sammed3d_jax.cvpr25.safe_npz import write_npz

    files = case_files(args.inputs)
    if not files:
        raise cli.UsageError(f"--inputs {args.inputs}: no .npz case")
    out = cli.check_output_path(args.outputs, inputs=[args.inputs], overwrite=args.overwrite, name="--outputs",
                                is_dir=True)
    _, predictor = _predictor(args)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in files:
        t0 = time.perf_counter()
        try:
            case = read_case(path)
            if case.num_classes == 0:
                raise ValueError(f"{path}: no 'boxes' and no 'clicks': nothing says what to segment")
            segs, report = predictor.predict_with_report(case.imgs, case.spacing, case.prompts(), case.prev_pred)
            write_npz(out / case.name, segs=segs)
        except Exception as err:  # one bad case never stops the others (the challenge scores it as empty)
            failed += 1
            kind = "" if isinstance(err, cli.USER_ERRORS) else f"{type(err).__name__}: "
            print(f"failed {path.name}: {kind}{cli.one_line(err)}", file=sys.stderr, flush=True)
            continue
        notes = f" ({'; '.join(report.notes)})" if report.notes else ""
        print(f"{case.name}: {case.num_classes} class(es), {report.encodes} encode(s), "
              f"{time.perf_counter() - t0:.2f} s{notes}", flush=True)
    if failed:
        print(f"error: {failed} of {len(files)} case(s) failed", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def _evaluate(args) -> int:
    from sammed3d_jax.cvpr25 import report as report_lib
    from sammed3d_jax.cvpr25.evaluate import case_files, evaluate_cases

    files = case_files(args.cases)[: args.limit if args.limit else None]
    if not files:
        raise cli.UsageError(f"--cases {args.cases}: no .npz case")
    if args.gts and not os.path.isdir(args.gts) and "://" not in args.gts:
        raise cli.UsageError(f"--gts {args.gts}: {'not a folder' if os.path.exists(args.gts) else 'does not exist'}")
    out = cli.check_output_path(args.out, inputs=[args.cases] + ([args.gts] if args.gts else []),
                                overwrite=args.overwrite or args.resume, name="--out", is_dir=True)
    rows, notes = [], {}
    if args.resume and (out / report_lib.CSV_NAME).exists():
        # Cases whose row and file are both there are kept; the others are evaluated (again).
        rows = [r for r in report_lib.read_metrics_csv(out / report_lib.CSV_NAME) if (out / r["CaseName"]).exists()]
        done = {r["CaseName"] for r in rows}
        files = [f for f in files if f.name not in done]
        print(f"resuming: {len(done)} case(s) already evaluated", flush=True)
    loaded, predictor = _predictor(args)
    out.mkdir(parents=True, exist_ok=True)
    compile_s = predictor.warmup()
    print(f"model compiled in {compile_s:.1f} s; box prompt: {predictor.box_prompt}; {len(files)} case(s)", flush=True)

    def on_case(result, failure):
        if failure is not None:
            print(f"failed {failure['case']}: {failure['error']}", file=sys.stderr, flush=True)
            return
        rows.append(result.row)
        notes[result.name] = result.notes
        report_lib.write_metrics_csv(out / report_lib.CSV_NAME, rows)
        r = result.row
        steps = " ".join(f"{r['DSC_%d' % i]:.3f}" for i in range(1, 7))
        print(f"{result.name}: DSC {steps} | DSC_AUC {r['DSC_AUC']:.3f} NSD_AUC {r['NSD_AUC']:.3f} | "
              f"{r['TotalRunningTime']:.2f} s", flush=True)

    _, failures = evaluate_cases(predictor, files, out, gts_dir=args.gts or None, on_case=on_case)
    report_lib.write_metrics_csv(out / report_lib.CSV_NAME, rows)
    settings = {"box_prompt": predictor.box_prompt, "box_mode": args.box_mode, "spacing_order": args.spacing_order,
                "orientation": args.orientation, "model_spacing_mm": list(predictor.spacing_mm),
                "max_clicks": args.max_clicks, "max_windows": args.max_windows,
                "compilation_cache": None if args.no_compilation_cache else (args.cache_dir or default_cache_dir()),
                "cases": os.fspath(args.cases), "gts": args.gts or None}
    summary = report_lib.summarize(rows, failures, notes=notes, compile_s=compile_s, settings=settings,
                                   checkpoint=loaded.describe())
    report_lib.write_summary(out / report_lib.SUMMARY_NAME, summary)
    report_lib.plot_steps(rows, out / report_lib.PLOT_NAME)
    print(report_lib.format_summary(summary))
    print(f"wrote {out}/{{{report_lib.CSV_NAME}, {report_lib.SUMMARY_NAME}, {report_lib.PLOT_NAME}}} and "
          f"{len(rows)} case file(s)")
    return EXIT_SOME_FAILED if failures else 0


def _window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI") from None
    if not hi > lo:
        raise argparse.ArgumentTypeError(f"{text!r}: HI must exceed LO")
    return lo, hi


def _make_cases(args) -> int:
    from sammed3d_jax.cvpr25.make_cases import make_cases

    if not os.path.exists(args.dataset):
        raise cli.UsageError(f"DATASET {args.dataset}: no such folder or manifest")
    out = cli.check_output_path(args.out, inputs=[args.dataset], overwrite=args.overwrite, name="OUT", is_dir=True)

    def on_case(name, error):
        print(f"failed {name}: {error}" if error else f"wrote {name}.npz", file=sys.stderr if error else sys.stdout,
              flush=True)

    made, failures = make_cases(args.dataset, out, seed=args.seed, window=args.window, limit=args.limit,
                                on_case=on_case)
    print(f"{len(made)} case(s) in {out}, {len(failures)} problem(s); classes in {out}/cases.json")
    return EXIT_SOME_FAILED if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sammed3d_jax.cvpr25", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="the challenge container's prediction: inputs/*.npz -> outputs/*.npz (segs)")
    p.add_argument("--inputs", required=True, help="folder of case .npz files")
    p.add_argument("--outputs", required=True, help="folder for <case>.npz with segs")
    _model_flags(p)
    p = sub.add_parser("evaluate", help="the official six-step loop with scores")
    p.add_argument("--cases", required=True, help="folder of case .npz files")
    p.add_argument("--gts", default="", help="folder of <case>.npz holding 'gts' (default: the cases' own gts)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N cases")
    p.add_argument("--resume", action="store_true", help="keep the cases --out already holds, evaluate the rest")
    _model_flags(p)
    p = sub.add_parser("make-cases", help="challenge cases from an nnU-Net/MSD or upstream-layout dataset")
    p.add_argument("dataset", help="dataset folder or manifest .json")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the box shifts (default 0)")
    p.add_argument("--window", type=_window, default=None, help="fixed intensity window LO,HI (default percentiles)")
    p.add_argument("--limit", type=int, default=0, help="only the first N cases")
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty OUT")
    return parser


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """Runs a subcommand; returns the exit status (0 ok, 1 some case failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    cli.quiet_library_logs()
    return {"predict": _predict, "evaluate": _evaluate, "make-cases": _make_cases}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
