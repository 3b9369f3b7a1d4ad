from setuptools import find_packages, setup

setup(
    name="sftfuse",
    version="0.1.0",
    description="Fast, lean supervised fine-tuning of Hugging Face causal LMs: fused Triton kernels with CPU paths",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only `sftfuse` and its subpackages: never a top-level `kernels` (transformers imports one by that name).
    packages=find_packages(include=["sftfuse", "sftfuse.*"]),
    # kernels/*.c: the native NF4 decode, built from source at first use (sftfuse/kernels/_native.py)
    package_data={"sftfuse": ["data/*.jsonl", "data/*.json", "kernels/*.c"]},
    install_requires=[
        "torch>=2.5",
        "triton>=3.2",
        "transformers>=4.56",
        "safetensors>=0.4",
        "datasets>=3.0",
        "peft>=0.15",  # adapters saved and loaded in PEFT's format, and PEFT models patched
        "gguf>=0.10",  # the default model ships as a GGUF file
        "pyyaml>=6.0",  # config files
        "tqdm>=4.60",  # progress bars
        "matplotlib>=3.7",  # loss curves
    ],
    extras_require={
        "test": ["pytest>=8", "trl>=0.20", "bitsandbytes>=0.47", "accelerate>=1.0"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "bitsandbytes>=0.47", "accelerate>=1.0"],
    },
    entry_points={"console_scripts": ["sftfuse=sftfuse.train.cli:main"]},
)
