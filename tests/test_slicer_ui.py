"""Structure of the scripted module: .ui bindings, widget names, CMake lists, extension files.

Qt is not available in CI, so the .ui file is parsed as XML and AnomalySeg.py as Python
source (ast): every ``SlicerParameterName`` must name a parameter of the parameter node
wrapper with a widget type that the parameter node wrapper can connect to it, every
``self.ui.X`` used by the code must exist, and the CMake files must list every file.
"""

import ast
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "AnomalySeg"
SOURCE = MODULE / "AnomalySeg.py"
UI = MODULE / "Resources" / "UI" / "AnomalySeg.ui"

#: Widget classes slicer.parameterNodeWrapper connects, by parameter type (Slicer >= 5.4 docs).
CONNECTORS = {
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "int": {"QSpinBox", "QSlider"},
    "str": {"QLineEdit", "QTextEdit"},  # QComboBox needs a Choice validator
    "bool": {"QCheckBox", "QPushButton"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "enum": {"QComboBox"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QLineEdit", "QCheckBox",
              "QProgressBar", "QTableWidget", "QTextEdit", "QSlider", "QToolButton"}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI).getroot()


@pytest.fixture(scope="module")
def tree():
    return ast.parse(SOURCE.read_text(encoding="utf-8"))


def _widgets(ui):
    return {w.get("name"): w for w in ui.iter("widget")}


def _parameter_name(widget):
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property (stdset=0)"
            return prop.findtext("string")
    return None


def _class(tree, name):
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name]
    assert len(found) == 1, f"class {name} must be defined exactly once in AnomalySeg.py"
    return found[0]


def _parameter_kinds(tree):
    """Parameter name -> kind (float, int, str, bool, pathlib.Path, enum, node) of the wrapper class."""
    cls = _class(tree, "AnomalySegParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in cls.decorator_list)
    enums = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
             and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in n.bases)}
    kinds = {}
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        annotation = stmt.annotation
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            annotation = annotation.slice.elts[0]
        text = ast.unparse(annotation)
        kinds[stmt.target.id] = "enum" if text in enums else "node" if text.startswith("vtkMRML") else text
    return kinds


def test_ui_is_a_qmrml_widget_with_unique_names(ui):
    assert ui.find("class").text == "AnomalySeg"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "AnomalySeg"
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    sections = [w for w in ui.iter("widget") if w.get("class") == "ctkCollapsibleButton"]
    assert [w.get("name") for w in sections] == ["segmentCollapsibleButton", "trainingCollapsibleButton"]


def test_every_bound_widget_matches_a_parameter(ui, tree):
    kinds = _parameter_kinds(tree)
    bound = {}
    for name, widget in _widgets(ui).items():
        parameter = _parameter_name(widget)
        if parameter is None:
            continue
        assert parameter in kinds, f"{name} is bound to unknown parameter {parameter!r}"
        assert parameter not in bound, f"{parameter!r} is bound twice"
        allowed = CONNECTORS[kinds[parameter]]
        assert widget.get("class") in allowed, \
            f"{name} ({widget.get('class')}) cannot be connected to {parameter}: {kinds[parameter]}"
        bound[parameter] = name
    # every user-editable parameter has a widget; the rest are set by the code
    assert set(kinds) - set(bound) == {"modelPath", "anomalyMap", "anomalySegmentation"}
    assert bound["inputVolume"] == "inputSelector" and bound["percentile"] == "percentileSliderWidget"


def test_percentile_slider_range_matches_the_parameter(ui, tree):
    cls = _class(tree, "AnomalySegParameterNode")
    (stmt,) = [s for s in cls.body if isinstance(s, ast.AnnAssign) and s.target.id == "percentile"]
    low, high = (ast.literal_eval(a) for a in stmt.annotation.slice.elts[1].args)
    assert (low, high, ast.literal_eval(stmt.value)) == (80.0, 99.999, 98.0)
    slider = _widgets(ui)["percentileSliderWidget"]
    props = {p.get("name"): p[0].text for p in slider.findall("property")}
    assert float(props["minimum"]) == low and float(props["maximum"]) == pytest.approx(high)
    # the slider can show and step to every percentile of the calibration table above its minimum
    from AnomalySegLib.segmentation.calibration import TABLE_PERCENTILES

    top = TABLE_PERCENTILES[(TABLE_PERCENTILES >= low) & (TABLE_PERCENTILES < 100)]
    assert top.max() == pytest.approx(high)
    step = 10.0 ** -int(props["decimals"])
    assert float(props["singleStep"]) == pytest.approx(step)
    assert np.allclose(np.round(top / step) * step, top, atol=1e-9)
    assert float(props["value"]) == 98.0


def test_code_uses_only_existing_widgets(ui):
    source = SOURCE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    missing = used - set(_widgets(ui))
    assert not missing, f"widgets used by AnomalySeg.py but absent from the .ui: {sorted(missing)}"
    assert {"segmentButton", "segmentProgressBar", "segmentStatusLabel", "lesionTableWidget", "modelComboBox",
            "importModelButton", "startTrainingButton", "stopTrainingButton", "lossPlotLabel"} <= used


def test_mrml_widgets_get_the_scene_and_custom_widgets_are_declared(ui):
    widgets = _widgets(ui)
    mrml = {n for n, w in widgets.items() if w.get("class").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    connected = {c.findtext("receiver") for c in ui.iter("connection")
                 if c.findtext("sender") == "AnomalySeg" and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml == connected == {"inputSelector", "healthyVolumesSelector"}
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    assert used - QT_CLASSES <= declared, f"undeclared custom widgets: {sorted(used - QT_CLASSES - declared)}"
    for node_types in ui.iter("property"):
        if node_types.get("name") == "nodeTypes":
            assert [s.text for s in node_types.iter("string")] == ["vtkMRMLScalarVolumeNode"]


def test_module_class_and_test_follow_slicer_conventions(tree):
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    assert {"AnomalySeg", "AnomalySegWidget", "AnomalySegLogic", "AnomalySegTest"} <= names
    source = SOURCE.read_text(encoding="utf-8")
    for attribute in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{attribute} =" in source
    assert '"Segmentation")]' in source
    assert "def runTest(self)" in source
    # dependencies are installed on request only, never when the module is imported
    module_level_calls = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Expr)]
    assert not [c for c in module_level_calls if "install" in c or "ensureDependencies" in c]
    assert "pip_install" not in "".join(ast.unparse(n) for n in tree.body
                                        if not isinstance(n, (ast.ClassDef, ast.FunctionDef)))


def _cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    return match.group(1).split()


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    assert scripts == ["${MODULE_NAME}.py"]
    # the core package is globbed recursively (a new core file or sub-package needs no CMake edit)
    assert re.search(r"file\(GLOB_RECURSE ANOMALYSEGLIB_PYTHON_SCRIPTS\s+RELATIVE \$\{ANOMALYSEGLIB_DIR\}\s+"
                     r"CONFIGURE_DEPENDS\s+\$\{ANOMALYSEGLIB_DIR\}/\*\.py\s*\)", text), \
        "AnomalySeg/CMakeLists.txt must glob AnomalySegLib/**/*.py (GLOB_RECURSE, with CONFIGURE_DEPENDS)"
    assert "set(ANOMALYSEGLIB_DIR ${CMAKE_CURRENT_SOURCE_DIR}/../AnomalySegLib)" in text
    # every folder of the core holding Python files is a package (installed by pip and by the extension)
    assert not [p for p in (REPO / "AnomalySegLib").rglob("*") if p.is_dir() and p.name != "__pycache__"
                and list(p.glob("*.py")) and not (p / "__init__.py").exists()]
    resources = {r.replace("${MODULE_NAME}", "AnomalySeg") for r in _cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    existing = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*")
                if p.is_file() and p.suffix in (".png", ".ui", ".txt", ".pt", ".pth", ".json")}
    assert resources == existing
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "add_subdirectory(Testing)" in text and (MODULE / "Testing" / "CMakeLists.txt").is_file()
    python_files = {p.name for p in MODULE.glob("*.py")}
    assert python_files == {"AnomalySeg.py"}, "every top-level .py of the module must be listed (Slicer loads them)"


def test_extension_cmake_license_and_icons():
    text = (REPO / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(AnomalySeg)" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    for icon in (MODULE / "Resources" / "Icons" / "AnomalySeg.png", REPO / "Resources" / "AnomalySeg.png"):
        header = icon.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", header[16:24]) == (128, 128)
    requirements = (MODULE / "Resources" / "requirements.txt").read_text().splitlines()
    names = [line.split(">")[0].split("=")[0].strip() for line in requirements if line.strip() and not line.startswith("#")]
    assert "nibabel" in names and "torch" not in names  # torch comes from the PyTorch extension


def test_repository_urls_agree():
    """The extension metadata and the module's help link name the same repository."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    source = SOURCE.read_text(encoding="utf-8")
    repos = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+)", cmake + source))
    repos |= set(re.findall(r"githubusercontent\.com/([\w.-]+/[\w.-]+)", cmake))
    assert repos == {"anomalyseg/SlicerAnomalySeg"}, repos


#: Stand-ins for the Slicer macros the module's CMakeLists.txt calls: they record what would be built.
_SLICER_STUBS = """
cmake_minimum_required(VERSION 3.16.3)
project(AnomalySegCMakeCheck NONE)
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MODULE "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  file(WRITE ${CMAKE_BINARY_DIR}/scripts.txt "${MODULE_SCRIPTS}")
  file(WRITE ${CMAKE_BINARY_DIR}/resources.txt "${MODULE_RESOURCES}")
endfunction()
set(BUILD_TESTING OFF)
add_subdirectory(${MODULE_SOURCE} module)
"""


def _configure(tmp_path, source_root):
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(_SLICER_STUBS)
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(project), "-B", str(build), f"-DMODULE_SOURCE={source_root / 'AnomalySeg'}"],
                   check=True, capture_output=True, text=True, timeout=120)
    scripts = (build / "scripts.txt").read_text().split(";")
    return build, scripts


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cmake_installs_every_core_file_including_new_ones(tmp_path):
    """Configure the real AnomalySeg/CMakeLists.txt: every AnomalySegLib/**/*.py is copied beside the
    module and passed to slicerMacroBuildScriptedModule, files added later (also in a sub-package) included."""
    copy = tmp_path / "src"
    shutil.copytree(MODULE, copy / "AnomalySeg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "AnomalySegLib", copy / "AnomalySegLib", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "AnomalySegLib" / "zz_added_later.py").write_text("VALUE = 1\n")
    (copy / "AnomalySegLib" / "io" / "zz_added_later.py").write_text("VALUE = 1\n")
    build, scripts = _configure(tmp_path, copy)
    on_disk = sorted(p.relative_to(copy / "AnomalySegLib").as_posix() for p in (copy / "AnomalySegLib").rglob("*.py"))
    assert "zz_added_later.py" in on_disk and "io/zz_added_later.py" in on_disk
    assert scripts[0] == "AnomalySeg.py"
    module_build = build / "module"
    assert sorted(scripts[1:]) == [str(module_build / "AnomalySegLib" / name) for name in on_disk]
    for name in on_disk:
        assert (module_build / "AnomalySegLib" / name).read_bytes() == (copy / "AnomalySegLib" / name).read_bytes()
    resources = (build / "resources.txt").read_text().split(";")
    assert resources == ["Resources/Icons/AnomalySeg.png", "Resources/UI/AnomalySeg.ui", "Resources/requirements.txt"]


def _enum_values(tree, name):
    cls = _class(tree, name)
    return [ast.literal_eval(s.value) for s in cls.body if isinstance(s, ast.Assign)]


def test_training_choices_are_the_librarys():
    """The panel offers every method and profile of the core, with the core's defaults."""
    pytest.importorskip("torch")
    from AnomalySegLib.nn.methods import METHODS
    from AnomalySegLib.pipeline.profiles import DEFAULT_METHOD, PROFILE_CHOICES, PROFILES

    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    assert sorted(_enum_values(tree, "Method")) == sorted(METHODS)
    assert _enum_values(tree, "Profile") == list(PROFILE_CHOICES)
    cls = _class(tree, "AnomalySegParameterNode")
    defaults = {s.target.id: ast.unparse(s.value) for s in cls.body if isinstance(s, ast.AnnAssign) and s.value}
    assert defaults["method"] == "Method(DEFAULT_METHOD)" and DEFAULT_METHOD in METHODS
    assert defaults["profile"] == "Profile.AUTO"
    # every profile value fits its spin box (Qt clamps silently: a 224 px profile in a 0..99 box would train at 99)
    widgets = {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}
    boxes = {"epochs": "epochsSpinBox", "image_size": "imageSizeSpinBox", "base_width": "baseWidthSpinBox",
             "learning_rate": "learningRateSpinBox", "batch_size": "batchSizeSpinBox"}
    for key, name in boxes.items():
        props = {p.get("name"): p[0].text for p in widgets[name].findall("property")}
        for profile in PROFILES.values():
            assert float(props["minimum"]) <= profile[key] <= float(props["maximum"]), (name, profile[key])
        if key == "learning_rate":
            assert 10.0 ** -int(props["decimals"]) <= min(p[key] for p in PROFILES.values())


def test_extension_icon_and_screenshot_urls_name_files_of_this_repository():
    """EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS point into the repository's main branch at real PNGs."""
    text = (REPO / "CMakeLists.txt").read_text()
    prefix = "https://raw.githubusercontent.com/anomalyseg/SlicerAnomalySeg/main/"
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        (value,) = re.findall(rf'set\({variable} "([^"]+)"\)', text)
        for url in value.split():
            assert url.startswith(prefix), url
            path = REPO / url[len(prefix):]
            assert path.is_file(), f"{variable} names {path.relative_to(REPO)}, which does not exist"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    screenshot = REPO / "Resources" / "Screenshots" / "AnomalySeg.png"
    assert screenshot.stat().st_size < 300_000
    assert "Resources/Screenshots/AnomalySeg.png" in (REPO / "docs" / "SLICER.md").read_text(encoding="utf-8")
