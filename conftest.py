"""Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before any test
module imports triton (through train_gpt)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
