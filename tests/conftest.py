import pytest
import torch

import asl_cli  # noqa: F401  (registers the operator)

CUDA = torch.cuda.is_available() and asl_cli.backends()["cuda"] == "compiled CUDA"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and the compiled CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
