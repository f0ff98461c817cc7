import os
import sys

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton decides whether a kernel is
# compiled or interpreted when it is defined, i.e. when pointins_ops is first imported: this must come first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/oracle.py is imported by the backend test files as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
