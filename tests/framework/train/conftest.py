import sys
from pathlib import Path

import pytest
import torch

# Tests run in importlib mode (no test directory on sys.path); the tests here share `train_helpers` beside this file.
# Its name is unique, so adding this directory shadows nothing.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine spinning OpenMP workers make each
    step ~50x slower; restored afterwards so other test directories keep their setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
