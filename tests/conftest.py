import pytest
import torch

import asl_cli  # noqa: F401  (registers the operator)

# Subprocesses get a guard against hangs only, never a time budget: on a loaded 2-core machine a
# correct run may take several times as long as on an idle one, and only a hang reaches an hour.
HANG_GUARD_S = 3600

CUDA = torch.cuda.is_available() and asl_cli.backends()["cuda"] == "compiled CUDA"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and the compiled CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
