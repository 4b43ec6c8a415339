"""Builds the native library (csrc/ -> sparsesync/libsparsesync.so) with CMake; metadata lives in pyproject.toml.

Environment:
  SPARSESYNC_CUDA        0 | 1 | auto (default auto: compile csrc/*.cu when nvcc is found; no GPU needed to build)
  SPARSESYNC_CUDA_ARCH   CMAKE_CUDA_ARCHITECTURES (default 90)
  SPARSESYNC_BUILD_TYPE  CMake build type (default Release)
  CMAKE_ARGS             extra arguments for the CMake configure step
  CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: all cores)
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LIB_NAME = "libsparsesync.dylib" if sys.platform == "darwin" else "libsparsesync.so"
EXT_NAME = "sparsesync.libsparsesync"


def _install_file(src: Path, dest: Path) -> None:
    """Copy src to dest through a temporary file and an atomic rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs CMake and puts the library at sparsesync/<LIB_NAME> in the build dir (and, for editable installs /
    --inplace, in the source tree too: setuptools copies it there through get_ext_filename)."""

    def get_ext_filename(self, fullname: str) -> str:
        # called with the full dotted name and (from get_ext_fullpath) with its last component only
        if fullname in (EXT_NAME, EXT_NAME.rsplit(".", 1)[-1]):
            return os.path.join(*fullname.split(".")[:-1], LIB_NAME)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("sparsesync: CMake >= 3.18 is required to build the native library")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("SPARSESYNC_CUDA", "auto").strip() or "auto"
        cfg = os.environ.get("SPARSESYNC_BUILD_TYPE", "Release")
        args = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={cfg}",
                f"-DSPARSESYNC_CUDA={cuda}"]
        arch = os.environ.get("SPARSESYNC_CUDA_ARCH")
        if arch:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        self.announce(" ".join(args), level=2)
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--config", cfg, "--parallel", jobs], check=True)
        built = next((p for p in (build_dir / LIB_NAME, build_dir / cfg / LIB_NAME) if p.exists()), None)
        if built is None:
            raise RuntimeError(f"sparsesync: CMake did not produce {LIB_NAME} in {build_dir}")
        _install_file(built, Path(self.get_ext_fullpath(ext.name)))

    def copy_extensions_to_source(self) -> None:
        # editable installs / --inplace: put the library next to sparsesync/_native.py. Replaces the file atomically
        # (new inode) so that processes which already have the old library mapped keep working.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if not isinstance(ext, CMakeExtension):
                continue
            package, _, _ = self.get_ext_fullname(ext.name).rpartition(".")
            inplace = Path(build_py.get_package_dir(package)).resolve() / LIB_NAME
            regular = Path(self.build_lib) / self.get_ext_filename(ext.name)
            _install_file(regular, inplace)


cmdclass = {"build_ext": CMakeBuild}

try:  # the library is loaded with ctypes and does not depend on the Python ABI: tag wheels py3-none-<platform>
    try:
        from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
    except ImportError:
        from wheel.bdist_wheel import bdist_wheel as _bdist_wheel

    class BdistWheel(_bdist_wheel):
        def finalize_options(self):
            super().finalize_options()
            self.root_is_pure = False

        def get_tag(self):
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = BdistWheel
except ImportError:
    pass

setup(ext_modules=[CMakeExtension(EXT_NAME)], cmdclass=cmdclass)
