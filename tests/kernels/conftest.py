"""Without a GPU, run the Triton kernels in Triton's interpreter (on the CPU, numpy underneath).

Triton reads TRITON_INTERPRET when a function is decorated with @triton.jit (its own standard
library when triton is first imported, our kernels when `course_lib.kernels.flash_attention` is)
and again while it launches a kernel, so it is set before anything imports triton and stays set.
On a machine without CUDA nothing else can run a Triton kernel anyway; with CUDA it is left alone.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # too late to interpret: the tests' autouse check fails with an explanation
        pass
    else:
        os.environ["TRITON_INTERPRET"] = "1"
