import os

import torch

# Without CUDA, Triton kernels run only in its interpreter. Triton reads this when it is first imported,
# and diffusers imports it, so this takes effect only if nothing imported diffusers or triton before us
# (tests/conftest.py does: it must set the same variable at its top).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
