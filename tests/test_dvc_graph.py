"""dvc.yaml names every source file a stage runs: the modules its command imports (module level, inside functions,
and the model registry's `reelrank.x:Class` names, followed transitively), the files the bento is built from, and
the report template with what it imports. A stage that misses one would be skipped after that file changed and
leave stale outputs."""
import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

SRC = ROOT / "src"
MODULE_NAME = re.compile(r"reelrank(?:\.\w+)+")


def module_file(module: str) -> Path | None:
    "The source file of a `reelrank...` module, or None when the name is not a module (e.g. a function)."
    base = SRC.joinpath(*module.split("."))
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


def imported_modules(path: Path) -> set[str]:
    "The reelrank modules that the file at `path` imports anywhere in its body or names in a registry string."
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        code, package = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"), ""
    else:
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
        code = path.read_text()
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join(filter(None, [*parent, node.module or ""]))
            names.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.update(MODULE_NAME.findall(node.value.split(":")[0]) if node.value.startswith("reelrank.") else [])
    return {name for name in names if name.startswith("reelrank.") and module_file(name)}


def import_closure(module: str) -> set[Path]:
    "Every source file `python -m module` can execute, following imports transitively."
    files, todo = set(), [module]
    while todo:
        path = module_file(todo.pop())
        if path and path not in files:
            files.add(path)
            todo.extend(imported_modules(path))
            package_init = path.parent / "__init__.py"
            if package_init.is_file() and package_init not in files:
                files.add(package_init)
    return {path for path in files if path.stat().st_size > 0}


def stage_sources(name: str, stage: dict, params: dict) -> set[Path]:
    "The source files stage `name` runs or reads: its command's import closure plus the files it builds from."
    match = re.match(r"python -m (reelrank[\w.]*)", stage["cmd"])
    assert match, f"stage {name}: command {stage['cmd']!r} is not `python -m reelrank...`"
    sources = import_closure(match.group(1))
    if name == "package":
        bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
        bento_files = {path for pattern in bentofile["include"] for path in SRC.glob(pattern)}
        sources |= {ROOT / "bentofile.yaml", *bento_files}
        for path in bento_files:
            sources |= import_closure(".".join(path.relative_to(SRC).with_suffix("").parts))
    if name == "report":
        template = ROOT / params["report"]["template"]
        sources.add(template)
        for module in imported_modules(template):
            sources |= import_closure(module)
    return sources


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == ROOT / dep or (ROOT / dep) in path.parents for dep in deps)


def missing_source_deps(dvc_yaml: dict, params: dict) -> dict[str, list[str]]:
    "Per stage, the source files it runs or reads that its `deps` do not cover."
    missing = {}
    for name, stage in dvc_yaml["stages"].items():
        stage = stage.get("do", stage)
        deps = [dep for dep in stage.get("deps", []) if "${" not in dep]
        gaps = sorted(str(p.relative_to(ROOT)) for p in stage_sources(name, stage, params) if not covered(p, deps))
        if gaps:
            missing[name] = gaps
    return missing


def test_the_import_walker_sees_function_level_and_registry_imports():
    closure = {str(p.relative_to(SRC)) for p in import_closure("reelrank.select")}
    assert {"reelrank/models/base.py", "reelrank/models/sasrec.py", "reelrank/core.py"} <= closure
    assert "reelrank/service.py" not in closure


@pytest.mark.parametrize("stage_name", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_every_stage_depends_on_the_code_it_runs(stage_name):
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    gaps = missing_source_deps({"stages": {stage_name: dvc_yaml["stages"][stage_name]}}, params)
    assert not gaps, f"dvc.yaml stage {stage_name} misses deps on {gaps[stage_name]}"


def test_a_stage_missing_a_module_is_caught():
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    evaluate = dvc_yaml["stages"]["evaluate"]["do"]
    evaluate["deps"] = [dep for dep in evaluate["deps"] if dep != "src/reelrank/models"]
    assert "src/reelrank/models/sasrec.py" in missing_source_deps(dvc_yaml, params)["evaluate"]
