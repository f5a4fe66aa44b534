"""Package discovery: `kernels/` installs as `gdn2_kernels` (a bare `kernels` would shadow the
Hugging Face `kernels` package that transformers probes)."""
from setuptools import find_packages, setup

kernel_packages = [
    "gdn2_kernels" + name[len("kernels"):] for name in find_packages(include=["kernels", "kernels.*"])
]
setup(
    packages=find_packages(include=["megatron_gdn2", "megatron_gdn2.*", "launch", "launch.*"])
    + kernel_packages,
    package_dir={"gdn2_kernels": "kernels"},
)
