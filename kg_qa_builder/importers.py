"""Importers: real catalogues from installed packages (spyndex, climaclass, earthlib) and curated YAML.

Each importer adds typed nodes and edges with provenance (`source` = package@version, `where` = data
file and key or line). Curated YAML is read with line numbers so every problem points at file:line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import yaml

from kg_qa_builder.errors import KGLoadError
from kg_qa_builder.graph import KnowledgeGraph, norm

LITERAL_TYPES = {"formula", "label", "quantity", "code", "reference", "visual_cue", "period"}
CASED_TYPES = {"spectral_index", "koppen_zone", "constant", "spectrum"}


def nid(type_: str, name: str) -> str:
    """Canonical node id: type:name, normalised except for literals and case-sensitive codes (BAI vs BaI)."""
    if type_ in LITERAL_TYPES or type_ in CASED_TYPES:
        return f"{type_}:{' '.join(str(name).split())}"
    return f"{type_}:{norm(name)}"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


def _pkg_file(pkg: str, rel: str) -> Path:
    return Path(str(resources.files(pkg).joinpath(rel)))


def _node(kg: KnowledgeGraph, type_: str, name: str, aliases: Iterable[str] = (), where: str = "") -> str:
    return kg.add_node(nid(type_, name), type_, name, aliases, where)


# ---------------------------------------------------------------- spyndex
# spyndex's platform strings (index "platforms") → our sensor nodes (name, aliases).
SPYNDEX_SENSORS = {
    "Sentinel-2": ("Sentinel-2 MSI", ["MSI", "MultiSpectral Instrument", "Sentinel-2"]),
    "Landsat-OLI": ("Landsat OLI", ["OLI", "Operational Land Imager", "Landsat-OLI"]),
    "Landsat-TM": ("Landsat TM", ["TM", "Thematic Mapper", "Landsat-TM"]),
    "Landsat-ETM+": ("Landsat ETM+", ["ETM+", "Enhanced Thematic Mapper Plus", "Landsat-ETM+"]),
    "MODIS": ("MODIS", ["Moderate Resolution Imaging Spectroradiometer"]),
    "Planet-Fusion": ("Planet Fusion", ["Planet-Fusion"]),
    "Sentinel-1 (Dual Polarisation VV-VH)": ("Sentinel-1 SAR dual polarisation VV-VH", ["Sentinel-1 (Dual Polarisation VV-VH)"]),
    "Sentinel-1 (Dual Polarisation HH-HV)": ("Sentinel-1 SAR dual polarisation HH-HV", ["Sentinel-1 (Dual Polarisation HH-HV)"]),
}
# spyndex bands.json platform keys → (node type, name)
SPYNDEX_BAND_PLATFORMS = {
    "landsat4": ("platform", "Landsat 4"), "landsat5": ("platform", "Landsat 5"),
    "landsat7": ("platform", "Landsat 7"), "landsat8": ("platform", "Landsat 8"),
    "landsat9": ("platform", "Landsat 9"), "modis": ("sensor", "MODIS"),
    "planetscope": ("platform", "PlanetScope"), "sentinel2a": ("platform", "Sentinel-2A"),
    "sentinel2b": ("platform", "Sentinel-2B"), "wv2": ("platform", "WorldView-2"),
    "wv3": ("platform", "WorldView-3"),
}
RADAR_BANDS = {"VV": "VV polarisation", "VH": "VH polarisation", "HH": "HH polarisation", "HV": "HV polarisation"}


def _num(x: float) -> str:
    return f"{float(x):g}"


def import_spyndex(kg: KnowledgeGraph, data_dir: str | Path | None = None) -> None:
    """Spectral indices (domain, bands, constants, formula, reference, sensors) and bands per platform."""
    base = Path(data_dir) if data_dir else _pkg_file("spyndex", "data")
    src = f"spyndex@{_version('spyndex')}"
    try:
        indices = json.loads((base / "spectral-indices-dict.json").read_text())["SpectralIndices"]
        bands = json.loads((base / "bands.json").read_text())
        consts = json.loads((base / "constants.json").read_text())
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise KGLoadError(f"spyndex data in {base} unreadable: {e}") from e
    for short, b in bands.items():
        w = f"bands.json:{short}"
        bn = _node(kg, "band", b["long_name"].replace("Aersols", "Aerosols"), [short, b["common_name"]], w)
        kg.add_edge(bn, "has_short_name", _node(kg, "code", short, where=w), src, w)
        kg.add_edge(bn, "has_min_wavelength", _node(kg, "quantity", f"{_num(b['min_wavelength'])} nm", where=w), src, w)
        kg.add_edge(bn, "has_max_wavelength", _node(kg, "quantity", f"{_num(b['max_wavelength'])} nm", where=w), src, w)
        for key, p in sorted(b.get("platforms", {}).items()):
            if key not in SPYNDEX_BAND_PLATFORMS:
                continue
            ptype, pname = SPYNDEX_BAND_PLATFORMS[key]
            pn = _node(kg, ptype, pname, where=w)
            sb_name = f"{pname} {p['band']}"
            sb = _node(kg, "sensor_band", sb_name, [f"{pname} band {p['band']}", f"{pname} {p['band']} ({p['name']})"], w)
            kg.add_edge(pn, "has_sensor_band", sb, src, w)
            kg.add_edge(sb, "corresponds_to", bn, src, w)
            kg.add_edge(sb, "has_center_wavelength", _node(kg, "quantity", f"{_num(p['wavelength'])} nm", where=w), src, w)
            kg.add_edge(sb, "has_bandwidth", _node(kg, "quantity", f"{_num(p['bandwidth'])} nm", where=w), src, w)
    for short, name in RADAR_BANDS.items():
        _node(kg, "band", name, [short], "spyndex:radar")
    for short, c in consts.items():
        w = f"constants.json:{short}"
        cn = _node(kg, "constant", f"constant {short}", [short], w)
        kg.add_edge(cn, "has_description", _node(kg, "label", c["description"].split(". ")[0].rstrip("."), where=w), src, w)
        if c.get("default") is not None:
            kg.add_edge(cn, "has_default_value", _node(kg, "quantity", _num(c["default"]), where=w), src, w)
    for short, s in sorted(indices.items()):
        w = f"spectral-indices-dict.json:{short}"
        ix = _node(kg, "spectral_index", short, [s["long_name"]], w)
        kg.add_edge(ix, "has_full_name", _node(kg, "label", s["long_name"], where=w), src, w)
        dom = _node(kg, "application_domain", s["application_domain"], where=w)
        kg.add_edge(ix, "has_application_domain", dom, src, w)
        kg.add_edge(ix, "has_formula", _node(kg, "formula", s["formula"], where=w), src, w)
        if s.get("reference"):
            kg.add_edge(ix, "has_reference", _node(kg, "reference", s["reference"], where=w), src, w)
        for b in s["bands"]:
            if b in bands:
                kg.add_edge(ix, "uses_band", nid("band", bands[b]["long_name"].replace("Aersols", "Aerosols")), src, w)
            elif b in RADAR_BANDS:
                kg.add_edge(ix, "uses_band", nid("band", RADAR_BANDS[b]), src, w)
            else:  # constants and kernel terms
                cn = _node(kg, "constant", f"constant {b}", [b], w)
                kg.add_edge(ix, "uses_constant", cn, src, w)
        for p in s["platforms"]:
            name, aliases = SPYNDEX_SENSORS.get(p, (p, []))
            kg.add_edge(ix, "computable_from", _node(kg, "sensor", name, aliases, w), src, w)
    sar = _node(kg, "sensor", "Sentinel-1 C-SAR", ["C-SAR"], "spyndex:radar")
    for p, (name, _a) in SPYNDEX_SENSORS.items():
        if p.startswith("Sentinel-1"):
            kg.add_edge(nid("sensor", name), "mode_of", sar, src, "spyndex:platforms")


# ---------------------------------------------------------------- climaclass
KOPPEN_GROUPS = {
    "A": ("Tropical (A)", ["tropical", "A"], ["coldest month mean temperature at least 18 °C"]),
    "B": ("Arid (B)", ["arid", "dry", "B"], ["mean annual precipitation below 10 times the aridity threshold"]),
    "C": ("Temperate (C)", ["temperate", "C"], ["warmest month above 10 °C and coldest month above 0 °C"]),
    "D": ("Continental (D)", ["continental", "cold", "D"], ["warmest month above 10 °C and coldest month at or below 0 °C"]),
    "E": ("Polar (E)", ["polar", "E"], ["warmest month at or below 10 °C"]),
}
# Letter criteria as implemented by climaclass.koppen (Peel et al. 2007).
KOPPEN_CRITERIA = {
    "Af": ["driest month precipitation at least 60 mm"],
    "Am": ["driest month below 60 mm but at least 100 - MAP/25 mm"],
    "Aw": ["driest month below 60 mm and below 100 - MAP/25 mm"],
    "BW": ["mean annual precipitation below 5 times the aridity threshold"],
    "BS": ["mean annual precipitation between 5 and 10 times the aridity threshold"],
    "h": ["mean annual temperature at least 18 °C"],
    "k": ["mean annual temperature below 18 °C"],
    "s": ["dry summer: driest summer month below 40 mm and below a third of the wettest winter month"],
    "w": ["dry winter: driest winter month below a tenth of the wettest summer month"],
    "f": ["no dry season"],
    "a": ["warmest month at least 22 °C"],
    "b": ["warmest month below 22 °C with at least 4 months at or above 10 °C"],
    "Cc": ["warmest month below 22 °C with 1 to 3 months at or above 10 °C"],
    "Dc": ["warmest month below 22 °C, 1 to 3 months at or above 10 °C, coldest month above -38 °C"],
    "d": ["coldest month at or below -38 °C"],
    "ET": ["warmest month between 0 and 10 °C"],
    "EF": ["warmest month below 0 °C"],
}
HOLDRIDGE_BIOTEMP = {
    "Polar": "below 1.5 °C", "Subpolar": "1.5-3 °C", "Boreal": "3-6 °C", "Cool temperate": "6-12 °C",
    "Warm temperate": "12-18 °C", "Subtropical": "18-24 °C", "Tropical": "24 °C or more",
}
HOLDRIDGE_PET = {
    "superhumid": "below 0.25", "perhumid": "0.25-0.5", "humid": "0.5-1", "subhumid": "1-2",
    "semiarid": "2-4", "arid": "4-8", "perarid": "8-16", "superarid": "16 or more",
}


def _koppen_criteria_keys(code: str) -> list[str]:
    g = code[0]
    if g == "A":
        return [code]
    if g == "B":
        return [code[:2], code[2]]
    if g == "E":
        return [code]
    third = code[2]
    if third == "c":
        third = g + "c"
    return [code[1], third]


def import_climaclass(kg: KnowledgeGraph) -> None:
    """Köppen zones (names, Beck 2018 numbers and colours, group and letter criteria) and Holdridge zones."""
    from climaclass import holdridge, koppen

    src = f"climaclass@{_version('climaclass')}"
    crit_nodes = {
        k: [_node(kg, "climate_criterion", c, where=f"climaclass/koppen.py:{k}") for c in cs]
        for k, cs in KOPPEN_CRITERIA.items()
    }
    for g, (name, aliases, crits) in KOPPEN_GROUPS.items():
        w = f"climaclass/koppen.py:group {g}"
        gn = _node(kg, "koppen_group", name, aliases, w)
        for c in crits:
            kg.add_edge(gn, "has_climate_criterion", _node(kg, "climate_criterion", c, where=w), src, w)
    for code, zone in koppen.KOPPEN_LEGEND.items():
        w = f"climaclass/koppen.py:KOPPEN_LEGEND[{code}]"
        zn = _node(kg, "koppen_zone", code, [f"Koppen {code}", f"Köppen {code}"], w)
        kg.add_edge(zn, "has_full_name", _node(kg, "label", koppen.KOPPEN_NAMES[code], where=w), src, w)
        kg.add_edge(zn, "has_legend_number", _node(kg, "code", str(zone), where=w), src, w)
        kg.add_edge(zn, "has_map_colour", _node(kg, "code", koppen.KOPPEN_COLORS[code], where=w), src, w)
        kg.add_edge(zn, "in_koppen_group", nid("koppen_group", KOPPEN_GROUPS[code[0]][0]), src, w)
        for key in _koppen_criteria_keys(code):
            for cn in crit_nodes[key]:
                kg.add_edge(zn, "has_climate_criterion", cn, src, w)
    for belt, rng in HOLDRIDGE_BIOTEMP.items():
        w = f"climaclass/holdridge.py:_BELTS[{belt}]"
        bn = _node(kg, "life_zone_belt", belt, where=w)
        kg.add_edge(bn, "has_biotemperature_range", _node(kg, "quantity", rng, where=w), src, w)
    provinces = [p for _, p in holdridge._PROVINCES]
    for p in provinces:
        w = f"climaclass/holdridge.py:_PROVINCES[{p}]"
        pn = _node(kg, "humidity_province", p, where=w)
        kg.add_edge(pn, "has_pet_ratio_range", _node(kg, "quantity", HOLDRIDGE_PET[p], where=w), src, w)
    for belt, zones in holdridge._ZONES.items():
        for i, z in enumerate(zones):
            w = f"climaclass/holdridge.py:_ZONES[{belt}][{i}]"
            zn = _node(kg, "life_zone", z, where=w)
            kg.add_edge(zn, "in_belt", nid("life_zone_belt", belt), src, w)
            kg.add_edge(zn, "in_humidity_province", nid("humidity_province", provinces[i]), src, w)


# ---------------------------------------------------------------- earthlib
EARTHLIB_LIBRARIES = {
    "icraf-isric-soil-database": ("ICRAF-ISRIC soil spectral library", ["icraf-isric-soil-database", "ICRAF-ISRIC"]),
    "prosail": ("PROSAIL canopy simulations", ["prosail"]),
    "asd": ("ASD field spectrometer library", ["asd"]),
    "specevo": ("SpecEvo library", ["specevo"]),
}
EARTHLIB_NAMES = {"npv": "non-photosynthetic vegetation", "comp_shingle": "composition shingle"}


def import_earthlib(kg: KnowledgeGraph, csv_path: str | Path | None = None, max_spectra: int | None = None) -> None:
    """earthlib's land-cover hierarchy (level 1 → 2 → 3) and its spectra (class and library of each)."""
    path = Path(csv_path) if csv_path else _pkg_file("earthlib", "data/spectra.csv")
    src = f"earthlib@{_version('earthlib')}"
    try:
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
    except OSError as e:
        raise KGLoadError(f"earthlib spectra table {path} unreadable: {e}") from e
    l3_parents: dict[str, set[str]] = {}
    for r in rows:
        l3_parents.setdefault(r["LEVEL_3"], set()).add(r["LEVEL_2"])

    def cls_name(level3: str, level2: str) -> str:
        base = EARTHLIB_NAMES.get(level3, level3.replace("_", " "))
        return f"{level2} {base}" if len(l3_parents.get(level3, ())) > 1 else base

    seen: set[str] = set()
    n = 0
    for i, r in enumerate(rows, start=2):
        w = f"{path.name}:{i}"
        l1 = _node(kg, "surface_class", r["LEVEL_1"], where=w)
        l2 = _node(kg, "surface_class", EARTHLIB_NAMES.get(r["LEVEL_2"], r["LEVEL_2"]), where=w)
        l3 = _node(kg, "surface_class", cls_name(r["LEVEL_3"], r["LEVEL_2"]), where=w)
        kg.add_edge(l2, "subclass_of", l1, src, w)
        if l3 != l2:
            kg.add_edge(l3, "subclass_of", l2, src, w)
        if r["NAME"] in seen or (max_spectra is not None and n >= max_spectra):
            continue  # duplicate spectrum names would make linking ambiguous
        seen.add(r["NAME"])
        n += 1
        sp = kg.add_node(f"spectrum:{r['NAME']}", "spectrum", r["NAME"], (), w)
        kg.add_edge(sp, "instance_of_surface", l3, src, w)
        lname, laliases = EARTHLIB_LIBRARIES.get(r["SOURCE"], (r["SOURCE"], []))
        kg.add_edge(sp, "from_library", _node(kg, "spectral_library", lname, laliases, w), src, w)


# ---------------------------------------------------------------- curated YAML
# libyaml's composer when PyYAML has it (same nodes, lines and styles; ~7x less CPU than the pure-Python one,
# which was about a fifth of building the graph)
class LStr(str):
    """A YAML scalar string that remembers its line (1-based)."""

    line: int = 0
    plain_in_flow: bool = False  # an unquoted item of a [a, b] list: a comma inside it would have split it


def _located(node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        s = LStr(node.value)
        s.line = node.start_mark.line + 1
        return s
    if isinstance(node, yaml.SequenceNode):
        items = [_located(n) for n in node.value]
        if node.flow_style:
            for n, it in zip(node.value, items, strict=True):
                if isinstance(it, LStr) and isinstance(n, yaml.ScalarNode) and not n.style:  # plain: None or ''
                    it.plain_in_flow = True
        return items
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for k, v in node.value:
            out[_located(k)] = _located(v)
        return out
    return None


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree, by libyaml when present (several times faster); a document libyaml rejects is parsed
    again by the pure-Python composer, so problems are reported with the same messages either way."""
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is not None:
        try:
            return yaml.compose(text, Loader=loader)
        except yaml.YAMLError:
            pass
    return yaml.compose(text)


def _line(x: Any, default: int = 0) -> int:
    return getattr(x, "line", default)


def curated_files() -> list[Path]:
    """The packaged curated fact files (kg_qa_builder/data/*.yaml except the schema, and data/interp/*.yaml)."""
    base = _pkg_file("kg_qa_builder", "data")
    return sorted(p for p in base.glob("*.yaml") if p.name != "schema.yaml") + sorted(base.glob("interp/*.yaml"))


def import_curated(kg: KnowledgeGraph, paths: Iterable[str | Path]) -> None:
    """Load curated facts. Format per file:

    source: name                                 # provenance label
    declare: {type: [name | {name, aliases}]}    # bulk entity declarations
    entities: {key: {type, name?, aliases?, <relation>: value | [values]}}
    `key` is the entity's id and default name (`name` overrides the display name, for classes that share
    a name across legends). Relation targets resolve by key, name or alias among the relation's range
    types; literal range types (quantity, code, label, ...) create the value node. Problems are collected
    with file:line and raised together by `KnowledgeGraph.finalize`."""
    index: dict[tuple[str, str], set[str]] = {}
    for n, d in kg.g.nodes(data=True):
        for a in {d["name"], *d["aliases"], n.split(":", 1)[1]}:
            index.setdefault((d["type"], norm(a)), set()).add(n)

    def add(node_id: str, type_: str, name: str, aliases: Iterable[str], where: str) -> None:
        aliases = list(aliases or [])
        kg.add_node(node_id, type_, name, aliases, where)
        for a in {name, *aliases, node_id.split(":", 1)[1]}:
            index.setdefault((type_, norm(a)), set()).add(node_id)

    docs: list[tuple[Path, dict[Any, Any]]] = []
    for path in paths:
        path = Path(path)
        try:
            root = _compose(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            kg.problems.append(f"{path}{line}: malformed YAML: {getattr(e, 'problem', e)}")
            continue
        except OSError as e:
            kg.problems.append(f"{path}: unreadable: {e}")
            continue
        doc = _located(root) if root is not None else {}
        if not isinstance(doc, dict):
            kg.problems.append(f"{path}:1: top level must be a mapping with source/declare/entities")
            continue
        for k in set(doc) - {"source", "version", "declare", "entities", "description", "reference", "tables"}:
            kg.problems.append(f"{path}:{_line(k)}: unknown top-level key {k!r}")
        _expand_tables(kg, path, doc)
        docs.append((path, doc))
    # pass 1: declare every entity of every file, so facts may reference entities defined anywhere
    for path, doc in docs:
        declare = doc.get("declare") or {}
        if not isinstance(declare, dict):
            kg.problems.append(f"{path}: 'declare' must map a type to a list of names")
            declare = {}
        for type_, items in declare.items():
            for it in items or []:
                name, aliases = (it.get("name"), it.get("aliases", [])) if isinstance(it, dict) else (it, [])
                if not isinstance(name, str):  # a mapping without `name`, or a nested list
                    kg.problems.append(f"{path}:{_line(type_)}: a declared {type_} needs a name, got {it!r}")
                    continue
                add(nid(type_, name), type_, name, aliases, f"{path.name}:{_line(name, _line(type_))}")
        ents = doc.get("entities") or {}
        if not isinstance(ents, dict):
            kg.problems.append(f"{path}: 'entities' must be a mapping of key: {{type, ...}}")
            doc["entities"] = {}
            continue
        for key, body in ents.items():
            if not isinstance(body, dict) or "type" not in body:
                kg.problems.append(f"{path}:{_line(key)}: entity {key!r} needs a mapping with a 'type'")
                continue
            add(nid(body["type"], key), body["type"], body.get("name") or key, body.get("aliases") or [], f"{path.name}:{_line(key)}")
    # pass 2: facts
    for path, doc in docs:
        src = f"curated:{doc.get('source', path.stem)}"
        for key, body in (doc.get("entities") or {}).items():
            if not isinstance(body, dict) or "type" not in body:
                continue
            h = nid(body["type"], key)
            ref = body.get("__ref") or doc.get("reference") or ""
            for rel, vals in body.items():
                if rel in ("type", "aliases", "name") or str(rel).startswith("__"):
                    continue
                for v in vals if isinstance(vals, list) else [vals]:
                    where = f"{path.name}:{_line(v, _line(rel))}"
                    t = _resolve(kg, index, str(rel), v, where, body.get("__new", ()))
                    if t is not None:
                        kg.add_edge(h, str(rel), t, src, where)
                        if ref and (h, str(rel), t) not in kg.refs:
                            kg.refs[(h, str(rel), t)] = str(ref)


def _expand_tables(kg: KnowledgeGraph, path: Path, doc: dict[Any, Any]) -> None:
    """Expand compact tables into entity bodies (entity x attribute, one fact per value).

    tables: [{type, reference?, columns: {short: relation}, defaults?: {short: value}, new_values?: [types], rows: {key: {short: value(s),
    ref?: citation, aliases?: [..]}}}]. A row's `ref` (else the table's, else the file's `reference`) is kept
    as the published reference of each of its facts; `new_values` lists the non-literal tail types whose
    unseen values are created (free-text cues, shapes), all other values must be declared entities."""
    tables = doc.get("tables") or []
    if not isinstance(tables, list):
        kg.problems.append(f"{path}:{_line(tables)}: 'tables' must be a list of tables")
        return
    ents = doc.setdefault("entities", {})
    if not isinstance(ents, dict):
        return
    for tab in tables:
        if not isinstance(tab, dict) or "type" not in tab or not isinstance(tab.get("rows"), dict):
            kg.problems.append(f"{path}:{_line(tab)}: a table needs 'type', 'columns' and 'rows'")
            continue
        cols = tab.get("columns") or {}
        for key, row in tab["rows"].items():
            if not isinstance(row, dict):
                kg.problems.append(f"{path}:{_line(key)}: row {key!r} must be a mapping")
                continue
            body: dict[Any, Any] = {"type": tab["type"], "__ref": row.get("ref") or tab.get("reference") or "",
                                    "__new": tuple(tab.get("new_values") or ())}
            merged = {**(tab.get("defaults") or {}), **row}
            for k, v in merged.items():
                if k in ("ref",):
                    continue
                if k in ("aliases", "name"):
                    body[k] = v
                    continue
                rel = cols.get(k, k)
                body[LStr(rel) if not isinstance(rel, LStr) else rel] = v
            if key in ents:
                kg.problems.append(f"{path}:{_line(key)}: row {key!r} is defined twice")
                continue
            ents[key] = body


def _resolve(kg: KnowledgeGraph, index: dict[tuple[str, str], set[str]], rel: str, value: Any, where: str,
             new_types: Iterable[str] = ()) -> str | None:
    spec = kg.schema.relations.get(rel)
    if spec is None:
        close = [r for r in kg.schema.relations if r.split("_")[0] == rel.split("_")[0]][:3]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        kg.problems.append(f"{where}: unknown relation {rel!r}{hint}")
        return None
    if isinstance(value, (dict, list)) or value is None:
        kg.problems.append(f"{where}: {rel}: value must be a name or a list of names, got {type(value).__name__}")
        return None
    if getattr(value, "plain_in_flow", False) and "visual_cue" in spec.range:
        kg.problems.append(f"{where}: {rel}: quote the free-text cue {str(value)!r} inside [...] lists (a comma in "
                           "an unquoted item splits it into two cues), or use a block list")
        return None
    value = str(value)
    for t in spec.range:
        if nid(t, value) in kg.g:
            return nid(t, value)
    found = sorted(set().union(*[index.get((t, norm(value)), set()) for t in spec.range]))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        kg.problems.append(f"{where}: {rel}: {value!r} is ambiguous ({found}); use the entity key")
        return None
    lit = [t for t in spec.range if kg.schema.is_literal(t) or t in new_types]
    if lit:
        return kg.add_node(nid(lit[0], value), lit[0], value, (), where)
    other = sorted(t for t in kg.schema.types if index.get((t, norm(value))))
    if other:
        kg.problems.append(f"{where}: {rel}: range violation: {value!r} is a {'/'.join(other)}, expected one of {spec.range}")
        return None
    kg.problems.append(
        f"{where}: {rel}: unknown entity {value!r} (expected a declared {' or '.join(spec.range)}; declare it)"
    )
    return None


def build_graph(
    sources: Iterable[str] = ("spyndex", "climaclass", "earthlib", "curated"),
    curated: Iterable[str | Path] | None = None,
    schema_path: str | Path | None = None,
    max_spectra: int | None = None,
) -> KnowledgeGraph:
    """Build and validate the default graph from the chosen sources (raises KGLoadError on problems)."""
    from kg_qa_builder.graph import load_schema

    kg = KnowledgeGraph(load_schema(schema_path))
    sources = list(sources)
    unknown = set(sources) - {"spyndex", "climaclass", "earthlib", "curated"}
    if unknown:
        raise KGLoadError(f"unknown graph sources {sorted(unknown)}; use spyndex, climaclass, earthlib, curated")
    if "spyndex" in sources:
        import_spyndex(kg)
    if "climaclass" in sources:
        import_climaclass(kg)
    if "earthlib" in sources:
        import_earthlib(kg, max_spectra=max_spectra)
    if "curated" in sources:
        import_curated(kg, list(curated) if curated is not None else curated_files())
    return kg.finalize()
