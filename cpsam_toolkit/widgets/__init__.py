"""Jupyter widgets: view, correct, finetune and evaluate inside the notebook (no Qt).

>>> from cpsam_toolkit.widgets import Viewer, Corrector, Finetuner, Evaluator
>>> Viewer(image, model)                       # thresholds re-run only post-processing
>>> c = Corrector("images/", model); c         # brush / eraser / fill / delete / undo, Save
>>> f = Finetuner(model, corrector=c); f       # background training, live curves, Save
>>> Evaluator(model, "test/")                  # per-image AP, AP vs IoU, worst-first FP/FN

The canvas is an anywidget (inline JavaScript, no build step, no CDN): the browser draws the
image and labels, zooms, pans and shows object details on hover; edits come back to Python as
compact events applied by :class:`LabelEditor`, which needs no browser and can be scripted.
Needs the ``jupyter`` extra (ipywidgets, anywidget); :class:`LabelEditor` needs only numpy.
"""

from __future__ import annotations

from .editor import LabelEditor, Stroke

__all__ = ["LabelEditor", "Stroke", "LabelCanvas", "Viewer", "Corrector", "Finetuner", "Evaluator"]

_LAZY = {
    "LabelCanvas": ".canvas",
    "Viewer": ".viewer",
    "Corrector": ".corrector",
    "Finetuner": ".finetuner",
    "Evaluator": ".evaluator",
}


def __getattr__(name: str):
    # the widget classes import ipywidgets/anywidget (and torch); LabelEditor does not
    if name in _LAZY:
        import importlib

        try:
            mod = importlib.import_module(_LAZY[name], __name__)
        except ModuleNotFoundError as e:
            if e.name in ("ipywidgets", "anywidget", "traitlets"):
                raise ModuleNotFoundError(
                    f"cpsam_toolkit.widgets.{name} needs {e.name}: pip install 'cpsam-toolkit[jupyter]'"
                ) from e
            raise
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
