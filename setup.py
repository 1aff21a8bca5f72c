"""Package discovery, the one thing ``pyproject.toml`` cannot say: ``plugins/`` installs as ``lit_saferlhf_plugins``.

setuptools' ``[tool.setuptools.packages.find]`` names a package after its folder, so it would install
``plugins``. Here every package under ``lit_saferlhf/`` and ``plugins/`` is found (nested ones included)
and the second kind renamed; ``package-dir`` in ``pyproject.toml`` maps the name back to the folder.
Everything else (metadata, scripts, entry-point groups) lives in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

PLUGINS = find_packages(include=["plugins", "plugins.*"])

setup(
    packages=[
        *find_packages(include=["lit_saferlhf", "lit_saferlhf.*"]),
        *(name.replace("plugins", "lit_saferlhf_plugins", 1) for name in PLUGINS),
    ]
)
