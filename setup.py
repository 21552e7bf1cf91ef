"""Maps the repository's fixed layout onto import packages under ``conveyor``.

``protos/conveyor`` (contracts and their generated code) is ``conveyor``,
``shared/`` is ``conveyor.shared`` and ``services/`` is ``conveyor.services``, so
nothing called ``shared`` or ``services`` lands in site-packages. ``policies/``
(the default Cedar policy set) ships as the data package ``conveyor.policies``.
"""

from pathlib import Path

from setuptools import setup

PACKAGE_ROOTS = {
    "conveyor": "protos/conveyor",
    "conveyor.shared": "shared",
    "conveyor.services": "services",
    "conveyor.policies": "policies",
}


def _packages() -> list[str]:
    found = []
    for package, root in PACKAGE_ROOTS.items():
        for init in sorted(Path(root).rglob("__init__.py")):
            relative = init.parent.relative_to(root).parts
            found.append(".".join((package, *relative)))
    return found


setup(package_dir=PACKAGE_ROOTS, packages=_packages())
