import os

# Without CUDA the Triton kernels run through Triton's interpreter, which is chosen when triton is first
# imported; conftest runs before any test module can import it (tests/test_kernels.py says so too).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """A small built-in corpus (300 stories, bpe:512) prepared once for the training-level tests."""
    from storyllama.data_prep.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("data") / "builtin"
    assert prepare_main(["--builtin", "--builtin_stories", "300", "--tokenizer", "bpe:512", "--out", str(out),
                         "--num_proc", "1"]) == 0
    return out
