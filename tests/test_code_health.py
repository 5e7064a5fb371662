"""Code health guards, checked on the sources: no internal work labels in code or docs, removed dead code stays gone,
one implementation of what used to be duplicated, the model never probes the platform, evaluation finds checkpoint
steps through Orbax's API, tables live in docs rather than module docstrings, and no function grows past the size
at which it should be split into named steps."""

import ast
import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sammed3d_jax"
MAX_FUNCTION_LINES = 70  # Statements of one function, docstring excluded (the longest today is 63).


def _tracked(*suffixes: str) -> list[pathlib.Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / n for n in names.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # An exported source tree without git.
        files = [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [p for p in files if p.suffix in suffixes and "fixtures" not in p.parts and p.is_file()]


def _sources() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py")) + [REPO / "train.py", REPO / "eval.py"]


def test_no_internal_work_labels_in_code_or_docs():
    # Spelled in pieces so this file does not match itself.
    labels = re.compile("|".join([r"\b" + "H" + r"[0-9]\b", "[Ii]ssue" + r" #?[0-9]", "[Oo]wned" + " by",
                                  "INTERFACES" + r"\.md", r"\bTO" + r"DO\b", r"\bFIX" + r"ME\b"]))
    hits = []
    for path in _tracked(".py", ".md", ".sh", ".toml", ".cfg", ".txt"):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if labels.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_removed_dead_code_stays_gone():
    from sammed3d_jax.data import clicks, transforms
    from sammed3d_jax.evaluation import inference, metrics

    gone = {clicks: ["threshold_logits", "sample_click_from_logits"], metrics: ["iou", "hausdorff95"],
            transforms: ["invert_crop_or_pad"], metrics.SurfaceDistances: ["hausdorff"]}
    present = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, names in gone.items() for name in names
               if hasattr(owner, name)]
    assert not present, present
    # One named mask threshold: every probability/logit cut of inference goes through it.
    assert inference.MASK_THRESHOLD == 0.5
    for path in (PACKAGE / "session.py", PACKAGE / "session_compute.py", PACKAGE / "predict.py",
                 PACKAGE / "evaluation" / "objects.py"):
        code = re.sub(r'""".*?"""|#.*', "", path.read_text(), flags=re.S)
        assert not re.search(r"[<>]=?\s*0\.5\b", code), f"{path.name} hard-codes a 0.5 threshold"


def test_one_implementation_of_each_former_duplicate():
    definitions = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                definitions.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    assert definitions["json_safe"] == ["sammed3d_jax/writers.py"] and "_clean" not in definitions
    assert "_overlap" not in definitions  # CropPad.overlap is public; predict used a private helper before.
    # The state/sharding/jit set-up is built in one place (training/setup.py) for the loop, benchmarks and tests.
    callers = sorted({str(p.relative_to(REPO)) for p in _sources() + sorted((REPO / "benchmarks").glob("*.py"))
                      if re.search(r"\b(create_train_state|state_shardings)\(", p.read_text())})
    assert callers == ["sammed3d_jax/training/setup.py", "sammed3d_jax/training/state.py"], callers
    # One plotter: only writers.py draws (training curves, evaluation and challenge plots go through plot_panels).
    plotters = sorted(str(p.relative_to(REPO)) for p in _sources() if "matplotlib" in p.read_text().replace(
        "matplotlib's", ""))
    assert plotters == ["sammed3d_jax/writers.py"], plotters
    # Library log levels are set in one place, cli.quiet_library_logs, which every entry point calls.
    for entry in ("train.py", "eval.py"):
        text = (REPO / entry).read_text()
        assert "quiet_library_logs()" in text and "setLevel" not in text and "set_verbosity" not in text, entry


def test_model_never_probes_the_platform():
    # The attention kernel comes from the config; entry points resolve "auto" (model.config.resolve_attention_impl).
    probes = {"default_backend", "devices", "local_devices", "platform", "device_kind", "backends"}
    hits = [f"{p.name}:{node.lineno}" for p in sorted((PACKAGE / "model").glob("*.py"))
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Attribute) and node.attr in probes]
    assert not hits, hits


def test_checkpoint_steps_come_from_orbax_not_its_folder_layout():
    text = (PACKAGE / "evaluation" / "checkpoints.py").read_text()
    assert "all_steps()" in text
    for private in ("commit_success", "_CHECKPOINT_METADATA", "orbax-checkpoint-tmp", "_METADATA"):
        assert private not in text, private


def test_tables_live_in_docs_not_in_module_docstrings():
    tables = []
    for path in _sources():
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        rows = [line for line in doc.splitlines() if line.strip().startswith("|") and line.strip().endswith("|")]
        if len(rows) >= 3:
            tables.append(str(path.relative_to(REPO)))
    assert not tables, tables


def _long_functions(source: str, limit: int) -> list[str]:
    long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            lines = node.end_lineno - body[0].lineno + 1
            if lines > limit:
                long.append(f"{node.name} ({lines} lines)")
    return long


def test_functions_stay_short():
    assert _long_functions("def f():\n    \"\"\"Doc.\"\"\"\n" + "    x = 1\n" * 3, 2) == ["f (3 lines)"]
    long = {str(p.relative_to(REPO)): _long_functions(p.read_text(), MAX_FUNCTION_LINES) for p in _sources()}
    long = {k: v for k, v in long.items() if v}
    assert not long, f"split into named steps: {long}"
