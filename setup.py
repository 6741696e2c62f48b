from setuptools import find_packages, setup

setup(
    name="sal-hf",
    version="0.1.0",
    description="Selective Adaptive Learning (SAL): backpropagation-free training for Hugging Face",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["sal_hf", "sal_hf.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range that the offline CPU build 2.13.0 satisfies (see README, Set-up).
        "torch>=2.4,<2.14",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=4.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.16"],
        "data": ["scikit-learn", "rdata", "mnist1d==0.0.2.post1"],
        "plots": ["matplotlib"],
        "dev": ["pytest", "ruff", "scikit-learn", "matplotlib", "deepspeed>=0.16", "pandas"],
    },
)
