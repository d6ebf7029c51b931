"""Run from the repository root, as a clone's users run scripts, notebooks and `python -m fastdca.cli`: the
root is on sys.path there, and its `kernels/` folder must never shadow Hugging Face's `kernels` package,
which transformers imports (`pytest` alone does not put the root on sys.path, so these tests start Python
in the root themselves)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_transformers_imports_after_fastdca_from_the_root():
    code = ("import fastdca, fastdca.kernels.forward, transformers.modeling_utils\n"
            "print(fastdca.kernels.__file__)\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('missing')\n"
            "else:\n    print(kernels.__file__)\n")
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    ours, installed = done.stdout.split()
    assert ours == os.path.join(ROOT, "kernels", "__init__.py")           # fastdca's, under its own name
    # Hugging Face's package where it is installed (transformers 5.25 depends on it), else missing: never ours
    assert installed == "missing" or os.path.dirname(os.path.dirname(installed)) != ROOT


def test_cli_as_a_module_from_the_root(tiny_model_dir, tmp_path):
    done = _python("-m", "fastdca.cli", "inspect", "--model", str(tiny_model_dir), "--prompt", "ABC", "--dtype",
                   "float32", "--output", str(tmp_path / "maps"))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_without_the_installed_package_the_name_is_missing_not_ours():
    """Where Hugging Face's `kernels` is not installed, `import kernels` from the root fails as it would
    anywhere else (what transformers checks for), instead of importing fastdca's kernels."""
    code = ("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
            "else:\n    print('imported', kernels.__file__)\n")
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "missing kernels"
