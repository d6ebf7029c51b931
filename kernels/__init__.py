"""Triton kernels of fastdca (installed as `fastdca.kernels`): kernels and their launch functions only.

Autograd lives in `fastdca.ops`; this package never imports torch.autograd or model code.

Run from the repository root, Python puts the root on sys.path and `import kernels` would find this folder
instead of Hugging Face's `kernels` package, which transformers imports. Imported under that top-level name,
this file hands the name over to the installed package (or to ModuleNotFoundError where none is installed),
so the repository never shadows it, whatever the working directory.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _installed_kernels_spec():
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        return importlib.machinery.PathFinder.find_spec("kernels", path)

    _spec = _installed_kernels_spec()
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module      # what the import statement returns: the installed package
    _spec.loader.exec_module(_module)
