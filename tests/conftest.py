import os

# Without CUDA the Triton kernels run through Triton's interpreter, which is chosen when triton is first
# imported; conftest runs before any test module can import it (tests/test_kernels.py says so too).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
