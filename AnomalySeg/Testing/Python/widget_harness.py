"""Drive the AnomalySeg Widget outside the Slicer application (PyPI ``slicer-core`` MRML).

The module's real Widget and Logic code run against a real MRML scene; only what
slicer-core lacks is replaced, each by the smallest stand-in that behaves like the
real thing for what the module uses:

* Qt widgets (``qt``, ``ctk``, the .ui loader): fake widgets created from the real
  ``Resources/UI/AnomalySeg.ui`` (names, classes and ``SlicerParameterName`` bindings
  are read from it), implementing only the setters, properties and signals the
  module calls; ``QTimer`` timers fire when the test calls :meth:`Harness.processEvents`.
* ``slicer.parameterNodeWrapper``: Slicer's implementation is not on PyPI, and its
  source cannot be copied here. :func:`parameterNodeWrapper` below reproduces the
  behaviour the module relies on: typed values stored as strings in a
  ``vtkMRMLScriptedModuleNode`` (nodes as node references), one ModifiedEvent per
  changed value, ``StartModify``/``EndModify`` batching, ``WithinRange`` checks and
  ``connectGui`` two-way bindings by ``SlicerParameterName``. Where the real package
  is importable (``SLICER_PARAMETER_NODE_WRAPPER_PATH`` naming the folder that holds
  ``slicer/parameterNodeWrapper``), it is used instead.
* ``slicer.ScriptedLoadableModule``, ``slicer.i18n``, ``slicer.app`` and the message
  boxes of ``slicer.util`` (recorded, answered by the test).

Use :func:`install` in a pytest fixture; it returns a :class:`Harness` and undoes
everything on :meth:`Harness.close`.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import pathlib
import sys
import types
import typing
import xml.etree.ElementTree as ET
from typing import Any, Callable, Optional

import vtk

import slicer

MODULE_DIR = pathlib.Path(__file__).resolve().parents[2]
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AnomalySeg.ui"


# ----------------------------------------------------------------------------- Qt stand-ins


class Signals:
    """``obj.connect("signal(args)", slot)`` and emission by the fake itself."""

    def __init__(self) -> None:
        self._slots: dict = {}
        self._blocked = False

    def connect(self, signal: str, slot: Callable) -> None:
        self._slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal: str, slot: Callable) -> None:
        if slot in self._slots.get(signal, []):
            self._slots[signal].remove(slot)

    def blockSignals(self, block: bool) -> bool:
        was, self._blocked = self._blocked, bool(block)
        return was

    def emit(self, signal: str, *args) -> None:
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                slot(*args)


class FakeWidget(Signals):
    """Plain QWidget-like object: text, toolTip, enabled, value, width."""

    def __init__(self, name: str = "", className: str = "QWidget", parameter: Optional[str] = None) -> None:
        super().__init__()
        self.objectName, self.className, self.parameter = name, className, parameter
        self.text, self.toolTip, self.enabled, self.visible, self.width = "", "", True, True, 300
        self.pixmap = None
        self._value: Any = 0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v) -> None:
        changed = v != self._value
        self._value = v
        if changed:
            double = self.className in ("ctkSliderWidget", "QDoubleSpinBox", "ctkDoubleSpinBox")
            self.emit("valueChanged(double)" if double else "valueChanged(int)", v)

    def setPixmap(self, pixmap) -> None:
        self.pixmap = pixmap

    def setMRMLScene(self, scene) -> None:
        self.scene = scene


class FakeComboBox(FakeWidget):
    """QComboBox: items with user data, current index, currentIndexChanged(int)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.items: list = []  # [text, {role: data}]
        self._current = -1

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def currentIndex(self) -> int:
        return self._current

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    @property
    def currentText(self) -> str:
        return self.items[self._current][0] if 0 <= self._current < self.count else ""

    def addItem(self, text: str, data=None) -> None:
        self.items.append([text, {"user": data}])
        if self._current < 0:
            self.setCurrentIndex(0)

    def setItemData(self, index: int, data, role=None) -> None:
        self.items[index][1][role] = data

    def itemData(self, index: int, role=None):
        return self.items[index][1].get("user" if role is None else role)

    def clear(self) -> None:
        self.items, self._current = [], -1
        self.emit("currentIndexChanged(int)", -1)

    def setCurrentIndex(self, index: int) -> None:
        if index != self._current:
            self._current = index
            self.emit("currentIndexChanged(int)", index)


class FakeNodeComboBox(FakeWidget):
    """qMRMLNodeComboBox: currentNode / setCurrentNode, currentNodeChanged(vtkMRMLNode*)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._node = None
        self._checked: list = []

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def checkedNodes(self) -> list:  # qMRMLCheckableNodeComboBox
        return list(self._checked)


class FakeTableItem:
    def __init__(self, text: str = "") -> None:
        self._text, self.flags = text, 0

    def text(self) -> str:
        return self._text

    def setFlags(self, flags) -> None:
        self.flags = flags


class FakeTableWidget(FakeWidget):
    """QTableWidget: rows of items, header labels, cellDoubleClicked(int,int)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.columns, self.headers, self.cells = 0, [], {}
        self._rows = 0

    def setColumnCount(self, n: int) -> None:
        self.columns = n

    def setHorizontalHeaderLabels(self, labels) -> None:
        self.headers = list(labels)

    def setRowCount(self, n: int) -> None:
        self._rows = n
        self.cells = {k: v for k, v in self.cells.items() if k[0] < n}

    def rowCount(self) -> int:
        return self._rows

    def setItem(self, row: int, column: int, item) -> None:
        self.cells[(row, column)] = item

    def item(self, row: int, column: int):
        return self.cells.get((row, column))

    def rowTexts(self) -> list:
        return [[self.cells[(r, c)].text() for c in range(self.columns)] for r in range(self._rows)]


class FakeTimer(Signals):
    """QTimer: fires only when the harness processes events (deterministic tests)."""

    timers: list = []

    def __init__(self) -> None:
        super().__init__()
        self.active, self.singleShotMode, self.interval = False, False, 0
        FakeTimer.timers.append(self)

    def setSingleShot(self, value: bool) -> None:
        self.singleShotMode = bool(value)

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def isActive(self) -> bool:
        return self.active

    def fire(self) -> None:
        if self.singleShotMode:
            self.active = False
        self.emit("timeout()")

    @staticmethod
    def singleShot(ms: int, callback: Callable) -> None:
        timer = FakeTimer()
        timer.setSingleShot(True)
        timer.connect("timeout()", callback)
        timer.start()


class _Painting:
    """QPixmap/QPainter/QColor/QPen/QPointF: accept every call, record the lines drawn."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.lines = args, []

    def drawLine(self, *args) -> None:
        self.lines.append(args)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _qtModule() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QTableWidgetItem = FakeTableItem
    qt.Qt = types.SimpleNamespace(ItemIsSelectable=1, ItemIsEnabled=32, ToolTipRole=3, WaitCursor=16)
    qt.QFileDialog = types.SimpleNamespace(getOpenFileName=lambda *args: "")
    qt.QMessageBox = types.SimpleNamespace(Ok=1024, Critical=3, Warning=2, Information=1)
    for name in ("QPixmap", "QPainter", "QColor", "QPen", "QPointF"):
        setattr(qt, name, _Painting)
    return qt


WIDGET_CLASSES = {"QComboBox": FakeComboBox, "qMRMLNodeComboBox": FakeNodeComboBox,
                  "qMRMLCheckableNodeComboBox": FakeNodeComboBox, "QTableWidget": FakeTableWidget}


def loadUI(path) -> FakeWidget:
    """The .ui as fake widgets: ``root.children`` maps object names to widgets of the declared classes."""
    root = FakeWidget("AnomalySeg", "qMRMLWidget")
    root.children = {}
    for element in ET.parse(path).getroot().iter("widget"):
        name, className = element.get("name"), element.get("class")
        parameter = None
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.findtext("string")
        widget = WIDGET_CLASSES.get(className, FakeWidget)(name, className, parameter)
        for prop in element.findall("property"):  # initial values the module reads
            if prop.get("name") == "value" and prop.find("double") is not None:
                widget._value = float(prop.findtext("double"))
        root.children[name] = widget
    return root


def childWidgetVariables(widget) -> types.SimpleNamespace:
    return types.SimpleNamespace(**widget.children)


# ----------------------------------------------------------------------------- parameter node wrapper stand-in


class WithinRange:
    """Validator: the value must lie in [minimum, maximum]."""

    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"value {value} is not within [{self.minimum}, {self.maximum}]")


def _isNodeType(t) -> bool:
    return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)


def parameterNodeWrapper(cls):
    """Typed access to a vtkMRMLScriptedModuleNode, as Slicer's wrapper gives (see the module docstring)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    params = {}
    for name, hint in hints.items():
        validators = []
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            validators = [e for e in extras if isinstance(e, WithinRange)]
        if name in cls.__dict__:
            default = cls.__dict__[name]
        elif _isNodeType(hint):
            default = None
        else:
            default = {str: "", int: 0, float: 0.0, bool: False, pathlib.Path: pathlib.Path()}.get(hint)
            if isinstance(hint, type) and issubclass(hint, enum.Enum):
                default = next(iter(hint))
        params[name] = (hint, default, validators)

    def serialize(hint, value) -> str:
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return str(value.name)
        return repr(value) if hint in (float, int, bool) else str(value)

    def deserialize(hint, text: str):
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return hint[text]
        if hint is bool:
            return text == "True"
        return hint(float(text)) if hint in (float, int) else hint(text)

    class Wrapper:
        allParameters = params

        def __init__(self, parameterNode) -> None:
            object.__setattr__(self, "parameterNode", parameterNode)
            object.__setattr__(self, "_guiTags", {})
            for name, (hint, default, _v) in params.items():
                if not _isNodeType(hint) and not parameterNode.GetParameter(name):
                    parameterNode.SetParameter(name, serialize(hint, default))

        def __getattr__(self, name):
            if name not in params:
                raise AttributeError(name)
            hint = params[name][0]
            if _isNodeType(hint):
                return self.parameterNode.GetNodeReference(name)
            return deserialize(hint, self.parameterNode.GetParameter(name))

        def __setattr__(self, name, value) -> None:
            if name not in params:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            hint, _d, validators = params[name]
            if _isNodeType(hint):
                if value is not None and not isinstance(value, hint):
                    raise TypeError(f"{name} must be a {hint.__name__}")
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                return
            value = deserialize(hint, serialize(hint, value))
            for validator in validators:
                validator.validate(value)
            self.parameterNode.SetParameter(name, serialize(hint, value))  # Modified only when it changes

        def StartModify(self) -> int:
            return self.parameterNode.StartModify()

        def EndModify(self, wasModifying: int) -> None:
            self.parameterNode.EndModify(wasModifying)

        def AddObserver(self, event, callback, priority=0.0) -> int:
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag) -> None:
            self.parameterNode.RemoveObserver(tag)

        def connectGui(self, ui) -> int:
            """Bind every widget with a SlicerParameterName both ways; returns a tag for disconnectGui."""
            widgets = [w for w in vars(ui).values() if getattr(w, "parameter", None) in params]
            bindings = []

            def toGui(*args) -> None:
                for widget in widgets:
                    value = getattr(self, widget.parameter)
                    was = widget.blockSignals(True)
                    if isinstance(widget, FakeNodeComboBox):
                        widget.setCurrentNode(value)
                    elif isinstance(widget, FakeComboBox):
                        widget.setCurrentIndex([w[1]["user"] for w in widget.items].index(value.name)
                                               if value is not None and widget.items else -1)
                    elif widget.className in ("ctkPathLineEdit", "ctkDirectoryButton"):
                        widget.currentPath = str(value)
                    elif widget.className in ("QLineEdit", "QTextEdit"):
                        widget.text = value
                    else:
                        widget._value = value
                    widget.blockSignals(was)

            for widget in widgets:
                hint = params[widget.parameter][0]
                if isinstance(widget, FakeComboBox) and isinstance(hint, type) and issubclass(hint, enum.Enum):
                    widget.items = []
                    for member in hint:
                        widget.items.append([member.label() if hasattr(member, "label") else member.name,
                                             {"user": member.name}])

                def fromGui(value, widget=widget, hint=hint) -> None:
                    if isinstance(widget, FakeComboBox) and not isinstance(widget, FakeNodeComboBox):
                        value = hint[widget.items[value][1]["user"]]
                    setattr(self, widget.parameter, value)

                signal = {FakeNodeComboBox: "currentNodeChanged(vtkMRMLNode*)",
                          FakeComboBox: "currentIndexChanged(int)"}.get(type(widget))
                if signal is None:
                    signal = "valueChanged(double)" if hint is float else "valueChanged(int)"
                widget.connect(signal, fromGui)
                bindings.append((widget, signal, fromGui))
            tag = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, toGui)
            toGui()
            self._guiTags[tag] = bindings
            return tag

        def disconnectGui(self, tag) -> None:
            if tag is None:
                return
            for widget, signal, slot in self._guiTags.pop(tag, []):
                widget.disconnect(signal, slot)
            self.parameterNode.RemoveObserver(tag)

    Wrapper.__name__ = Wrapper.__qualname__ = cls.__name__
    Wrapper.__doc__ = cls.__doc__
    return Wrapper


# ----------------------------------------------------------------------------- ScriptedLoadableModule stand-ins


class ScriptedLoadableModule:
    def __init__(self, parent=None) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    """``parent.isEntered``, ``layout`` and ``resourcePath`` of the real base class."""

    def __init__(self, parent=None) -> None:
        self.parent = parent or types.SimpleNamespace(isEntered=True)
        self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

    def setup(self) -> None:
        pass

    def resourcePath(self, relativePath: str) -> str:
        return str(MODULE_DIR / "Resources" / relativePath)


class ScriptedLoadableModuleLogic:
    """``getParameterNode``: the module's singleton vtkMRMLScriptedModuleNode in ``slicer.mrmlScene``."""

    def __init__(self, parent=None) -> None:
        self.parent = parent

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode("AnomalySeg", "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag("AnomalySeg")
            node.SetName("AnomalySeg")
            node.SetAttribute("ModuleName", "AnomalySeg")
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest:
    pass


# ----------------------------------------------------------------------------- the harness


class Harness:
    """The loaded module, its Widget and the recorded dialogs; see :func:`install`."""

    def __init__(self, module, scene, undo) -> None:
        self.module, self.scene, self._undo = module, scene, undo
        self.errors: list = []
        self.warnings: list = []
        self.questions: list = []
        self.answer = True  # what confirm dialogs return
        self.widget = None

    def createWidget(self, entered: bool = True):
        self.widget = self.module.AnomalySegWidget(types.SimpleNamespace(isEntered=entered))
        self.widget.setup()
        return self.widget

    @property
    def ui(self):
        return self.widget.ui

    @property
    def rethresholdPending(self) -> bool:
        return self.widget._rethresholdTimer.isActive()

    def processEvents(self, until: Optional[Callable[[], bool]] = None, timeout: float = 120.0) -> None:
        """Fire the active timers (once, or until ``until()`` is true), like Qt's event loop would."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            for timer in list(FakeTimer.timers):
                if timer.active:
                    timer.fire()
            if until is None or until():
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the condition was not reached")
            time.sleep(0.02)

    def close(self) -> None:
        if self.widget is not None:
            self.widget.cleanup()
        for undo in reversed(self._undo):
            undo()
        FakeTimer.timers.clear()


def _realParameterNodeWrapper():
    folder = os.environ.get("SLICER_PARAMETER_NODE_WRAPPER_PATH")
    if not folder:
        return None
    init = pathlib.Path(folder) / "slicer" / "parameterNodeWrapper" / "__init__.py"
    spec = importlib.util.spec_from_file_location("slicer.parameterNodeWrapper", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["slicer.parameterNodeWrapper"] = module
    spec.loader.exec_module(module)
    return module


def install(scene, tmp_path: pathlib.Path, modulePath: Optional[pathlib.Path] = None) -> Harness:
    """Install the stand-ins, point ``slicer.mrmlScene`` at ``scene`` and load a fresh module copy.

    ``modulePath`` loads another copy of AnomalySeg.py (e.g. an older version, to show
    that a test fails there).
    """
    undo = []

    def setModule(name: str, module) -> None:
        previous = sys.modules.get(name)
        sys.modules[name] = module
        undo.append(lambda: sys.modules.__setitem__(name, previous) if previous is not None
                    else sys.modules.pop(name, None))

    def setAttr(obj, name: str, value) -> None:
        missing = object()
        previous = getattr(obj, name, missing)
        setattr(obj, name, value)
        undo.append(lambda: delattr(obj, name) if previous is missing else setattr(obj, name, previous))

    harness_box: dict = {}
    setModule("qt", _qtModule())
    setModule("ctk", types.ModuleType("ctk"))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    setModule("slicer.i18n", i18n)
    wrapperModule = _realParameterNodeWrapper()
    if wrapperModule is None:
        wrapperModule = types.ModuleType("slicer.parameterNodeWrapper")
        wrapperModule.parameterNodeWrapper = parameterNodeWrapper
        wrapperModule.WithinRange = WithinRange
        setModule("slicer.parameterNodeWrapper", wrapperModule)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    setModule("slicer.ScriptedLoadableModule", slm)

    app = types.SimpleNamespace(
        testingEnabled=lambda: False, setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None,
        commandOptions=lambda: types.SimpleNamespace(noMainWindow=False), temporaryPath=str(tmp_path),
        slicerUserSettingsFilePath=str(tmp_path / "settings" / "Slicer.ini"), slicerHome=str(tmp_path))
    setAttr(slicer, "app", app)
    setAttr(slicer, "mrmlScene", scene)
    setAttr(slicer.util, "loadUI", loadUI)
    setAttr(slicer.util, "childWidgetVariables", childWidgetVariables)
    setAttr(slicer.util, "mainWindow", lambda: None)
    setAttr(slicer.util, "errorDisplay", lambda text, *a, **k: harness_box["h"].errors.append(str(text)))
    setAttr(slicer.util, "warningDisplay", lambda text, *a, **k: harness_box["h"].warnings.append(str(text)))

    def confirm(text, *args, **kwargs) -> bool:
        harness_box["h"].questions.append(str(text))
        return harness_box["h"].answer

    setAttr(slicer.util, "confirmYesNoDisplay", confirm)
    setAttr(slicer.util, "confirmOkCancelDisplay", confirm)

    # a fresh copy of the module: other tests use the headless import (no application)
    spec = importlib.util.spec_from_file_location("AnomalySegUnderHarness", modulePath or MODULE_DIR / "AnomalySeg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SLICER_APP, "the stand-ins did not make the module see an application"
    harness = Harness(module, scene, undo)
    harness_box["h"] = harness
    return harness
