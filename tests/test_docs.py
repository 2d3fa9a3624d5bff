"""The documentation cannot rot: every code block of README.md and docs/ runs.

Conventions (also in docs/about-these-docs.md):

* ```` ```python ```` blocks are executed. The blocks of one page run in order in one
  fresh interpreter (a shared namespace, like a notebook), in an empty temporary
  directory, so a page's later blocks may use what its earlier ones defined and files
  they create vanish afterwards. Every page carries its own set-up.
* ```` ```sh ```` blocks are executed too, each in its own ``bash -euo pipefail`` in an
  empty temporary directory, with this interpreter's ``bin`` first on ``PATH`` (so
  ``pagescan`` and ``python`` are the ones under test).
* ```` ```console ```` (commands shown, not run: installation, endless ``--watch``,
  long benchmarks, placeholders), ```` ```text ````, ```` ```json ````, ```` ```c ````
  and bare fences are shown only. Any other language tag is refused here, so that no
  block escapes the runner by a typo (```` ```py ````, ```` ```bash ````).

The pages included from elsewhere (benchmarks/README.md) are not run: their commands
take minutes; their figures are measurements.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pagescan
import pagescan.snapshot
from pagescan import Category
from pagescan._uapi.since import INTERFACE_SINCE, since

from .conftest import requires_pagemap_scan, requires_wp_async

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted(DOCS.rglob("*.rst"))]
RUN = {"python", "sh"}
SHOWN = {"", "console", "text", "json", "c"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(language, first line number, code)`` of every fenced block of a Markdown page."""
    out = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, info = m["fence"], len(m["indent"]), m["info"].strip()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        out.append((info.split()[0] if info else "", i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# One fresh interpreter per page: each block is compiled with its own file name and
# line number, so a traceback points at the page.
RUNNER = r"""
import json, sys
ns = {"__name__": "__main__"}
for name, line, code in json.load(sys.stdin):
    exec(compile("\n" * (line - 1) + code, name, "exec"), ns)
"""


def test_no_block_escapes_the_runner() -> None:
    for page in PAGES:
        for lang, line, _ in blocks(page):
            assert lang in RUN | SHOWN or lang.startswith("{"), (
                f"{rel(page)}:{line}: fence language {lang!r}: use python or sh (run by this test), "
                "or console/text (shown only)")


def test_the_readme_has_runnable_blocks() -> None:
    langs = [lang for lang, _, _ in blocks(ROOT / "README.md")]
    assert langs.count("python") >= 3 and "sh" in langs


PY_PAGES = [p for p in PAGES if any(lang == "python" for lang, _, _ in blocks(p))]


@requires_pagemap_scan
@requires_wp_async
@pytest.mark.parametrize("page", PY_PAGES, ids=rel)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    code = [(rel(page), line, src) for lang, line, src in blocks(page) if lang == "python"]
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(code), capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, f"{rel(page)}: a python block failed:\n{proc.stdout}\n{proc.stderr}"


SH_BLOCKS = [(p, line, src) for p in PAGES for lang, line, src in blocks(p) if lang == "sh"]


@requires_pagemap_scan
@pytest.mark.parametrize("page,line,src", SH_BLOCKS, ids=[f"{rel(p)}:{n}" for p, n, _ in SH_BLOCKS])
def test_sh_blocks_run(page: Path, line: int, src: str, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", src], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{rel(page)}:{line}: the sh block failed:\n{proc.stdout}\n{proc.stderr}"


# -- the API reference covers every public name ---------------------------------------


def _documented() -> set[str]:
    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    return set(re.findall(r"^\.\. (?:auto)?(?:function|class|exception|data)::\s+([\w.]+)", text, re.M))


@pytest.mark.parametrize("module", [pagescan, pagescan.snapshot], ids=lambda m: m.__name__)
def test_api_reference_lists_every_public_name(module: object) -> None:
    names = {f"{module.__name__}.{n}" for n in module.__all__}  # type: ignore[attr-defined]
    missing = names - _documented()
    assert not missing, f"public names missing from docs/api: {sorted(missing)}"


# -- the kernel-version matrix says what the code says --------------------------------


def test_kernel_version_matrix_matches_the_code() -> None:
    """Every row of docs/kernel-versions.md that names an interface, a category or a
    userfaultfd feature gives the release in ``pagescan._uapi.since``, and every
    interface and category pagescan knows has a row."""
    rows: dict[str, str] = {}
    for line in (DOCS / "kernel-versions.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    expected = set(INTERFACE_SINCE) | {f"PAGE_IS_{c.name}" for c in Category} | {
        f"UFFD_FEATURE_{n}" for n in ("WP_ASYNC", "WP_UNPOPULATED", "MOVE", "POISON", "WP_HUGETLBFS_SHMEM", "MINOR_SHMEM")}
    assert all(since(n) for n in expected)
    assert expected <= set(rows), f"rows missing: {sorted(expected - set(rows))}"
    for name, release in rows.items():
        if since(name) is not None:
            assert release == since(name), f"{name}: the table says {release}, the code {since(name)}"


# -- what the API reference says about addresses --------------------------------------


@requires_pagemap_scan
@pytest.mark.parametrize("backend", ["kernel", "emulated"])
def test_unaligned_start_teaches_and_end_rounds_up(backend: str) -> None:
    buf = pagescan.zeros(2 * 4096, dtype="u1")
    buf[:] = 1
    a, p = buf.ctypes.data, os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(OSError) as exc:
        pagescan.scan(a + 16, a + p, backend=backend)
    assert exc.value.errno == 22
    msg = str(exc.value)
    assert f"start {a + 16:#x} is not aligned to the page size ({p})" in msg
    assert f"the nearest aligned values are {a:#x} and {a + p:#x}" in msg
    # end is rounded up to the next page boundary, as the kernel does
    res = pagescan.scan(a, a + 1, return_mask=Category.PRESENT, backend=backend)
    assert [(r.start, r.end) for r in res] == [(a, a + p)] and res.walk_end == a + p and res.complete
    res = pagescan.scan(a, a + p + 1, return_mask=Category.PRESENT, backend=backend)
    assert [(r.start, r.end) for r in res] == [(a, a + 2 * p)] and res.walk_end == a + 2 * p


def test_checks_before_the_kernel_teach_the_same_way() -> None:
    """docs/api/pagescan.md: WriteWatch, move_pages and FaultHandler refuse an unaligned
    address with InvalidArgumentError naming the page size and the nearest aligned
    values; Userfaultfd adds the same hint to the kernel's EINVAL."""
    buf = pagescan.zeros(4 * 4096, dtype="u1")
    a, p = buf.ctypes.data, os.sysconf("SC_PAGE_SIZE")
    hint = f"is not aligned to the page size ({p}); the nearest aligned values are {a:#x} and {a + p:#x}"
    calls = {
        "WriteWatch: start": lambda: pagescan.WriteWatch(a + 8, a + 2 * p),
        "move_pages: dst": lambda: pagescan.move_pages(a + 8, a + 2 * p, p),
        "FaultHandler: regions[0] address": lambda: pagescan.FaultHandler([(a + 8, p)], lambda *_: None),
        "FaultHandler: regions[0] length": lambda: pagescan.FaultHandler([(a, 8)], lambda *_: None),
    }
    for says, call in calls.items():
        with pytest.raises(pagescan.InvalidArgumentError) as exc:
            call()
        assert exc.value.errno == 22 and isinstance(exc.value, ValueError)
        want = hint if "length" not in says else f"is not aligned to the page size ({p}); the nearest aligned values are 0x0 and {p:#x}"
        assert f"{says} 0x" in str(exc.value) and want in str(exc.value), str(exc.value)
    with pagescan.Userfaultfd() as uf, pytest.raises(OSError) as exc:
        uf.register(a + 8, p)
    assert exc.value.errno == 22 and hint in str(exc.value), str(exc.value)


def test_docs_build_configuration_names_every_page() -> None:
    """Every page under docs/ is reachable from a toctree (Sphinx warns otherwise; this
    says which, without building)."""
    text = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    listed: set[str] = set()
    for m in re.finditer(r"```\{toctree\}\n(.*?)```", text, re.S):
        listed.update(line.strip() for line in m.group(1).splitlines() if line.strip() and not line.startswith(":"))
    pages = {str(p.relative_to(DOCS).with_suffix("")) for p in DOCS.rglob("*.md")} - {"index"}
    unlisted = {p for p in pages if p not in listed and p.split("/")[-1] not in listed}
    assert not unlisted, f"pages in no toctree: {sorted(unlisted)}"

