"""The notebooks' ipywidgets explorers: controls that redraw one picture.

An explorer is a few controls (sliders, dropdowns) above a view.  Moving a control calls ``draw`` with every
control's value, by the name the control was given, and shows what it returns: a matplotlib Figure as a PNG
image (the figure is closed once drawn), a string as HTML.  Where a picture is slow to make (notebook 4 simulates
a dataset) the controls only set the values and a button redraws.

A headless run (papermill, ``make reproduce``) shows the first picture; in JupyterLab the picture follows the
controls.  ``tests/test_browser.py`` moves each explorer's control in a headless Chromium and checks that the
picture changes.
"""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as widgets

from .plots import figure_png


def _show(view: widgets.Box, content) -> None:
    """Put ``content`` (a Figure or an HTML string) in ``view``: an image's bytes are replaced in place."""
    if isinstance(content, str):
        view.children = [widgets.HTML(content)]
        return
    png = figure_png(content)
    if view.children and isinstance(view.children[0], widgets.Image):
        view.children[0].value = png
    else:
        view.children = [widgets.Image(format="png", value=png)]


def explorer(draw: Callable, controls: dict[str, widgets.ValueWidget], button: str = "",
             first=None) -> widgets.VBox:
    """Controls above a picture: ``draw(**{name: control.value})`` returns a Figure or an HTML string.

    Without ``button`` the picture is redrawn whenever a control moves; with it, when the button (so labelled)
    is pressed.  ``first``: the picture shown before any move (default: ``draw`` of the controls' start values).
    """
    view = widgets.Box()

    def redraw(*_) -> None:
        _show(view, draw(**{name: control.value for name, control in controls.items()}))

    if first is None:
        redraw()
    else:
        _show(view, first)
    if button:
        press = widgets.Button(description=button)
        press.on_click(redraw)
        return widgets.VBox([*controls.values(), press, view])
    for control in controls.values():
        control.observe(redraw, names="value")
    row = widgets.HBox(list(controls.values())) if len(controls) > 1 else next(iter(controls.values()))
    return widgets.VBox([row, view])


def utterance_slider(draw: Callable[[int], object], count: int, start: int = 0) -> widgets.VBox:
    """A slider over ``count`` utterances (0 .. count - 1) above ``draw(i)``, starting at ``start``."""
    slider = widgets.IntSlider(value=start, min=0, max=count - 1, description="utterance")
    return explorer(lambda utterance: draw(utterance), {"utterance": slider})
