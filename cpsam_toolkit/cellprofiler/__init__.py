"""The CellProfiler module RunCellposeSAM, shipped inside the package.

``runcellposesam.py`` here is the plugin file CellProfiler loads from its plugins folder. In a
git checkout it is a link to ``cellprofiler_plugin/runcellposesam.py`` (one source, no copy);
an installed wheel holds the file itself. CellProfiler skips files starting with ``_`` (like
this one), so this folder can be given to ``cellprofiler --plugins-directory`` as it is.

Nothing here imports CellProfiler; ``cpsam cellprofiler`` and ``cpsam doctor`` use these helpers.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PLUGIN_NAME = "runcellposesam.py"
MODULE_NAME = "RunCellposeSAM"


def plugin_file() -> Path:
    """The plugin file of this installation (raises ``FileNotFoundError`` if it is missing)."""
    here = Path(__file__).resolve().parent / PLUGIN_NAME
    if here.is_file():
        return here
    checkout = Path(__file__).resolve().parents[2] / "cellprofiler_plugin" / PLUGIN_NAME
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(
        f"the CellProfiler module file {PLUGIN_NAME} is not in this installation ({here}); "
        "reinstall cpsam-toolkit (pip install --force-reinstall cpsam-toolkit)")


def plugins_directory() -> Path:
    """A folder to pass as ``--plugins-directory`` that holds the plugin (this package's)."""
    here = Path(__file__).resolve().parent
    return here if (here / PLUGIN_NAME).exists() else plugin_file().parent


def install(folder: str | os.PathLike) -> Path:
    """Copy the plugin file into ``folder`` (created; an older copy is replaced atomically)."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / PLUGIN_NAME
    tmp = folder / f".{PLUGIN_NAME}.part"
    shutil.copyfile(plugin_file(), tmp)
    os.replace(tmp, target)
    return target


def headless_command(plugins_dir: str | os.PathLike) -> str:
    """The ``cellprofiler`` command line that runs a pipeline with the plugin found."""
    import shlex

    return (f"cellprofiler -c -r -p PIPELINE.cppipe -i IMAGES -o OUTPUT "
            f"--plugins-directory {shlex.quote(str(plugins_dir))}")
