"""The challenge's evaluation loop, in-process: a box step, then five click steps, scored per step.

Per case (restating the official protocol):

- Step 1 predicts from the boxes alone; a case without ``boxes`` scores 0 there (DSC, NSD and run time) and its
  prediction counts as empty.
- Steps 2-6 each add, per class, the click ``clicks.next_click`` computes from the previous step's ``segs`` and the
  ground truth (``None`` in ``clicks_order`` where the class has no error), then predict again from the box and all
  clicks so far; the previous ``segs`` is passed as ``prev_pred``.
- A step whose prediction fails counts as an empty prediction (as a container that writes nothing) and is noted;
  a case that cannot be read or has no ground-truth class is listed as failed and the run goes on.
- Scores per step, AUCs and the CSV row come from ``cvpr25.metrics``. Run time per step is the wall time of the
  prediction call (``ChallengePredictor.predict_case``: resampling, encodes, decodes, paste-back) after the model was
  compiled once beforehand; a container run adds its start-up, file I/O and, without a warm compilation cache, the
  compilation.

Ground-truth class ids are taken in ascending order as classes 1..K (the k-th box / clicks entry is class k); a file
whose ids are not already 1..K is scored after that renumbering, which the case's notes say.

Owns: ``CaseResult``, ``evaluate_case``, ``evaluate_cases``. Imports the cvpr25 modules; never the training code.
"""

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from etils import epath

from sammed3d_jax.cvpr25 import clicks as click_rule
from sammed3d_jax.cvpr25 import metrics
from sammed3d_jax.cvpr25.cases import Case, read_case
from sammed3d_jax.cvpr25.safe_npz import object_array, write_npz

STEPS = metrics.STEPS


@dataclasses.dataclass
class CaseResult:
    """One evaluated case.

    Attributes:
        name: the case file name.
        row: the CSV row (``metrics.CSV_COLUMNS``).
        all_segs: uint8 ``[6, D, H, W]``, the prediction of every step.
        clicks: per class ``{"fg": [...], "bg": [...]}`` as given to the model at step 6.
        clicks_order: per class the five entries ``"fg"``/``"bg"``/None.
        notes: what went wrong without stopping the case (failed steps, renumbered classes, prediction notes).
    """

    name: str
    row: dict
    all_segs: np.ndarray
    clicks: list[dict]
    clicks_order: list[list]
    notes: list[str]


def _renumbered(gts: np.ndarray, notes: list[str]) -> tuple[np.ndarray, int]:
    classes = metrics.gt_classes(gts)
    if not classes:
        raise ValueError("the ground truth holds no class (only background)")
    if len(classes) > 255:
        raise ValueError(f"{len(classes)} ground-truth classes do not fit uint8 class ids")
    if classes == list(range(1, len(classes) + 1)):
        return gts, len(classes)
    lut = np.zeros(int(max(classes)) + 1, np.uint8)
    lut[classes] = np.arange(1, len(classes) + 1)
    notes.append(f"ground-truth ids {classes} scored as classes 1..{len(classes)}")
    return lut[np.clip(gts, 0, None)], len(classes)


def evaluate_case(predictor, case: Case, max_edt_voxels: int = click_rule.MAX_EDT_VOXELS) -> CaseResult:
    """Runs the six steps on ``case`` (which must carry ``gts``) with ``predictor`` (``predict_with_report``).

    Raises:
        ValueError: the case has no ground truth, no class, or as many boxes as there are classes.
    """
    if case.gts is None:
        raise ValueError(f"{case.name}: no ground truth ('gts' in the case or in --gts)")
    notes: list[str] = []
    gts, k = _renumbered(case.gts, notes)
    if case.boxes is not None and len(case.boxes) != k:
        raise ValueError(f"{case.name}: {len(case.boxes)} boxes for {k} ground-truth classes")
    clicks: list[dict] = [{"fg": [], "bg": []} for _ in range(k)]
    order: list[list] = [[] for _ in range(k)]
    segs = np.zeros(gts.shape, np.uint8)
    all_segs, dscs, nsds, runtimes = [], [], [], []
    for step in range(STEPS):
        if step == 0 and case.boxes is None:
            all_segs.append(segs)
            dscs.append(0.0)
            nsds.append(0.0)
            runtimes.append(0.0)
            notes.append("no boxes: step 1 scores 0")
            continue
        prev = None
        if step > 0:
            prev = segs
            for c, click in enumerate(click_rule.next_clicks(segs, gts, range(1, k + 1), max_edt_voxels)):
                order[c].append(None if click is None else click.kind)
                if click is not None:
                    clicks[c][click.kind].append(list(click.coord))
        step_case = dataclasses.replace(
            case, gts=None, prev_pred=prev, clicks=None if step == 0 else tuple(clicks),
            clicks_order=None if step == 0 else tuple(order))
        t0 = time.perf_counter()
        try:
            segs, report = predictor.predict_with_report(case.imgs, case.spacing, step_case.prompts(), prev)
            notes += [f"step {step + 1}: {n}" for n in report.notes]
        except Exception as err:  # a failed prediction scores as an empty one, as in the official loop
            segs = np.zeros(gts.shape, np.uint8)
            notes.append(f"step {step + 1}: prediction failed ({type(err).__name__}: {err}); scored as empty")
        runtimes.append(time.perf_counter() - t0)
        segs = np.asarray(segs, np.uint8)
        all_segs.append(segs)
        dsc, nsd = metrics.step_scores(gts, segs, case.spacing)
        dscs.append(dsc)
        nsds.append(nsd)
    row = metrics.case_row(case.name, dscs, nsds, runtimes, k)
    return CaseResult(case.name, row, np.stack(all_segs), clicks, order, notes)


def write_case_result(out_dir: str | os.PathLike, result: CaseResult) -> None:
    """``<out>/<case>.npz`` with ``segs`` (step 6), ``all_segs`` [6, D, H, W], ``clicks`` and ``clicks_order``."""
    write_npz(epath.Path(out_dir) / result.name, segs=result.all_segs[-1], all_segs=result.all_segs,
              clicks=object_array(result.clicks), clicks_order=object_array(result.clicks_order))


def case_files(cases_dir: str | os.PathLike) -> list[epath.Path]:
    """The ``.npz`` files of a folder, sorted by name (hidden and partial files skipped)."""
    folder = epath.Path(cases_dir)
    if not folder.exists():
        raise ValueError(f"{folder}: does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of .npz cases")
    return sorted((p for p in folder.iterdir() if p.name.endswith(".npz") and not p.name.startswith(".")),
                  key=lambda p: p.name)


def evaluate_cases(predictor, files: Sequence[epath.Path], out_dir: str | os.PathLike, *,
                   gts_dir: str | os.PathLike | None = None, on_case: Callable[[CaseResult | None, dict | None], None]
                   = lambda result, failure: None, max_edt_voxels: int = click_rule.MAX_EDT_VOXELS
                   ) -> tuple[list[CaseResult], list[dict]]:
    """Evaluates every case file, writing each case's ``.npz`` as soon as it is done.

    Args:
        predictor: the model adapter.
        files: case files.
        out_dir: where ``<case>.npz`` go.
        gts_dir: a folder of ``<case>.npz`` holding ``gts`` (else each case's own ``gts``).
        on_case: called after every case with its result, or with a failure dict ``{"case", "error"}``.

    Returns:
        ``(results, failures)``.
    """
    results, failures = [], []
    for path in files:
        try:
            gts_path = None if gts_dir is None else epath.Path(gts_dir) / path.name
            case = read_case(path, gts_path)
            result = evaluate_case(predictor, case, max_edt_voxels)
            write_case_result(out_dir, result)
        except Exception as err:  # one bad case never stops the run: it is listed with its reason
            failure = {"case": path.name, "error": f"{type(err).__name__}: {err}"}
            failures.append(failure)
            on_case(None, failure)
            continue
        results.append(result)
        on_case(result, None)
    return results, failures
