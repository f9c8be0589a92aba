from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

# Two cores on CI: keep torch from oversubscribing them when pytest runs in parallel helpers.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def testbed_clip(tmp_path_factory) -> str:
    """The path of a random CLIP (model and tokenizer) whose vision dims are the LLaVA testbed's
    tower's: what CDPruner's clip option accepts on it (the testbed has no CLIP of its own)."""
    from tests.tiny_models import tiny_clip, tiny_clip_tokenizer
    from vispruner.testbed.model import load_testbed

    path = tmp_path_factory.mktemp("testbed_clip")
    model, _ = load_testbed()
    tiny_clip(model).save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    return str(path)
