"""Ship the Ansible side inside the wheel: `pip install qwen-fleet-orchestrator` (not only an
editable install from a checkout) gets the playbooks and roles it runs, under
orchestrator/_project/ (found by orchestrator/knowledge/roles.py). Metadata: pyproject.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# What the orchestrator reads or runs from the project root besides its own package.
PROJECT_FILES = ("ansible.cfg", "playbooks", "roles", "templates", "inventory", "sandbox")


class BuildWithProject(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout itself
            return
        here = Path(__file__).resolve().parent
        dest = Path(self.build_lib) / "orchestrator" / "_project"
        # build/ outlives a build: a file deleted from the checkout must not linger.
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name in PROJECT_FILES:
            source = here / name
            if source.is_dir():
                # symlinks=False: roles/gpu_check/module_utils links into the package.
                shutil.copytree(source, dest / name, symlinks=False, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(source, dest / name)


setup(cmdclass={"build_py": BuildWithProject})
