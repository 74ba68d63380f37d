"""edgeops_toolchain: the host build pipeline (data checks → train → export → quantize →
validate → package → sign) and the ``edgeops`` command.

Heavy libraries (torch, onnx, onnxruntime, model_signing) are imported inside the steps
that use them, so importing this package and ``edgeops --help`` stay fast.
"""

import os

# Bit-reproducible training needs MKL's strict Conditional Numerical Reproducibility mode:
# without it, MKL's sgemm may pick different kernels or thread splits between two identical
# calls in one process (seen in CI: two trainings of the same project differed in the last
# bits of the first layer). MKL reads this once, at its first call, so it is set when the
# package is imported, before any step imports torch. A user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# Strict CNR holds only for a fixed thread count, and MKL by default may use fewer threads
# than asked when the machine is busy (seen again in CI: a rebuild under load differed from
# the first build in one weight's last bit). Fix it.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

__version__ = "0.1.0"

__all__ = ["__version__"]
