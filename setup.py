from setuptools import setup

# kernels/ lives at the top of the repository but installs as fastdca.kernels: a top-level
# module named `kernels` would shadow the Hugging Face package that transformers imports.
setup(
    packages=["fastdca", "fastdca.commands", "fastdca.hf", "fastdca.kernels", "fastdca.ops", "fastdca.tasks",
              "fastdca.train"],
    package_dir={"fastdca": "fastdca", "fastdca.kernels": "kernels", "fastdca.tasks": "fastdca/tasks"},
    include_package_data=True,
)
