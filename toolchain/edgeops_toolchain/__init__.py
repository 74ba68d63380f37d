"""edgeops_toolchain: the host build pipeline (data checks → train → export → quantize →
validate → package → sign) and the ``edgeops`` command.

Heavy libraries (torch, onnx, onnxruntime, model_signing) are imported inside the steps
that use them, so importing this package and ``edgeops --help`` stay fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
