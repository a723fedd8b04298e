from setuptools import find_packages, setup

setup(
    name="megatron_minitron",
    version="0.1.0",
    description="Minitron-SSM compression (prune + distil) for hybrid Mamba/Transformer "
    "models on Megatron-Core",
    packages=find_packages(include=["megatron_minitron", "megatron_minitron.*"]),
    python_requires=">=3.10",
    # torch is deliberately not pinned here: install it first (the CPU build on CPU
    # machines, the cluster's CUDA build on GPU nodes); see README.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "einops",
        "numpy",
        "packaging>=24.2",
        "psutil",  # megatron-core's checkpoint writer needs it (undeclared upstream)
        "pyyaml",
        "tokenizers>=0.19",
        "tqdm",
        "matplotlib",  # importance and report plots
        # megatron-core's Mamba mixer imports triton at module level (also on CPU)
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # CUDA-only kernels for clusters. NVIDIA apex is built from its own source
        # (github NVIDIA/apex); never install PyPI's unrelated `apex` package.
        "gpu": ["transformer-engine[pytorch]", "mamba-ssm", "causal-conv1d"],
        "test": ["pytest>=7", "tensorboard", "transformers>=5.25", "safetensors", "pyarrow",
                 "sentencepiece"],
        # prepare-data: Parquet corpora; SentencePiece tokenizer folders (tokenizer.model)
        "data": ["pyarrow", "sentencepiece", "transformers>=4.48"],
        "hf": ["transformers>=4.48", "safetensors"],
    },
    entry_points={"console_scripts": ["megatron-minitron=megatron_minitron.__main__:main"]},
)
