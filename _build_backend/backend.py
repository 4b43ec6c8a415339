"""In-tree PEP 517 backend: setuptools.build_meta, plus the ``cmake`` PyPI package as a build requirement only when no
usable CMake (>= 3.18) is installed on the system. Everything else is plain setuptools (see setup.py)."""
from __future__ import annotations

import re
import shutil
import subprocess

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the whole backend)

CMAKE_MIN = (3, 18)


def _system_cmake_ok() -> bool:
    exe = shutil.which("cmake")
    if not exe:
        return False
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    m = re.search(r"(\d+)\.(\d+)", out)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= CMAKE_MIN


def _extra() -> list[str]:
    return [] if _system_cmake_ok() else [f"cmake>={CMAKE_MIN[0]}.{CMAKE_MIN[1]}"]


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + _extra()


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + _extra()
