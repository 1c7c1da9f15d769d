"""Package layout: everything installs under the one import namespace `hf_vlm`.

Top-level folders of the repository are mapped into it with setuptools' package-dir, so
`modeling/coca` is imported as `hf_vlm.modeling.coca`. No generic top-level name (`modeling`,
`conversion`, ...) is ever installed. The rest of the metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

# repository folder -> import name
NAMESPACE_MAP = {
    "hf_vlm": "hf_vlm",
    "modeling": "hf_vlm.modeling",
    "conversion": "hf_vlm.conversion",
    "trainers": "hf_vlm.trainers",
    "model_cards": "hf_vlm.model_cards",
    "spaces": "hf_vlm.spaces",  # the Space folder (app, README, requirements, example photos) as package data
}

packages = []
for folder, name in NAMESPACE_MAP.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir={name: folder for folder, name in NAMESPACE_MAP.items()})
