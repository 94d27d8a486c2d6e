"""The uplink envelope's messages rendered for people (CLIs, logs): `to_jsonable`."""

from __future__ import annotations

from typing import Any

from protocols.messages import Ack, DataBatch, Flag, Message, State


def to_jsonable(msg: Message) -> dict[str, Any]:
    """A JSON-ready rendering of a message, for CLIs and logs."""
    if isinstance(msg, DataBatch):
        return {"type": "data", "gw": msg.gw, "stream": msg.stream, "sent_ms": msg.sent_ms,
                "records": [{"seq": r.seq, "kind": r.kind.name.lower(), "ts_ms": r.ts_ms,
                             "point": r.point, "value": r.value,
                             "flags": [f.name.lower() for f in Flag if f.name and f in r.flags],
                             **({"attrs": dict(r.attrs)} if r.attrs else {})}
                            for r in msg.records]}
    if isinstance(msg, Ack):
        return {"type": "ack", "stream": msg.stream, "ranges": [list(r) for r in msg.ranges]}
    if isinstance(msg, State):
        return {"type": "state", "online": msg.online, "boot_id": msg.boot_id,
                "version": msg.version, "bearer": msg.bearer, "backlog": msg.backlog,
                "ts_ms": msg.ts_ms, "stream": msg.stream}
    return {"type": "birth", "gw": msg.gw, "stream": msg.stream, "boot_id": msg.boot_id,
            "version": msg.version,
            "devices": [{"id": d.id, "profile": d.profile, "profile_hash": d.profile_hash,
                         "points": [{"ordinal": p.ordinal, "key": p.key, "name_zh": p.name_zh,
                                     "unit": p.unit} for p in d.points]} for d in msg.devices]}


__all__ = ["to_jsonable"]
