from setuptools import find_packages, setup

setup(
    name="mask2former_d2",
    version="0.1.0",
    description="MaskFormer and Mask2Former for Detectron2",
    packages=find_packages(exclude=("tests", "tests.*", "configs", "demo", "datasets", "benchmarks")),
    # Data files read at run time (the ADE20K-full and YouTube-VIS class tables, the model zoo).
    package_data={"mask2former_d2.data.datasets": ["*.json"], "mask2former_d2": ["model_zoo.json"]},
    python_requires=">=3.8",
    install_requires=[],
    # Deployment (tools/export_model.py, ONNX Runtime inference); never needed to import the package.
    # Hugging Face conversion (tools/convert_hf_to_d2.py, tools/convert_d2_to_hf.py) and its tests.
    extras_require={
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "hf": ["transformers>=4.40", "safetensors>=0.4"],
    },
)
