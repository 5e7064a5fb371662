"""The challenge's scores of one case: multi-class DSC and NSD per step, their AUCs, and the CSV row.

- DSC of a step: the mean over the classes present in ``gts`` (sorted ids) of the Dice of ``segs == c`` against
  ``gts == c`` (never NaN: each class is present in the ground truth).
- NSD of a step: the same mean of the normalised surface Dice at 2.0 mm (surface-distance definition,
  ``evaluation.metrics``), with the file's ``spacing`` passed unchanged along the array axes, as the official script
  does; computed only when that step's DSC > 0.2, else 0.
- DSC_AUC / NSD_AUC: trapezoid over the scores of steps 2-6 (the clicks; the box step is optional in the challenge)
  with unit spacing, so at most 4.0. ``*_Final``: step 6.
- ``runtime_upperbound`` = 90 s per class (the challenge's time limit).

Owns: ``CSV_COLUMNS``, ``multiclass_dsc``, ``multiclass_nsd``, ``step_scores``, ``auc``, ``case_row``. Imports
``evaluation.metrics``; must not import jax or the model.
"""

from collections.abc import Sequence

import numpy as np
from jaxtyping import Integer

from sammed3d_jax.evaluation import metrics as base

STEPS = 6
NSD_TOLERANCE_MM = 2.0
NSD_MIN_DSC = 0.2
SECONDS_PER_CLASS = 90
CSV_COLUMNS = (["CaseName", "TotalRunningTime"] + [f"RunningTime_{i}" for i in range(1, STEPS + 1)]
               + ["DSC_AUC", "NSD_AUC", "DSC_Final", "NSD_Final"] + [f"DSC_{i}" for i in range(1, STEPS + 1)]
               + [f"NSD_{i}" for i in range(1, STEPS + 1)] + ["num_class", "runtime_upperbound"])


def gt_classes(gts: Integer[np.ndarray, "d h w"]) -> list[int]:
    """The non-zero class ids present in ``gts``, ascending."""
    return [int(c) for c in np.unique(gts) if c != 0]


def multiclass_dsc(gts: Integer[np.ndarray, "d h w"], segs: Integer[np.ndarray, "d h w"]) -> float:
    """Mean Dice over the ground truth's classes; NaN if ``gts`` has no class."""
    classes = gt_classes(gts)
    if not classes:
        return float("nan")
    return float(np.mean([base.dice(segs == c, gts == c) for c in classes]))


def multiclass_nsd(gts: Integer[np.ndarray, "d h w"], segs: Integer[np.ndarray, "d h w"], spacing: Sequence[float],
                   tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Mean NSD at ``tolerance_mm`` over the ground truth's classes, ``spacing`` taken along array axes 0, 1, 2."""
    classes = gt_classes(gts)
    if not classes:
        return float("nan")
    return float(np.mean([base.normalized_surface_dice(segs == c, gts == c, spacing, tolerance_mm)
                          for c in classes]))


def step_scores(gts: Integer[np.ndarray, "d h w"], segs: Integer[np.ndarray, "d h w"], spacing: Sequence[float]
                ) -> tuple[float, float]:
    """``(DSC, NSD)`` of one step; NSD is 0 unless DSC > 0.2 (the official shortcut)."""
    dsc = multiclass_dsc(gts, segs)
    nsd = multiclass_nsd(gts, segs, spacing) if dsc > NSD_MIN_DSC else 0.0
    return dsc, nsd


def auc(scores: Sequence[float]) -> float:
    """Trapezoid over the last five scores (steps 2-6) with unit spacing."""
    v = np.asarray(scores, np.float64)[-(STEPS - 1):]
    return float(np.sum((v[1:] + v[:-1]) / 2.0))


def case_row(name: str, dscs: Sequence[float], nsds: Sequence[float], runtimes: Sequence[float], num_class: int
             ) -> dict:
    """The case's CSV row (keys in ``CSV_COLUMNS`` order) from its six per-step scores and run times."""
    if not len(dscs) == len(nsds) == len(runtimes) == STEPS:
        raise ValueError(f"need {STEPS} steps of DSC, NSD and run time, got {len(dscs)}, {len(nsds)}, {len(runtimes)}")
    row = {"CaseName": name, "TotalRunningTime": float(np.sum(runtimes))}
    row.update({f"RunningTime_{i}": float(t) for i, t in enumerate(runtimes, 1)})
    row.update({"DSC_AUC": auc(dscs), "NSD_AUC": auc(nsds), "DSC_Final": float(dscs[-1]), "NSD_Final": float(nsds[-1])})
    row.update({f"DSC_{i}": float(d) for i, d in enumerate(dscs, 1)})
    row.update({f"NSD_{i}": float(n) for i, n in enumerate(nsds, 1)})
    row.update({"num_class": int(num_class), "runtime_upperbound": SECONDS_PER_CLASS * int(num_class)})
    return {k: row[k] for k in CSV_COLUMNS}
