"""dt-bastion: an SSH certificate authority and bastion for TPM-attested devices."""

# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic),
# `--version` prints it without scanning installed packages (importlib.metadata is slow).
__version__ = "0.1.0"
