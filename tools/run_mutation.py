#!/usr/bin/env python
"""
Mutation testing (``make mutation``): mutmut changes one small thing at a time in a module (an
operator, a constant, a dropped argument, ...) and runs that module's fast tests against each
change; a mutant is killed when a test fails. Prints each module's score and the surviving
mutants.

    python tools/run_mutation.py                     # every module of GROUPS
    python tools/run_mutation.py matcher criterion   # some of them

mutmut 3 imports the mutated code from ``mutants/src`` and runs every test that covers a mutated
function, so each group runs in its own staging copy (``build/mutation/<group>``: the package
under ``src/``, the tests, configs and tools beside it) with only its own fast tests selected.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGING = REPO / "build" / "mutation"
# group -> (modules to mutate, globs relative to the staging root; the fast tests that cover them)
GROUPS = {
    "criterion": (
        ["src/deformable_detr/modeling/criterion.py"],
        ["tests/test_criterion.py", "tests/test_denoising.py"],
    ),
    "matcher": (
        ["src/deformable_detr/modeling/matcher.py"],
        ["tests/test_matcher.py", "tests/test_criterion.py"],
    ),
    "dataset_mapper": (
        ["src/deformable_detr/data/dataset_mapper.py"],
        ["tests/test_dataset_mapper.py", "tests/test_augmentation.py"],
    ),
    # the atomic writes, resume and earlier layouts (conversion has its own slow parity tests)
    "checkpoint": (
        ["src/deformable_detr/checkpoint/atomic.py", "src/deformable_detr/checkpoint/layout.py"],
        ["tests/test_checkpoint.py"],
    ),
    "export": (["src/deformable_detr/export.py"], ["tests/test_export.py"]),
    "two_stage": (
        ["src/deformable_detr/modeling/two_stage.py"],
        ["tests/test_deformable_transformer.py"],
    ),
    "mobilenet_v2": (
        ["src/deformable_detr/modeling/backbone/mobilenet_v2.py"],
        ["tests/test_mobilenet_v2.py"],
    ),
}


def _toml_list(values):
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def stage(group):
    """A fresh staging copy for the group: mutmut's cache would keep old verdicts when only the
    tests changed."""
    modules, tests = GROUPS[group]
    root = STAGING / group
    shutil.rmtree(root, ignore_errors=True)
    for name, source in [("src/deformable_detr", REPO / "projects" / "deformable_detr"),
                         ("tests", REPO / "tests"), ("configs", REPO / "configs"),
                         ("tools", REPO / "tools")]:
        shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pyproject.toml").write_text(
        (REPO / "pyproject.toml").read_text()
        + "\n[tool.mutmut]\n"
        + 'source_paths = ["src"]\n'
        + f"only_mutate = {_toml_list(modules)}\n"
        + 'also_copy = ["configs", "tools"]\n'
        + f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        + 'pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow and not cuda"]\n'
    )
    return root


def results(root):
    """{mutant name: status} from mutmut's own report."""
    report = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout
    statuses = {}
    for line in report.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            statuses[name] = status
    return statuses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="*", metavar="GROUP",
                        help=f"some of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants run in parallel")
    args = parser.parse_args(argv)
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    # One thread per mutant: mutmut forks its workers, and OpenMP pools do not survive a fork.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the staged package, never the checkout's, is under test
    scores = {}
    for group in args.groups or GROUPS:
        root = stage(group)
        run = subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)],
            cwd=root, env=env, stdout=subprocess.DEVNULL,
        )
        if run.returncode != 0:
            sys.exit(f"mutmut failed on {group}: run `{sys.executable} -m mutmut run` in {root}")
        statuses = results(root)
        for name, status in sorted(statuses.items()):
            if status != "killed":
                print(f"{group}: {status:>12}  {name}")
        killed = sum(status == "killed" for status in statuses.values())
        scores[group] = (killed, len(statuses))
    print("\n| module | killed | mutants | score |\n|---|---|---|---|")
    for group, (killed, total) in scores.items():
        print(f"| {group} | {killed} | {total} | {100 * killed / max(total, 1):.1f}% |")
    killed, total = (sum(column) for column in zip(*scores.values()))
    print(f"| all | {killed} | {total} | {100 * killed / max(total, 1):.1f}% |")
    print(f"show a mutant: cd build/mutation/GROUP && {sys.executable} -m mutmut show NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
