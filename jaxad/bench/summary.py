"""The summary at the top of BENCHMARKS.md, and retiring the sections that later ones replace.

The summary is generated, never edited: one table of method × dataset × machine with the latest
default-config row of each, found in the sections below it. A section's rows are read from
``benchmarks/SECTION/rows.json``, which the method benchmarks write beside their plots with each
row's full config, so a row can be checked against today's ``configs/METHOD.py``; sections
written before those files existed are read from their markdown table instead, and say so.

A section that a later one replaces is retired: removed from the file with its folder under
``benchmarks/``, and listed at the end of the summary with the section that replaced it, so a
reference to it in another section's notes still leads somewhere (the text stays in git history).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxad.bench.harness import ROWS_FILE, plain, split_overrides
from jaxad.config import config_path, load_config
from jaxad.errors import ConfigError
from jaxad.eval import report

NAME = "summary"  # the summary's own begin/end markers
RETIRED_FILE = "retired.json"
_BLOCK = re.compile(r"<!-- begin (\S+) -->\n?(.*?)\n?<!-- end \1 -->\n?", re.DOTALL)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    command: str
    machine: str
    date: str
    body: str


def sections(text: str) -> list[Section]:
    """The benchmark sections of a BENCHMARKS.md text, in file order (the summary left out)."""
    out = []
    for found in _BLOCK.finditer(text):
        name, body = found.group(1), found.group(2)
        if name == NAME:
            continue
        command = re.fullmatch(r"(`+) ?(.*?) ?\1", _field(body, "Command: "))
        out.append(Section(name, _field(body, "## "), command.group(2) if command else "",
                           _field(body, "Machine: "), _field(body, "Date: "), body))
    return out


def _field(body: str, prefix: str) -> str:
    """The rest of the first line of ``body`` that starts with ``prefix`` ("" when none does)."""
    hit = re.search(rf"^{re.escape(prefix)}(.*?)\s*$", body, re.MULTILINE)
    return hit.group(1) if hit else ""


def machine_label(machine: str) -> str:
    """``x86_64 with 2 CPU cores, 1× cpu (cpu), jax 0.10.2`` → ``CPU, 2 cores``; an accelerator → its kind."""
    hit = re.search(r"with (\d+) CPU cores, \d+× (.+?) \((\w+)\)", machine)
    if hit is None:
        return machine or "unknown"
    cores, kind, backend = hit.groups()
    return f"CPU, {cores} cores" if backend == "cpu" else kind


def _markdown_rows(body: str) -> list[dict[str, Any]]:
    """The rows of a section's first table with dataset, variant and image_auroc columns."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        header = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not {"dataset", "variant", "image_auroc"} <= set(header):
            continue
        rows = []
        for row in lines[i + 2:]:
            if not row.startswith("|"):
                break
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            rows.append({k: _value(v) for k, v in zip(header, cells)})
        return rows
    return []


def _value(cell: str) -> Any:
    if cell == "n/a":
        return math.nan
    try:
        return float(cell)
    except ValueError:
        return cell


def _default_overrides(command: str, method: str) -> list[str]:
    """``KEY=VALUE`` settings a bench.py command gave ``method``'s default variant (``--variant default:...``)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    specs = [b for a, b in itertools.pairwise(words) if a == "--variant"]
    specs += [w.split("=", 1)[1] for w in words if w.startswith("--variant=")]
    out = []
    for spec in specs:
        head, _, body = spec.partition(":")
        if head in ("default", f"{method}/default"):
            out += [kv for kv in split_overrides(body) if kv]
    return out


class _Defaults:
    """Today's default config of each method, read once."""

    def __init__(self, config_dir: Path):
        self.config_dir, self.known = config_dir, {}

    def differences(self, method: str, config: Mapping[str, Any]) -> list[str] | None:
        """``KEY=VALUE (now NOW)`` for each setting of ``config`` that today's default does not have;
        None when the method has no config any more."""
        if method not in self.known:
            try:
                self.known[method] = plain(load_config(config_path(method, self.config_dir)).to_dict())
            except ConfigError:
                self.known[method] = None
        now = self.known[method]
        if now is None:
            return None
        return [f"{k}={config[k]} (now {now.get(k, 'absent')})" for k in sorted(config) if now.get(k) != config[k]]


def _config_note(row: Mapping[str, Any], section: Section, defaults: _Defaults) -> tuple[str, bool]:
    """What the row's 'default' config was, against today's; and whether it is today's default."""
    if "config" in row:
        diff = defaults.differences(row["method"], row["config"])
        if diff is None:
            return "method has no config now", False
        return ("current default", True) if not diff else ("default then; differs now: " + ", ".join(diff), False)
    given = _default_overrides(section.command, row["method"])
    if given:
        return "default with " + ", ".join(given) + "; config not recorded", False
    return f"default of {section.date}; config not recorded", False


def _anchors(found: Sequence[Section]) -> dict[str, str]:
    """GitHub's heading anchor of each section's title (repeated titles get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = {}
    for s in found:
        slug = re.sub(r"[^\w\- ]", "", s.title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out[s.name] = slug if n == 0 else f"{slug}-{n}"
    return out


def summary(text: str, bench_dir: Path, config_dir: Path) -> str:
    """Markdown of the summary of the sections in ``text`` (plots and rows under ``bench_dir``)."""
    found = sections(text)
    anchors = _anchors(found)
    defaults = _Defaults(config_dir)
    best: dict[tuple[str, str, str], tuple[tuple, dict[str, Any]]] = {}
    measured: dict[tuple[str, str], list[str]] = {}
    for position, s in enumerate(found):
        recorded = bench_dir / s.name / ROWS_FILE
        rows = json.loads(recorded.read_text()) if recorded.is_file() else _markdown_rows(s.body)
        for row in rows:
            method = str(row.get("method") or _single_method(s.title))
            row = {**row, "method": method}
            measured.setdefault((method, str(row["dataset"])), []).append(s.name)
            if row.get("variant") != "default":
                continue
            note, current = _config_note(row, s, defaults)
            key = (method, str(row["dataset"]), machine_label(s.machine))
            entry = {
                "method": method, "dataset": row["dataset"], "machine": key[2],
                "image AUROC": row.get("image_auroc"), "pixel AUROC": row.get("pixel_auroc"), "AUPRO": row.get("aupro"),
                "latency ms (batch 1)": row.get("latency_ms_b1"), "config": note,
                "section": f"[{s.name}](#{anchors[s.name]})",
            }
            rank = (current, s.date, position)
            if key not in best or rank > best[key][0]:
                best[key] = (rank, entry)
    table = [entry for _, (_, entry) in sorted(best.items())]
    columns = ["method", "dataset", "machine", "image AUROC", "pixel AUROC", "AUPRO", "latency ms (batch 1)",
               "config", "section"]
    intro = (
        "Generated by `scripts/bench.py` from the sections below whenever it writes one (alone: "
        "`python scripts/bench.py --summary`). One row per method, dataset and machine: its latest row of the "
        "`default` variant, preferring one whose recorded config is today's `configs/METHOD.py`. `config` says "
        "how the row's config relates to today's default; sections written before configs were recorded "
        "(`benchmarks/SECTION/rows.json`) are read from their tables.")
    lines = ["## Summary", "", intro, "",
             report.markdown_table(table, columns, {"latency ms (batch 1)": ".1f"}) if table
             else "No section has a default-config row yet.", ""]
    missing = sorted(k for k in measured if not any(key[:2] == k for key in best))
    if missing:
        lines += ["Measured only with other settings (no `default` row): " + "; ".join(
            f"{m} on {d} ({', '.join(dict.fromkeys(measured[(m, d)]))})" for m, d in missing) + ".", ""]
    index = [{"section": f"[{s.name}](#{anchors[s.name]})", "title": s.title, "machine": machine_label(s.machine),
              "date": s.date} for s in found]
    lines += ["### Sections", "", report.markdown_table(index, ["section", "title", "machine", "date"]), ""]
    retired = _retired(bench_dir)
    if retired:
        lines += ["### Retired sections", "",
                  "Removed because a later section replaces them (their text is in git history):", ""]
        for r in retired:
            new = r["replaced_by"]
            link = f"[{new}](#{anchors[new]})" if new in anchors else f"`{new}`"
            lines.append(f"- `{r['section']}` ({r['title']}, {r['date']}): replaced by {link} on {r['retired']}")
        lines += [""]
    return "\n".join(lines)


def _single_method(title: str) -> str:
    """The method of a section whose table has no method column: its title names it (``crd on data``)."""
    return title.split(" on ", 1)[0]


def _retired(bench_dir: Path) -> list[dict[str, str]]:
    path = bench_dir / RETIRED_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def write_summary(path: Path, config_dir: Path) -> None:
    """Regenerate the summary of the markdown file ``path``, placed before its first section."""
    path = Path(path)
    text = re.sub(rf"<!-- begin {NAME} -->.*?<!-- end {NAME} -->\n*", "", path.read_text(), flags=re.DOTALL)
    body = summary(text, path.parent / "benchmarks", config_dir).rstrip()
    block = f"<!-- begin {NAME} -->\n{body}\n<!-- end {NAME} -->\n\n"
    first = re.search(r"<!-- begin \S+ -->", text)
    at = first.start() if first else len(text)
    path.write_text(text[:at] + block + text[at:])


def require_sections(path: Path, names: Sequence[str]) -> None:
    """ConfigError naming the first of ``names`` that is not a section of the markdown file ``path``."""
    if not names:
        return
    found = {s.name for s in sections(Path(path).read_text())} if Path(path).is_file() else set()
    for name in names:
        if name not in found:
            raise ConfigError(f"--replaces {name}: no such section in {path}")


def retire(path: Path, names: Sequence[str], replaced_by: str) -> None:
    """Remove the sections ``names`` of ``path``, and their plots folders, as replaced by ``replaced_by``,
    which must be a section of the file; each is recorded for the summary's list of retired sections."""
    path = Path(path)
    require_sections(path, names)
    text = path.read_text()
    found = {s.name: s for s in sections(text)}
    if replaced_by not in found:
        raise ConfigError(f"--section {replaced_by}: no such section in {path} to replace others")
    if replaced_by in names:
        raise ConfigError(f"--replaces {replaced_by}: a section cannot replace itself")
    bench_dir = path.parent / "benchmarks"
    retired = [r for r in _retired(bench_dir) if r["section"] not in names]
    for name in names:
        s = found[name]
        retired.append({"section": name, "title": s.title, "date": s.date, "replaced_by": replaced_by,
                        "retired": time.strftime("%Y-%m-%d")})
        marked = rf"\n*<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->\n*"
        text = re.sub(marked, "\n\n", text, flags=re.DOTALL)
        shutil.rmtree(bench_dir / name, ignore_errors=True)
    bench_dir.mkdir(exist_ok=True)
    (bench_dir / RETIRED_FILE).write_text(json.dumps(retired, indent=1) + "\n")
    path.write_text(text.rstrip() + "\n")
