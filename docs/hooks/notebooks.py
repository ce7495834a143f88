"""MkDocs hook: one Markdown page per notebook processed by nbdev (`_proc/*.ipynb`).

`nbdev.serve.proc_nbs` leaves notebooks meant for Quarto: a raw front-matter cell, `show_doc` cells carrying
`#| echo: false` and `#| output: asis`, exported cells emptied, and doc links of the form `/metrics.html#name`.
Quarto is not installable here, so this hook does its part of the job: it turns each processed notebook into
Markdown (prose as written, example code as Python blocks, the outputs of what processing ran) that
Material for MkDocs renders like any hand-written page, and lists the pages in the navigation in notebook order.
On the way, source links and doc links of names a page defines point at that page's own definitions, and a
link to a method without an entry of its own points at its class.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

PROC = "_proc"
NOTEBOOKS = "notebooks"
NAV_SECTION = "Notebooks (API)"

_DIRECTIVE = re.compile(r"^#\|\s*([\w-]+)\s*:?\s*(.*)$")
# nbdev links a backticked symbol to `/<page>.html#<anchor>` (root-relative, since no doc host is configured);
# relative `.md` links let MkDocs check them and make them work under any base URL
_DOC_LINK = re.compile(r"\]\(/([\w.-]+)\.html(#[^)\s]*)?\)")
# a notebook links to another as 03_metrics.ipynb; its page is metrics.md (nbdev's name: no number prefix)
_NOTEBOOK_LINK = re.compile(r"\]\((?:\d+[a-zA-Z0-9]*_)?([\w.-]+?)\.ipynb(#[^)\s]*)?\)")
# a notebook links to pages and pictures in docs/ as ../docs/<file>; on the site they sit next to the pages
_DOCS_FILE = re.compile(r"(\]\(|src=\")\.\./docs/")
_SHOW_DOC_HEADING = re.compile(r"^(#{1,6}) (\S+)$", re.MULTILINE)
# nbdev's link to a definition: <repository>/blob/<branch>/<module path below src/>#L<line>
_SOURCE_LINK = re.compile(r"\[source\]\(([^)\s]+/)reelrank/[\w/]+\.py#L\w+\)")


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def _links(markdown: str) -> str:
    markdown = _DOC_LINK.sub(lambda m: f"]({m.group(1)}.md{m.group(2) or ''})", markdown)
    markdown = _NOTEBOOK_LINK.sub(lambda m: f"]({m.group(1).lower()}.md{m.group(2) or ''})", markdown)
    return _DOCS_FILE.sub(r"\1", markdown)


def _directives(source: str) -> tuple[dict[str, str], str]:
    "Quarto cell options (`#| key: value` lines at the top) and the code after them."
    lines = source.splitlines()
    options = {}
    while lines and (match := _DIRECTIVE.match(lines[0])):
        options[match.group(1)] = match.group(2).strip()
        lines.pop(0)
    return options, "\n".join(lines).strip("\n")


def _fence(text: str, lang: str = "text") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


def _definitions(module_file: Path) -> dict[str, int]:
    "The line of each top-level function and class of a module, and of each method as `Class.method`."
    lines = {}
    for node in ast.parse(module_file.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines[node.name] = node.lineno
        if isinstance(node, ast.ClassDef):
            lines.update({f"{node.name}.{item.name}": item.lineno for item in node.body
                          if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))})
    return lines


class _Module:
    "The module a page documents: its path below src/ and where its definitions start."

    def __init__(self, name: str, src: Path):
        self.name = name
        self.path = name.replace(".", "/") + ".py"
        self.lines = _definitions(src / self.path)

    def show_doc(self, markdown: str) -> str:
        """A show_doc output with the anchor nbdev links to and, for this module's own definitions, its source link.

        The heading gets its lower-cased name, dots kept, as anchor. nbdev finds a source line by the bare name of
        what the processed notebook defined, so every module's `main` pointed at the first `main` of the package;
        a name this module defines is looked up in this module's file instead.
        """
        heading = _SHOW_DOC_HEADING.search(markdown)
        if not heading:
            return markdown
        name = heading.group(2)
        markdown = (markdown[:heading.start()] + f"{heading.group(1)} {name} {{ #{name.lower()} }}"
                    + markdown[heading.end():])
        if name not in self.lines:
            return markdown
        return _SOURCE_LINK.sub(lambda m: f"[source]({m.group(1)}{self.path}#L{self.lines[name]})", markdown, count=1)


def _output(output: dict, page: str, module: _Module | None) -> str | None:
    if output["output_type"] == "stream":
        # stderr while processing carries library warnings, not documentation
        return _fence(_text(output["text"])) if output["name"] == "stdout" else None
    data = output.get("data", {})
    if "text/markdown" in data:
        markdown = _links(_text(data["text/markdown"]))
        return module.show_doc(markdown) if module else markdown
    if "text/html" in data:
        return _text(data["text/html"])
    if "text/plain" in data:
        return _fence(_text(data["text/plain"]))
    raise PluginError(f"{page}: no rendering for a notebook output of type {output['output_type']} {sorted(data)}")


def _front_matter(cell: dict) -> dict:
    text = _text(cell["source"]).strip()
    if cell["cell_type"] != "raw" or not text.startswith("---"):
        return {}
    return yaml.safe_load(text.strip("-")) or {}


def _own_symbols_first(markdown: str, page: str) -> str:
    """Point links to a name documented on this page at this page.

    nbdev resolves a backticked name through one table for the whole package, so a name two modules export (the
    model interface `Recommender` and the BentoML service `Recommender`) links to the first; on the page that
    documents its own, the name means that one, as it does in the module's code.
    """
    anchors = set(re.findall(r"\{ #([^ }]+) \}", markdown))
    links = re.compile(r"\]\(([\w.-]+)\.md#([^)\s]+)\)")
    return links.sub(lambda m: f"]({page}#{m.group(2)})" if m.group(2) in anchors else m.group(0), markdown)


def notebook_markdown(notebook: dict, page: str, module: _Module | None) -> str:
    "The Markdown page `page` (a file name) for one processed notebook that exports to `module`, if any."
    cells = notebook["cells"]
    meta = _front_matter(cells[0]) if cells else {}
    blocks = [f"# {meta['title']}"] if meta.get("title") else []
    if meta.get("description"):
        blocks.append(f"*{meta['description']}*")
    if module:
        blocks.append(f"Module `{module.name}`, exported to `src/{module.path}`.")
    for cell in cells[1:] if meta else cells:
        source = _text(cell["source"])
        if cell["cell_type"] == "markdown":
            blocks.append(_links(source))
            continue
        if cell["cell_type"] != "code" or not source.strip():
            continue
        options, code = _directives(source)
        if options.get("include") == "false":
            continue
        if code and options.get("echo") != "false":
            blocks.append(_fence(code, "python"))
        if options.get("output") != "false":
            blocks.extend(filter(None, (_output(output, page, module) for output in cell.get("outputs", []))))
    return _own_symbols_first("\n\n".join(blocks) + "\n", page)


def _module_name(notebook: Path) -> str | None:
    "The module a source notebook exports to (its `#| default_exp`), if any."
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        for line in _text(cell["source"]).splitlines():
            if line.startswith("#| default_exp"):
                return "reelrank." + line.split(maxsplit=2)[2].strip()
    return None


def _methods_to_classes(pages: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    "Point links to a method without an entry of its own (nbdev documents classes, not each method) at its class."
    anchors = {page: set(re.findall(r"\{ #([^ }]+) \}", markdown)) for page, _, markdown in pages}

    def target(m: re.Match) -> str:
        page, anchor = m.group(1) + ".md", m.group(2)
        owner = anchor.split(".")[0]
        if page in anchors and anchor not in anchors[page] and owner in anchors[page]:
            return f"]({page}#{owner})"
        return m.group(0)

    links = re.compile(r"\]\(([\w.-]+)\.md#([^)\s]+)\)")
    return [(page, label, links.sub(target, markdown)) for page, label, markdown in pages]


def _pages(root: Path) -> list[tuple[str, str, str]]:
    "(page file, nav label, Markdown) for every processed notebook, in notebook order."
    pages = []
    for processed in sorted((root / PROC).glob("*.ipynb")):
        notebook = json.loads(processed.read_text(encoding="utf-8"))
        meta = _front_matter(notebook["cells"][0]) if notebook["cells"] else {}
        page = Path(meta.get("output-file", processed.stem + ".html")).with_suffix(".md").name
        name = _module_name(root / NOTEBOOKS / processed.name)
        module = _Module(name, root / "src") if name else None
        pages.append((page, name or meta.get("title", processed.stem), notebook_markdown(notebook, page, module)))
    return _methods_to_classes(pages)


_pages_of_build: list[tuple[str, str, str]] = []


def on_config(config):
    root = Path(config.config_file_path).parent
    _pages_of_build[:] = _pages(root)
    if not _pages_of_build:
        raise PluginError(f"no processed notebooks in {root / PROC}: run `make docs`, which processes them first")
    api = [{label: page} for page, label, _ in _pages_of_build if page != "index.md"]
    config.nav = [*(config.nav or []), {NAV_SECTION: api}]
    return config


def on_files(files, config):
    for page, _, markdown in _pages_of_build:
        files.append(File.generated(config, page, content=markdown))
    return files
