"""README promises that can be checked without running the commands: every output path its commands write at the top
of a checkout is ignored by git, and the quick start's predict example clicks on a file the quick start writes, on
the target its comment names."""

import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

from sammed3d_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# Options whose value is a path a command writes, and positional outputs (0-based) of the module commands.
OUTPUT_FLAGS = ("--out", "--outputs", "--json", "--workdir")
POSITIONAL_OUTPUTS = {"sammed3d_jax.convert": 1, "sammed3d_jax.export": 1, "sammed3d_jax.data.prepare": 1,
                      "sammed3d_jax.data.synthetic": 0, "sammed3d_jax.data.mni152": 0}


def _commands() -> list[list[str]]:
    """The ``python ...`` commands of README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if "python " in line:
                words = shlex.split(line[line.index("python "):].split(" & ")[0])
                commands.append(words)
    return commands


def _outputs(words: list[str]) -> list[str]:
    out = [words[i + 1] for i, w in enumerate(words[:-1]) if w in OUTPUT_FLAGS]
    out += [w.split("=", 1)[1] for w in words if w.split("=", 1)[0] in OUTPUT_FLAGS and "=" in w]
    if words[1:2] == ["-m"] and len(words) > 2:
        module, rest = words[2], [w for w in words[3:] if not w.startswith("-")]
        if module in POSITIONAL_OUTPUTS and len(rest) > POSITIONAL_OUTPUTS[module]:
            out.append(rest[POSITIONAL_OUTPUTS[module]])
        if module == "sammed3d_jax.cvpr25" and rest[:1] == ["make-cases"] and len(rest) > 2:
            out.append(rest[2])
    return [p for p in out if "://" not in p and "$" not in p and not p.isupper() and "..." not in p]


def test_gitignore_covers_what_the_readme_commands_write():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = sorted({p for words in _commands() for p in _outputs(words)})
    assert {"runs/default", "ckpt/turbo", "turbo.safetensors", "data/synth", "cases", "scan_mask.nii.gz"} <= set(
        outputs), outputs
    assert "runs/default" in outputs and all(not p.startswith("/") for p in outputs)
    proc = subprocess.run(["git", "check-ignore", "--no-index", "--stdin", "-v", "-n"], cwd=REPO, text=True,
                          input="\n".join(f"{p}/x" if "." not in pathlib.Path(p).name else p for p in outputs),
                          capture_output=True)
    not_ignored = [line.split("\t")[-1] for line in proc.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, f"README commands write paths git would pick up: {not_ignored}"


def test_quick_start_predict_clicks_the_ellipsoid_of_a_file_the_quick_start_writes():
    block = re.search(r"## Quick start on a CPU\n\n```bash\n(.*?)```", README, flags=re.S).group(1)
    words = shlex.split(block.replace("\\\n", " ").split("python -m sammed3d_jax.predict")[1].split("#")[0])
    args = dict(zip(words[::2], words[1::2]))
    # `python train.py` (configs/default.py: seed 0) generates its dataset in <workdir>/data/synthetic.
    assert args["--image"] == "runs/default/data/synthetic/imagesTr/synth_000_0000.nii.gz"
    assert args["--checkpoint"] == "runs/default"
    point, sign = args["--points"].split(":")
    _, labels, _, _ = synthetic.make_case(0, 0)
    assert sign == "+" and labels[tuple(int(v) for v in point.split(","))] == synthetic.LABELS["ellipsoid"]
