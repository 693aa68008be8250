"""Import-only stand-in for torchvision in the CPU test venv (never shipped).

The real torchvision wheel cannot load beside the CPU build of torch
("operator torchvision::nms does not exist"), yet SGLang imports
``torchvision.transforms`` at module level in code paths we never execute
on CPU (image processing). Attribute access works; calling anything fails.
"""
import sys
import types

__version__ = "0.0.0+moe_lb_cpu_stub"


class _Missing:
    def __init__(self, name: str):
        self._name = name

    def __call__(self, *a, **k):
        raise RuntimeError(f"torchvision stand-in: {self._name} is not available in the CPU test env")

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self._name}.{item}")

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self.__name__}.{item}")


class _SubmoduleFinder:
    """Serves any ``torchvision.<sub>`` import as a stub module."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if not name.startswith(__name__ + "."):
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(name, cls, is_package=True)

    @staticmethod
    def create_module(spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    @staticmethod
    def exec_module(module):
        pass


sys.meta_path.append(_SubmoduleFinder)
__path__ = []  # so submodule imports go through the finder above


def __getattr__(item):
    if item.startswith("__"):
        raise AttributeError(item)
    import importlib

    return importlib.import_module(f"{__name__}.{item}")
