"""Used by the Dockerfile while it builds (stdlib only, any Python >= 3.8); not part of the package.

    python deps.py constraints               the base image's torch stack as pip constraints ("name==version")
    python deps.py requirements PYPROJECT    tla_jobs' dependencies (plus $TLA_EXTRAS) as a requirements list

The constraints keep pip from replacing or upgrading the CUDA build of torch that the base image
carries: torch, torchvision, torchaudio, triton, and the nvidia-* and cuda-* libraries (newer torch
wheels pull in cuda-toolkit and cuda-bindings) are pinned to what is installed. A base image without
torch is refused, since pip would then fetch a torch of its own from PyPI.
"""

import importlib.metadata as md
import os
import sys

KEEP = ("torch", "torchvision", "torchaudio", "triton")


def constraints() -> int:
    pins = {}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in KEEP or name.startswith(("nvidia-", "cuda-")):
            pins[name] = dist.version
    if "torch" not in pins:
        sys.stderr.write("the base image has no torch: BASE_IMAGE must be an official pytorch/pytorch image\n")
        return 1
    print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))
    return 0


def requirements(pyproject: str) -> int:
    try:
        import tomllib
    except ImportError:  # Python < 3.11: pip's vendored copy of tomli
        from pip._vendor import tomli as tomllib
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in filter(None, (e.strip() for e in os.environ.get("TLA_EXTRAS", "").split(","))):
        reqs += project["optional-dependencies"][extra]
    print("\n".join(reqs))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["constraints"]:
        sys.exit(constraints())
    if sys.argv[1:2] == ["requirements"] and len(sys.argv) == 3:
        sys.exit(requirements(sys.argv[2]))
    sys.exit(__doc__)
