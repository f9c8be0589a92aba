"""Test-environment shim, imported at interpreter start-up from a ``.pth`` file that
``.ci/vllm-tests.sh`` installs into the vLLM test venv (never part of the library).

The registry's Linux torchvision wheels are CUDA builds: next to the CPU torch their ``_C.so``
cannot load, and ``torchvision/_meta_registrations.py`` then fails on ``torchvision::nms``.
vLLM imports torchvision (``from vllm import LLM``; transformers' Pixtral image processor), in
every process it spawns. Before torchvision's first import this defines the two op schemas its
meta registrations need; it costs nothing until something imports torchvision. A machine with
PyTorch's own CPU wheels, or any GPU machine, does not need it.
"""

import sys


class _Hook:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            torch.ops.torchvision.nms.default
        except (AttributeError, RuntimeError):
            global _LIBRARY
            _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
            _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None


sys.meta_path.insert(0, _Hook())
