"""The CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation" protocol for our model.

Modules: ``safe_npz`` (restricted reading of the challenge's ``.npz``), ``cases`` (a case and its prompts),
``boxes`` (the box rule and the challenge-to-our axis mapping), ``clicks`` (the official click rule), ``metrics``
(DSC/NSD per step, AUC, CSV row), ``adapter`` (a case through our model), ``evaluate`` (the six-step loop),
``report`` (CSV, summary, plot), ``make_cases`` (cases from a dataset) and ``__main__`` (the command line).
"""
