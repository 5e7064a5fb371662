"""The off-centre crop options and their one check, shared by the data pipeline and the training config.

``target_offset`` (how far a training crop may move off the target's centre, as a fraction of the free room),
``target_offset_prob`` (the share of crops moved) and ``offset_mode`` (how the shift is drawn: ``OFFSET_MODES``).
``data.sampler`` draws the shifts; ``data.pipeline`` rejects bad values for direct users of the pipeline and
``training.run_config`` rejects them at start-up, naming the ``--config.data.`` flag; both ask
:func:`offset_problems`, so a new mode is added here once. Standard library only: the training config imports it
without importing the data pipeline.
"""

OFFSET_MODES = ("uniform", "target_voxel")


def offset_problems(target_offset: float, target_offset_prob: float, offset_mode: str) -> list[tuple[str, str]]:
    """``(option, what is wrong)`` for each invalid off-centre option; empty when all are valid."""
    problems = []
    if not 0.0 <= target_offset <= 1.0:
        problems.append(("target_offset", "must be in [0, 1] (a fraction of the free room around the target; "
                                          f"0 = upstream's centred crop), got {target_offset}"))
    if not 0.0 <= target_offset_prob <= 1.0:
        problems.append(("target_offset_prob", f"must be in [0, 1] (the share of crops shifted), got "
                                               f"{target_offset_prob}"))
    if offset_mode not in OFFSET_MODES:
        problems.append(("offset_mode", f"must be one of {', '.join(map(repr, OFFSET_MODES))}, got {offset_mode!r}"))
    return problems
