#!/usr/bin/env python3
"""Build the offline bundle: one archive that installs AsymKD on a Linux machine without network.

  tools/bundle.py [--out dist/asymkd-bundle-VERSION-linux-x86_64.tar] [--variants cpu,cuda]
                  [--python-version 3.11] [--platform manylinux_2_28_x86_64]
                  [--wheels-from DIR]

The archive holds one folder:

  asymkd_qgis.zip       the plugin (Plugins > Manage and Install Plugins > Install from ZIP)
  requirements.txt      the engine's pinned requirements
  wheels/common/        the wheels both torch builds need, and the engine's own wheel
  wheels/torch-cpu/     torch and torchvision, CPU build (torch's CPU index)
  wheels/torch-cuda/    torch and torchvision, CUDA build (the package registry), the CUDA libraries, triton
  install.sh            installs the plugin into a QGIS profile and the engine environment
  README.txt

Wheels are downloaded with `pip download` for the given Python version and platform, each
torch build resolved with all the pinned requirements (common 0.2 GB, CUDA build 2.9 GB).
`--wheels-from DIR` takes them from a local folder of the same layout instead (or a flat folder:
all of it is wheels/common), e.g. for tests.
The plugin's "Create engine environment from a folder..." installs from the unpacked folder too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from asymkd_qgis.requirements import requirement_lines  # noqa: E402
from plugin_package import build_zip  # noqa: E402

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REGISTRY = "https://pypi.org/simple"
VARIANTS = ("cpu", "cuda")

INSTALL_SH = r"""#!/bin/sh
# Installs AsymKD without any network: the QGIS plugin into a QGIS profile, and the engine
# environment (a Python venv) from the wheels beside this script.
#   ./install.sh [cpu|cuda]      default: cuda when nvidia-smi lists a GPU and the bundle has it
# PYTHON: the Python 3.10+ to build the environment from (default python3; it must match the
# bundle's Python version). QGIS_PROFILES_DIR, QGIS_PROFILE: where QGIS keeps the profile.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
profile=${QGIS_PROFILES_DIR:-$HOME/.local/share/QGIS/QGIS3/profiles}/${QGIS_PROFILE:-default}
variant=${1:-}
if [ -z "$variant" ]; then
  if [ -d "$here/wheels/torch-cuda" ] && nvidia-smi -L >/dev/null 2>&1; then variant=cuda; else variant=cpu; fi
fi
if [ ! -d "$here/wheels/torch-$variant" ]; then
  builds=$(ls "$here/wheels" | sed -n 's/^torch-//p' | tr '\n' ' ')
  echo "This bundle has no torch-$variant wheels: choose one of: $builds" >&2
  exit 2
fi
plugins="$profile/python/plugins"
mkdir -p "$plugins"
rm -rf "$plugins/asymkd_qgis"
"$python" -m zipfile -e "$here/asymkd_qgis.zip" "$plugins/"
env="$profile/asymkd/engine-env"
rm -rf "$env"
trap 'status=$?; if [ $status -ne 0 ]; then
  rm -rf "$env"; echo "Installing the engine failed; nothing was left in $env." >&2
fi' EXIT
"$python" -m venv "$env"
"$env/bin/python" -m pip install --disable-pip-version-check --no-input --no-index \
  --find-links "$here/wheels/common" --find-links "$here/wheels/torch-$variant" \
  -r "$here/requirements.txt" asymkd
echo "AsymKD is installed: plugin in $plugins/asymkd_qgis, engine (torch $variant) in $env."
echo "Start QGIS and enable AsymKD in Plugins > Manage and Install Plugins > Installed."
"""

README_TXT = """AsymKD offline bundle {version}

Install without network on Linux (Python {python}, {platform}):

  ./install.sh            # the plugin into the default QGIS profile, the engine with torch for this machine
  ./install.sh cpu        # or choose the torch build: cpu or cuda

Or from QGIS: install asymkd_qgis.zip (Plugins > Manage and Install Plugins > Install from ZIP),
then Plugins > AsymKD > Create engine environment from a folder... and choose this folder.
"""


def engine_version() -> str:
    text = (REPO / "backend" / "asymkd" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)


def engine_wheel(out: Path, python: str = sys.executable) -> Path:
    """The engine's own wheel, built from a copy of backend/ (no build files in the source tree)."""
    with tempfile.TemporaryDirectory(prefix="asymkd-wheel-") as tmp:
        copy = Path(tmp) / "backend"
        shutil.copytree(REPO / "backend" / "asymkd", copy / "asymkd",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(REPO / "backend" / "pyproject.toml", copy / "pyproject.toml")
        before = set(out.glob("asymkd-*.whl"))
        subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), str(copy)], check=True)
    made = sorted(set(out.glob("asymkd-*.whl")) - before) or sorted(out.glob("asymkd-*.whl"))
    if not made:
        raise SystemExit("building the engine wheel wrote nothing")
    return made[-1]


# pip matches --platform exactly: every manylinux tag an x86-64 Linux with glibc 2.28 runs.
MANYLINUX = ("manylinux2014_x86_64",) + tuple(f"manylinux_2_{minor}_x86_64" for minor in range(17, 29))
# Projects that belong to one torch build (CUDA libraries, compiler), never to common/.
TORCH_ONLY = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia[_-].*|cuda[_-].*)-", re.IGNORECASE)


def _download(target: Path, requirements: list[str], python_version: str, platform: str,
              index: str | None = None) -> None:
    abi = "cp" + python_version.replace(".", "")
    platforms = [platform] + [tag for tag in MANYLINUX if tag != platform] + ["any"]
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3",
            "--abi", "none", *(arg for tag in platforms for arg in ("--platform", tag)), "-d", str(target),
            *requirements]
    if index:
        argv += ["--index-url", index, "--extra-index-url", REGISTRY]
    print(" ".join(argv), flush=True)
    if subprocess.run(argv).returncode != 0:
        where = f"torch's CPU index {index} and the registry" if index else "the package registry"
        raise SystemExit(f"pip could not download the wheels for {target.name} from {where} (its message is "
                         "above); for a bundle without that build, leave it out of --variants")


def partition(resolved: dict[str, set[str]]) -> tuple[set[str], dict[str, set[str]]]:
    """Wheel names for common/ and for each torch build, from each build's full resolution.

    With two builds, common/ is what both resolutions share; with one, everything but
    the torch build's own projects (TORCH_ONLY)."""
    if len(resolved) > 1:
        common = set.intersection(*resolved.values())
    else:
        (names,) = resolved.values()
        common = {name for name in names if not TORCH_ONLY.match(name)}
    return common, {variant: names - common for variant, names in resolved.items()}


def collect_wheels(wheels: Path, requirements: Path, variants: list[str], python_version: str, platform: str,
                   wheels_from: Path | None) -> None:
    common = wheels / "common"
    common.mkdir(parents=True, exist_ok=True)
    if wheels_from is not None:
        source = Path(wheels_from)
        for path in sorted((source / "common" if (source / "common").is_dir() else source).glob("*.whl")):
            shutil.copy2(path, common / path.name)
        for variant in variants:
            folder = source / f"torch-{variant}"
            if folder.is_dir():
                (wheels / f"torch-{variant}").mkdir(exist_ok=True)
                for path in sorted(folder.glob("*.whl")):
                    shutil.copy2(path, wheels / f"torch-{variant}" / path.name)
        return
    # Each build is resolved as a whole (torch pinned), so no other requirement pulls in a
    # torch of another version; a current pip reports download progress.
    lines = requirement_lines(requirements)
    resolved: dict[str, set[str]] = {}
    for variant in variants:
        folder = wheels / f"all-{variant}"
        _download(folder, lines + ["pip"], python_version, platform, CPU_INDEX if variant == "cpu" else None)
        resolved[variant] = {path.name for path in folder.glob("*.whl")}
    shared, own = partition(resolved)
    for name in shared:  # the same file in every resolution: the first build's copy
        os.replace(wheels / f"all-{variants[0]}" / name, common / name)
    for variant in variants:
        folder = wheels / f"torch-{variant}"
        folder.mkdir(exist_ok=True)
        for name in own[variant]:
            os.replace(wheels / f"all-{variant}" / name, folder / name)
        shutil.rmtree(wheels / f"all-{variant}")


def build(out: Path, variants: list[str], python_version: str, platform: str,
          wheels_from: Path | None = None) -> Path:
    version = engine_version()
    name = f"asymkd-bundle-{version}"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="asymkd-bundle-", dir=out.parent) as tmp:
        stage = Path(tmp) / name
        stage.mkdir()
        build_zip(stage / "asymkd_qgis.zip")
        requirements = REPO / "backend" / "requirements.txt"
        shutil.copy2(requirements, stage / "requirements.txt")
        collect_wheels(stage / "wheels", requirements, variants, python_version, platform, wheels_from)
        engine_wheel(stage / "wheels" / "common")
        install = stage / "install.sh"
        install.write_text(INSTALL_SH, encoding="utf-8")
        install.chmod(0o755)
        (stage / "README.txt").write_text(README_TXT.format(version=version, python=python_version, platform=platform),
                                          encoding="utf-8")
        partial = out.with_name(out.name + ".partial")
        # Wheels are compressed already: a plain tar, written next to the target then renamed.
        with tarfile.open(partial, "w") as archive:
            archive.add(stage, arcname=name)
        os.replace(partial, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="the archive (default dist/asymkd-bundle-VERSION-linux-x86_64.tar)")
    parser.add_argument("--variants", default="cpu,cuda", help="torch builds to include: cpu, cuda or both")
    parser.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64")
    parser.add_argument("--wheels-from", default=None, help="take the wheels from this folder instead of downloading")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"--variants: {', '.join(unknown) or 'none'} given; choose from {', '.join(VARIANTS)}")
    if args.wheels_from and not Path(args.wheels_from).is_dir():
        raise SystemExit(f"--wheels-from: {args.wheels_from} is not a folder")
    out = Path(args.out or REPO / "dist" / f"asymkd-bundle-{engine_version()}-linux-x86_64.tar")
    print(build(out, variants, args.python_version, args.platform,
                Path(args.wheels_from) if args.wheels_from else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
