"""Builds the `asl_cli._C` extension against the installed torch.

The C++ CPU kernels are always compiled. The CUDA kernels are compiled when nvcc is found or
FORCE_CUDA=1; with no visible GPU, TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX".
Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""
import glob
import os
import shutil
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit folder holding lib64/libcudart.so (torch sometimes guesses nvcc's parent)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "cuda"))
    candidates += ["/usr/local/cuda", cpp_extension.CUDA_HOME]
    for c in candidates:
        if c and glob.glob(os.path.join(c, "lib64", "libcudart.so*")) and os.path.exists(
            os.path.join(c, "bin", "nvcc")
        ):
            return c
    return None


def want_cuda():
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    if os.environ.get("ASL_NO_CUDA") == "1":
        return False
    return shutil.which("nvcc") is not None or find_cuda_home() is not None


def nvidia_pip_includes():
    """Headers shipped by torch's nvidia-* wheels (cublas, cusparse...) that a bare toolkit lacks."""
    out = []
    for p in sys.path:
        out += glob.glob(os.path.join(p, "nvidia", "cu*", "include"))
        out += glob.glob(os.path.join(p, "nvidia", "*", "include"))
    return sorted(set(d for d in out if os.path.isdir(d)))


def extensions():
    cxx = ["-O3", "-fopenmp-simd"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template that runs serially unless this unit is compiled
        # with OpenMP; libgomp.so.1 then resolves to the copy torch has already loaded, so the
        # kernels share torch's thread pool and torch.set_num_threads.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # One file per operator family and device: ext/*.cpp (schemas, checks, compositions),
    # ext/cpu/*.cpp, ext/cuda/*.cu; separate units build in parallel (MAX_JOBS).
    sources = sorted(glob.glob(os.path.join("ext", "*.cpp")) + glob.glob(os.path.join("ext", "cpu", "*.cpp")))
    backends = ["cpu"]
    if want_cuda():
        cuda_home = find_cuda_home()
        if cuda_home is None:
            sys.exit("asl build: CUDA requested but no toolkit with lib64/libcudart.so and bin/nvcc found; set CUDA_HOME")
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        import torch

        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob(os.path.join("ext", "cuda", "*.cu")))
        backends.append("cuda")
        ext = cpp_extension.CUDAExtension(
            "asl_cli._C",
            sources,
            include_dirs=[os.path.join(ROOT, "ext")] + nvidia_pip_includes(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
        print(f"asl build: CUDA_HOME={cuda_home} TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(detected)')}")
    else:
        ext = cpp_extension.CppExtension(
            "asl_cli._C", sources, include_dirs=[os.path.join(ROOT, "ext")], extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    print(f"asl build: compiling backends: {', '.join(backends)}")
    return [ext]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
