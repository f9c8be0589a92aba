from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

# Two cores on CI: keep torch from oversubscribing them when pytest runs in parallel helpers.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA
