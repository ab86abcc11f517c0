import pytest
from rt_checkpoints import dataset_for


@pytest.fixture(scope="session")
def datasets():
    """Datasets by (name, image shape), loaded once per session."""
    cache = {}

    def get(name: str, shape: tuple[int, int, int] | None = None):
        key = (name, shape)
        if key not in cache:
            cache[key] = dataset_for(name, shape)
        return cache[key]
    return get


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Checkpoint building interleaves with ONNX Runtime as the export does (see
    export/pipeline.py): one torch thread, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
