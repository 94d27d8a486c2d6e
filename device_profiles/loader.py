"""Load and validate device profiles: one YAML file per device model.

A profile names a device model and lists its points: where each lives on the Modbus device,
how it is encoded, what it means for people (Chinese first) and, optionally, its alarm
thresholds and how the simulator moves it. Format (see device_profiles/README.md)::

    id: gas-detector-v1           # unique profile id, [a-z0-9-]+
    model: "GT-2000 可燃气体探测器"
    name_zh: 可燃气体探测器
    protocol: modbus              # rtu or tcp is decided by the gateway config
    byte_order: big               # defaults for the points
    word_order: big
    reads: {max_registers: 125, max_bits: 2000, max_gap: 16}   # optional read limits
    points:
      - key: gas_lel              # unique within the profile, [a-z0-9_]+
        name: Combustible gas
        name_zh: 可燃气体浓度
        unit: "%LEL"
        function: 4               # 1 coils, 2 discrete inputs, 3 holding, 4 input registers
        address: 0
        type: f32                 # u16 i16 u32 i32 u64 i64 f32 f64 bool bitfield string
        scale: 1.0                # value = raw * scale + offset
        offset: 0.0
        bit: null                 # bool: bit of the register; bitfield: its lowest bit
        bit_count: 1              # bitfield width
        length: 1                 # string: registers
        byte_order: big           # optional, overrides the profile default
        word_order: big
        poll: normal              # fast | normal | slow
        writable: false           # only function 1 or 3
        sim: {kind: wave, min: 0, max: 12, period_s: 120}
        alarm: {high1: 25, high2: 50, hysteresis: 2}

An HJ 212 profile (`protocol: hj212`, a station that pushes HJ 212-2017 frames) names each
point by its monitoring factor code instead of a register::

      - key: air_temp
        name: Air temperature
        name_zh: 空气温度
        unit: "°C"
        factor: a01001            # replaces function / address / type; values are numbers
        sim: {kind: wave, min: 8, max: 24, period_s: 600}

Its points take no Modbus field (function, address, type, scale, offset, bit, bit_count,
length, byte_order, word_order; nor `reads` or the byte orders at the top), are not
writable, and have unique factor codes. `ProfilePoint.spec` of such a point raises
`ProtocolMismatchError`; `ProfilePoint.factor` is its code and `Profile.by_factor()` finds it.

Sim kinds: `wave {min, max, period_s, phase_s}`, `random_walk {min, max, step, start}`,
`constant {value}`, `counter {}` (whole seconds since the simulator started).
Alarm keys: high1, high2, low1, low2 (level 1 and level 2 thresholds), hysteresis.

Checks beyond the schema: unique point keys, no two points on overlapping registers of one
function code (bool bits and bitfields may share a register if their bits do not overlap),
writable points only on coils or holding registers, sim kinds that fit the point's type.
Every failure is a `ProfileError` that names the file, the field and, when known, the line:
``gas.yaml:14 points[2].type: 'f33' is not one of u16, i16, …``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from device_profiles.decoding import DecodeError, Loc, decode, to_builtins
from device_profiles.errors import (
    DuplicateProfileError,
    Fail,
    ProfileError,
    ProfileNotFoundError,
    ProtocolMismatchError,
    failer,
    validation_error,
)
from device_profiles.models import (
    AlarmModel,
    ConstantSim,
    CounterSim,
    PointModel,
    ProfileModel,
    RandomWalkSim,
    ReadLimits,
    SimModel,
    WaveSim,
)
from protocols.modbus_points import (
    BIT_FUNCTIONS,
    DataType,
    PointSpec,
    PointSpecError,
    register_count,
)


@dataclass(frozen=True, slots=True)
class AlarmSpec:
    """Level-1/level-2 thresholds (None when unused) and hysteresis, in the point's unit."""

    high1: float | None = None
    high2: float | None = None
    low1: float | None = None
    low2: float | None = None
    hysteresis: float = 0.0


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    key: str
    name: str
    name_zh: str
    unit: str
    modbus: PointSpec | None  # where a Modbus point lives; None for an HJ 212 point
    poll: str
    writable: bool
    sim: SimModel
    alarm: AlarmSpec | None
    factor: str | None = None  # the HJ 212 factor code; None for a Modbus point
    write_min: float | None = None  # writes outside [write_min, write_max] are refused
    write_max: float | None = None
    safety_critical: bool = False  # a write needs a second operator's approval (§8)

    @property
    def spec(self) -> PointSpec:
        """The Modbus spec; `ProtocolMismatchError` for an HJ 212 point (it has no register)."""
        if self.modbus is None:
            raise ProtocolMismatchError(self.key, "hj212", "modbus")
        return self.modbus


@dataclass(frozen=True, slots=True)
class Profile:
    id: str
    model: str
    name_zh: str
    protocol: str
    points: tuple[ProfilePoint, ...]
    hash: str
    reads: ReadLimits

    def point(self, key: str) -> ProfilePoint:
        """The point with that key; KeyError if none."""
        for p in self.points:
            if p.key == key:
                return p
        raise KeyError(key)

    def by_factor(self, code: str) -> ProfilePoint:
        """The HJ 212 point with that factor code; KeyError if none."""
        for p in self.points:
            if p.factor == code:
                return p
        raise KeyError(code)

    @property
    def specs(self) -> tuple[PointSpec, ...]:
        """The Modbus specs of the points (empty for an HJ 212 profile)."""
        return tuple(p.modbus for p in self.points if p.modbus is not None)


def builtin_profiles_dir() -> Path:
    """The folder of profiles shipped with the package."""
    return Path(__file__).resolve().parent / "profiles"


def load_profile(path: str | Path) -> Profile:
    """Read, validate and convert one profile file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(path, "", f"cannot read: {exc}") from exc
    return parse_profile(text, source=str(path))


def parse_profile(text: str, *, source: str = "<profile>") -> Profile:
    """Validate profile YAML text; `source` names it in errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or exc
        raise ProfileError(source, "", f"not valid YAML: {problem}", line) from exc
    if not isinstance(data, dict):
        raise ProfileError(source, "", "a profile must be a mapping", 1)
    try:
        model = decode(data, ProfileModel)
    except DecodeError as exc:
        raise validation_error(exc, source, node) from exc
    return _convert(model, data, source, node)


def load_profiles(paths_or_dirs: Iterable[str | Path]) -> dict[str, Profile]:
    """Load files, and every *.yaml / *.yml of folders, into a dict by profile id."""
    out: dict[str, Profile] = {}
    origin: dict[str, Path] = {}
    for item in paths_or_dirs:
        item = Path(item)
        files = (
            sorted([*item.glob("*.yaml"), *item.glob("*.yml")]) if item.is_dir() else [item]
        )
        for file in files:
            profile = load_profile(file)
            if profile.id in out:
                raise DuplicateProfileError(
                    file, "id", f"profile {profile.id!r} is also defined in {origin[profile.id]}"
                )
            out[profile.id] = profile
            origin[profile.id] = file
    return out


def find_profile(profile_id: str, extra_dirs: Iterable[str | Path] = ()) -> Profile:
    """The profile with that id from `extra_dirs` (first) or the built-in folder.

    A `profile_id` that is the path of an existing .yaml/.yml file loads that file.
    """
    as_path = Path(profile_id)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return load_profile(as_path)
    dirs = [Path(d) for d in extra_dirs] + [builtin_profiles_dir()]
    for folder in dirs:
        files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []
        for file in files:
            profile = load_profile(file)
            if profile.id == profile_id:
                return profile
    raise ProfileNotFoundError(profile_id, dirs)


# ---------------------------------------------------------------- conversion and checks


def _convert(model: ProfileModel, data: dict[str, Any], source: str,
             node: yaml.Node | None) -> Profile:
    """The checked `Profile` of a decoded file; `data` is the file as parsed (which keys it
    gives)."""
    fail = failer(source, node)
    if model.protocol == "hj212":
        points = _convert_hj212(model, data, fail)
    else:
        points = _convert_modbus(model, fail)
    dumped = to_builtins(model)
    for point in dumped["points"]:
        if point["factor"] is None:
            del point["factor"]  # so that Modbus profiles hash as they did before HJ 212 came
        for name, default in (("write_min", None), ("write_max", None),
                              ("safety_critical", False)):
            if point.get(name, default) == default:
                point.pop(name, None)  # likewise: profiles without them keep their hash
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Profile(
        id=model.id,
        model=model.model,
        name_zh=model.name_zh,
        protocol=model.protocol,
        points=tuple(points),
        hash=hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        reads=model.reads,
    )


def _convert_modbus(model: ProfileModel, fail: Fail) -> list[ProfilePoint]:
    points: list[ProfilePoint] = []
    keys: dict[str, int] = {}
    for i, pm in enumerate(model.points):
        loc: Loc = ("points", i)
        _claim(keys, pm.key, (*loc, "key"), fail)
        if pm.factor is not None:
            raise fail((*loc, "factor"), "applies only to protocol hj212")
        spec = _point_spec(model, pm, loc, fail)
        if pm.writable and spec.function not in (1, 3):
            raise fail((*loc, "writable"), "only coils (1) and holding registers (3) are writable")
        if (problem := _sim_problem(pm.sim, spec)) is not None:
            raise fail((*loc, "sim"), problem)
        if pm.alarm is not None and spec.dtype in (DataType.STRING, DataType.BOOL):
            raise fail((*loc, "alarm"), f"thresholds do not apply to {spec.dtype} points")
        sim = pm.sim or ConstantSim(value=_zero(spec.dtype))
        points.append(_profile_point(pm, spec, sim))
    _check_overlaps(points, fail)
    return points


def _point_spec(model: ProfileModel, pm: PointModel, loc: Loc, fail: Fail) -> PointSpec:
    if pm.function is None or pm.address is None or pm.type is None:
        name = next(n for n in ("function", "address", "type") if getattr(pm, n) is None)
        raise fail((*loc, name), "required field is missing")
    try:
        return PointSpec(
            key=pm.key,
            function=pm.function,
            address=pm.address,
            dtype=pm.type,
            byte_order=pm.byte_order or model.byte_order,
            word_order=pm.word_order or model.word_order,
            scale=pm.scale,
            offset=pm.offset,
            bit=pm.bit,
            bit_count=pm.bit_count,
            length=pm.length,
        )
    except PointSpecError as exc:
        raise fail(loc, exc.reason) from exc


# Fields that say where a value sits in Modbus registers: meaningless for an HJ 212 factor.
_MODBUS_POINT_FIELDS = ("function", "address", "type", "scale", "offset", "bit", "bit_count",
                        "length", "byte_order", "word_order")
_MODBUS_PROFILE_FIELDS = ("byte_order", "word_order", "reads")


def _convert_hj212(model: ProfileModel, data: dict[str, Any], fail: Fail) -> list[ProfilePoint]:
    for name in _MODBUS_PROFILE_FIELDS:
        if name in data:
            raise fail((name,), "applies only to protocol modbus")
    points: list[ProfilePoint] = []
    keys: dict[str, int] = {}
    factors: dict[str, int] = {}
    for i, pm in enumerate(model.points):
        loc: Loc = ("points", i)
        _claim(keys, pm.key, (*loc, "key"), fail)
        for name in _MODBUS_POINT_FIELDS:
            if name in data["points"][i]:
                raise fail((*loc, name), "applies only to protocol modbus; an hj212 point "
                                         "names its factor code")
        if pm.factor is None:
            raise fail((*loc, "factor"), "required field is missing")
        _claim(factors, pm.factor, (*loc, "factor"), fail)
        if pm.writable:
            raise fail((*loc, "writable"), "hj212 points are read-only")
        sim = pm.sim
        if isinstance(sim, ConstantSim) and isinstance(sim.value, str | bool):
            raise fail((*loc, "sim"), "an hj212 point needs a numeric constant")
        if _inverted(sim):
            raise fail((*loc, "sim"), "max is below min")
        points.append(_profile_point(pm, None, sim or ConstantSim(value=0),
                                     factor=pm.factor))
    return points


def _claim(seen: dict[str, int], value: str, loc: Loc, fail: Fail) -> None:
    """Note that points[loc[1]] has `value` in its field `loc[-1]`, unless another has it."""
    if value in seen:
        raise fail(loc, f"duplicate {loc[-1]} {value!r} (also points[{seen[value]}])")
    seen[value] = int(loc[1])


def _profile_point(pm: PointModel, spec: PointSpec | None, sim: SimModel, *,
                   factor: str | None = None) -> ProfilePoint:
    return ProfilePoint(
        key=pm.key,
        name=pm.name,
        name_zh=pm.name_zh,
        unit=pm.unit,
        modbus=spec,
        poll=pm.poll,
        writable=pm.writable,
        sim=sim,
        alarm=_alarm(pm.alarm),
        factor=factor,
        write_min=pm.write_min,
        write_max=pm.write_max,
        safety_critical=pm.safety_critical,
    )


def _inverted(sim: SimModel | None) -> bool:
    return isinstance(sim, WaveSim | RandomWalkSim) and sim.max < sim.min


def _sim_problem(sim: SimModel | None, spec: PointSpec) -> str | None:
    """What is wrong with the sim of a Modbus point of `spec`, or None."""
    if sim is None:
        return None
    if isinstance(sim, ConstantSim):
        if spec.dtype is DataType.STRING and not isinstance(sim.value, str):
            return "a string point needs a string constant"
        if spec.dtype is not DataType.STRING and isinstance(sim.value, str):
            return f"a {spec.dtype} point needs a numeric constant"
        return None
    if spec.dtype in (DataType.BOOL, DataType.BITFIELD, DataType.STRING):
        return f"{spec.dtype} points take only sim kind constant"
    if isinstance(sim, CounterSim) and spec.dtype in (DataType.F32, DataType.F64):
        return "sim kind counter needs an integer type"
    if _inverted(sim):
        return "max is below min"
    return None


def _zero(dtype: DataType) -> float | int | bool | str:
    zeros: dict[DataType, float | int | bool | str] = {DataType.STRING: "", DataType.BOOL: False}
    return zeros.get(dtype, 0)


def _alarm(model: AlarmModel | None) -> AlarmSpec | None:
    if model is None:
        return None
    return AlarmSpec(model.high1, model.high2, model.low1, model.low2, model.hysteresis)


def _check_overlaps(points: list[ProfilePoint], fail: Fail) -> None:
    # Two points may share a register only when both are bits of it and the bits are apart
    # (a status word: a fault bit beside a state bitfield).
    owners: dict[tuple[int, int], list[tuple[int, ProfilePoint]]] = {}
    for i, point in enumerate(points):
        spec = point.spec
        for addr in range(spec.address, spec.address + register_count(spec)):
            owners.setdefault((spec.function, addr), []).append((i, point))
    for (function, addr), sharing in sorted(owners.items()):
        if len(sharing) < 2:
            continue
        used = 0
        for i, point in sharing:
            spec = point.spec
            if function in BIT_FUNCTIONS or spec.bit is None:
                other = next(p.key for j, p in sharing if j != i)
                raise fail(
                    ("points", i, "address"),
                    f"function {function} address {addr} overlaps point {other!r}",
                )
            mask = ((1 << spec.bit_count) - 1) << spec.bit
            if used & mask:
                raise fail(
                    ("points", i, "bit"),
                    f"bits of function {function} address {addr} overlap another point",
                )
            used |= mask
