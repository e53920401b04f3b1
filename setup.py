"""Builds fastsgd._native: one extension per Cython module in fastsgd/_native/,
the C kernels in csrc/ linked into fastsgd._native.kernels alone.

The default build targets the baseline instruction set of the machine's
architecture: the AVX2 and AVX-512 kernels are compiled per function and
chosen at import, so a wheel built here runs on any x86-64.  OpenMP is used
when the compiler has it; without it the build warns and runs serial.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -ffp-contract=off: the kernels write every fused multiply-add explicitly;
# a compiler fusing the others would change the rounding away from torch's.
BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c11"]
OPENMP_FLAG = "-fopenmp"
# FASTSGD_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer, for
# `nox -s sanitize` (docs/reliability.md).  Any UB report is fatal.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer", "-g"]


def compiler_has_openmp(compiler_cmd):
    """Compile and link a tiny OpenMP program with the build's compiler."""
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        c_file = os.path.join(tmp, "probe.c")
        with open(c_file, "w") as f:
            f.write(src)
        cmd = compiler_cmd + [OPENMP_FLAG, c_file, "-o", os.path.join(tmp, "probe")]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


class BuildExt(build_ext):
    def build_extensions(self):
        compiler_cmd = list(getattr(self.compiler, "compiler_so", None) or ["cc"])[:1]
        use_openmp = (os.environ.get("FASTSGD_NO_OPENMP", "") == ""
                      and shutil.which(compiler_cmd[0]) is not None
                      and compiler_has_openmp(compiler_cmd))
        if not use_openmp:
            print("fastsgd: building without OpenMP; steps will run on one thread",
                  file=sys.stderr)
        sanitize = SANITIZE_FLAGS if os.environ.get("FASTSGD_SANITIZE", "") not in ("", "0") else []
        openmp = [OPENMP_FLAG] if use_openmp else []
        for ext in self.extensions:
            ext.extra_compile_args = BASE_FLAGS + openmp + sanitize
            ext.extra_link_args = openmp + sanitize
        super().build_extensions()


C_SOURCES = ["csrc/sgd_impls.c", "csrc/driver.c", "csrc/copy.c"]
C_HEADERS = ["csrc/fastsgd.h", "csrc/sgd_step.h", "csrc/sgd_loop.h", "csrc/master_loop.h",
             "csrc/stream_loop.h", "csrc/clip_loop.h", "csrc/average_loop.h", "csrc/sgd_instantiate.h",
             "csrc/half_instantiate.h", "csrc/half_convert.h", "csrc/half_simd.h"]
# In import order: each module cimports only those before it.
NATIVE_MODULES = ["kernels", "batch", "plan", "stepper", "clip", "roofline", "tensors"]


def native_extension(module):
    return Extension(
        f"fastsgd._native.{module}",
        sources=[f"fastsgd/_native/{module}.pyx"] + (C_SOURCES if module == "kernels" else []),
        depends=C_HEADERS,
        libraries=["m"],
        include_dirs=[numpy.get_include(), "csrc"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


extensions = [native_extension(module) for module in NATIVE_MODULES]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3",
                                                       "embedsignature": True}),
    cmdclass={"build_ext": BuildExt},
)
