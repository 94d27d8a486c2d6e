"""BeiDou RDSS user terminal simulator: a short-message terminal on a pseudo-terminal.

`BeidouTerminalSimulator` opens a pty pair (`PtyLine`) and speaks, on the master side, what a
BeiDou RDSS terminal speaks on its serial line (DOMAIN.md, BeiDou RDSS short messages), made
and read by the codec in `protocols.beidou`, so checksums and field layouts are the real ones.
The agent opens the slave side (`.link_path`) like `/dev/ttyUSB1`. The dialect is a
constructor setting:

- BD-3 (`BeidouMode.BD3`): `$CCICR` → `$BDICP` (card, level, interval); a `$BDPWI` beam report
  every `pwi_period_s`; `$CCTCQ` → `$BDFKI,hhmmss,TCQ,Y|N,reason,wait`; inbound `$BDTCI`.
- BD-2 (`BeidouMode.BD2`): `$CCICA` → `$BDICI`; `$CCTXA` → `$BDFKI,TXA,Y|N,Y|N,supp,mmss`;
  inbound `$BDTXR`. A BD-2 terminal sends no `$BDPWI`.
Commands of the other dialect are ignored (counted in `stats()["wrong_dialect"]`), as a real
terminal ignores what it does not speak.

A send is refused, first match wins: no card (BD-3 reason 5), radio silence (reason 3; BD-2
suppression 3), system suppression (reason 2; BD-2 suppression 1), no beams (reason 4, power
not locked [I]), the service interval since the last accepted send not passed (reason 1 with the
seconds left, rounded up; BD-2 interval flag N and mmss), and a payload over the card's
capacity (executed N with no reason [I]: neither dialect has a code for it). BD-2 capacity
comes from the card level (`bd2_capacity_bits`, express sends at most 188 bits); BD-3 from
`capacity_bits` (default: regional 14,000 bits). Accepted sends are recorded
(`sent_messages()`) and go up to the `BeidouSky`, if any, which delivers a message addressed to
another registered terminal's card as that terminal's `$BDTCI` / `$BDTXR`. `inject_inbound()`
makes one arrive as if the central's terminal had sent it.

The service interval is `interval_s` seconds on `clock` (default `time.monotonic`; tests may
pass their own), so a test can use 0.3 s, or move a fake clock, instead of 60 s. The card
reports the interval rounded up to whole seconds.

Faults (`BeidouFaults`): `no_beams` (PWI time `000000.00` and no beams; sends refused),
`suppressed`, `silent`, `no_card` (card `0000000`), `mute` (answers and sends nothing),
`garbage` (that many random bytes before the next sentence out) and `bad_checksum` (the next n
sentences out carry a wrong checksum).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from firmware_stubs.errors import SimulatorError
from firmware_stubs.lifecycle import PtyLinked, cancel_and_wait
from firmware_stubs.pty_line import PtyLine
from protocols import beidou as bd

log = structlog.get_logger(__name__)

NO_CARD = "0000000"
# Beams of a terminal with a clear sky, after a published `$BDPWI` (BD-3 beams only).
_BEAMS = (bd.Beam(2, (51, 44, 0)), bd.Beam(4, (50, 43, 0)), bd.Beam(11, (43, 36, 0)))


class BeidouMode(enum.Enum):
    """Which dialect the terminal speaks."""

    BD2 = "bd2"
    BD3 = "bd3"


@dataclass(frozen=True, slots=True)
class BeidouFaults:
    """What goes wrong with the terminal; sentence counts are used up one sentence at a time."""

    no_beams: bool = False
    suppressed: bool = False
    silent: bool = False
    no_card: bool = False
    mute: bool = False
    garbage: int = 0
    bad_checksum: int = 0


@dataclass(frozen=True, slots=True)
class BeidouMessage:
    """A short message a terminal accepted for sending, or was handed for delivery."""

    sender: str
    recipient: str
    payload: bytes
    encoding: bd.Bd3Encoding  # a BD-2 mode maps to the BD-3 encoding of the same name
    express: bool = False
    at: float = 0.0  # the sending terminal's clock when it accepted the message


def _same_card(a: str, b: str) -> bool:
    return a.lstrip("0") == b.lstrip("0")  # `04207733` is card 4207733 [published $BDTCI]


class BeidouSky:
    """The satellites between simulated terminals: what one accepts reaches the addressee."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self._terminals: list[BeidouTerminalSimulator] = []
        self.delivered = 0
        self.undeliverable = 0

    def register(self, terminal: BeidouTerminalSimulator) -> None:
        if terminal not in self._terminals:
            self._terminals.append(terminal)

    def unregister(self, terminal: BeidouTerminalSimulator) -> None:
        with contextlib.suppress(ValueError):
            self._terminals.remove(terminal)

    def transmit(self, message: BeidouMessage) -> bool:
        """Carry a message to the terminal holding the recipient's card; False if none does."""
        target = next((t for t in self._terminals
                       if _same_card(t.card_id, message.recipient) and t.running), None)
        if target is None:
            self.undeliverable += 1
            return False
        if self.delay_s > 0:
            asyncio.get_running_loop().call_later(self.delay_s, target.receive, message)
            delivered = True
        else:
            delivered = target.receive(message)
        self.delivered += delivered
        self.undeliverable += not delivered
        return delivered


class BeidouTerminalSimulator(PtyLinked):
    """A BeiDou RDSS short-message terminal on a pseudo-terminal; an async context manager."""

    def __init__(self, *, mode: BeidouMode = BeidouMode.BD3, card_id: str = "0242407",
                 level: int = 3, interval_s: float = 60.0, encrypted: bool = False,
                 pwi_period_s: float | None = 1.0, capacity_bits: int | None = None,
                 sky: BeidouSky | None = None, clock: Callable[[], float] = time.monotonic,
                 seed: int = 0, symlink: str | Path | None = None) -> None:
        if not isinstance(mode, BeidouMode):
            raise SimulatorError(f"mode must be a BeidouMode, not {mode!r}")
        digits = (7, 7) if mode is BeidouMode.BD2 else (7, 10)
        if not (card_id.isascii() and card_id.isdigit()
                and digits[0] <= len(card_id) <= digits[1]):
            raise SimulatorError(f"card_id {card_id!r}: {mode.name} cards are "
                                 f"{digits[0]}..{digits[1]} digits")
        top = 4 if mode is BeidouMode.BD2 else 5
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= top:
            raise SimulatorError(f"level must be 1..{top} on {mode.name}")
        if not (math.isfinite(interval_s) and interval_s >= 0):
            raise SimulatorError("interval_s must be a number of seconds >= 0")
        if pwi_period_s is not None and not (math.isfinite(pwi_period_s) and pwi_period_s > 0):
            raise SimulatorError("pwi_period_s must be positive, or None for no $BDPWI")
        if capacity_bits is not None and capacity_bits < 0:
            raise SimulatorError("capacity_bits must be >= 0")
        self.mode = mode
        self.card_id = card_id
        self.level = level
        self.interval_s = interval_s
        self.encrypted = encrypted
        self.pwi_period_s = pwi_period_s if mode is BeidouMode.BD3 else None
        self._capacity_bits = capacity_bits
        self.sky = sky
        self._clock = clock
        self._garbage_rng = random.Random(seed ^ 0xBD)
        self._symlink = Path(symlink) if symlink is not None else None
        self.faults = BeidouFaults()
        self._decoder = bd.BeidouDecoder()
        self._line: PtyLine | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_send: float | None = None
        self._sent: list[BeidouMessage] = []
        self._received: list[BeidouMessage] = []
        self.path = ""
        self._stats: dict[str, int] = dict.fromkeys((
            "card_queries", "pwi", "accepted", "refused", "refused_no_card", "refused_silent",
            "refused_suppressed", "refused_no_beams", "refused_interval", "refused_too_long",
            "inbound", "undeliverable", "bad_sentences", "discarded_bytes", "unknown",
            "wrong_dialect", "muted", "garbage_bytes", "bad_checksum", "unwritten"), 0)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._open_line()
        if self.pwi_period_s is not None:
            self._task = asyncio.create_task(self._beam_loop(),
                                             name=f"beidou_sim.pwi[{self.card_id}]")
        if self.sky is not None:
            self.sky.register(self)
        log.info("beidou_sim_started", path=self.path, mode=self.mode.value,
                 card=self.card_id, card_level=self.level, interval_s=self.interval_s)

    async def stop(self) -> None:
        if self.sky is not None:
            self.sky.unregister(self)
        await cancel_and_wait(self._task)
        self._task = None
        if self._close_line():
            log.info("beidou_sim_stopped", path=self.path)

    @property
    def running(self) -> bool:
        return self._line is not None

    # --- scripting --------------------------------------------------------------------------

    def set_faults(self, faults: BeidouFaults | None = None, **changes: Any) -> None:
        """Replace the faults (`faults`), or change some of them (`no_beams=True`)."""
        base = faults if faults is not None else self.faults
        self.faults = dataclasses.replace(base, **changes) if changes else base
        log.info("beidou_sim_faults", card=self.card_id, faults=repr(self.faults))

    def stats(self) -> dict[str, int]:
        """Sentences answered, sends accepted and refused by cause, bad input and faults."""
        return dict(self._stats)

    def sent_messages(self) -> tuple[BeidouMessage, ...]:
        """Every send the terminal accepted, oldest first."""
        return tuple(self._sent)

    def received_messages(self) -> tuple[BeidouMessage, ...]:
        """Every message delivered to the terminal (and written to the line), oldest first."""
        return tuple(self._received)

    @property
    def capacity_bits(self) -> int:
        """Bits one normal message may carry with this card."""
        if self._capacity_bits is not None:
            return self._capacity_bits
        if self.mode is BeidouMode.BD2:
            return bd.bd2_capacity_bits(self.level, self.encrypted)
        return bd.BD3_REGIONAL_MAX_BITS

    def inject_inbound(self, sender: str, payload: bytes, *,
                       encoding: bd.Bd3Encoding = bd.Bd3Encoding.MIXED,
                       express: bool = False) -> None:
        """Make a message from `sender`'s card arrive, as if another terminal had sent it."""
        message = BeidouMessage(sender, self.card_id, payload, encoding, express, self._clock())
        try:
            self._inbound_sentence(message)
        except bd.FieldError as exc:
            raise SimulatorError(f"cannot deliver {message!r}: {exc}") from exc
        self.receive(message)

    def receive(self, message: BeidouMessage) -> bool:
        """Write an arriving message on the line: `$BDTCI` (BD-3) or `$BDTXR` (BD-2).

        False when this terminal's dialect cannot carry it (a 10-digit sender on BD-2)."""
        try:
            sentence = self._inbound_sentence(message)
        except bd.FieldError as exc:
            self._stats["undeliverable"] += 1
            log.warning("beidou_sim_undeliverable", card=self.card_id, error=str(exc))
            return False
        self._received.append(message)
        self._stats["inbound"] += 1
        self._write(sentence)
        return True

    def _inbound_sentence(self, message: BeidouMessage) -> bd.Sentence:
        now = _utc_now()
        if self.mode is BeidouMode.BD3:
            return bd.Bd3Message(message.sender, self.card_id, message.payload, message.encoding,
                                 time=now)
        mode = bd.Bd2Mode(message.encoding - 1)
        if mode is bd.Bd2Mode.CHINESE and any(b in b"$*,\r\n" for b in message.payload):
            mode = bd.Bd2Mode.CODE  # raw text could not carry it: hand it over as hex
        return bd.Bd2Message(message.sender.lstrip("0").zfill(7), message.payload, mode,
                             2 if message.express else 1, now.replace(second=0))

    # --- the line ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Read what the agent wrote and answer each sentence of it."""
        # Typed here: mypy would join the sentence kinds into `object`.
        sentences: Iterator[bd.Sentence | bd.BeidouError] = self._read_frames(
            self._decoder, self._decoder.next_sentence, bd.BeidouError)
        try:
            for sentence in sentences:
                if isinstance(sentence, bd.BeidouError):
                    self._stats["bad_sentences"] += 1
                    log.debug("beidou_sim_bad_sentence", card=self.card_id, error=str(sentence))
                else:
                    self._handle(sentence)
        finally:
            self._stats["discarded_bytes"] = self._decoder.discarded

    def _handle(self, sentence: bd.Sentence) -> None:
        bd3 = self.mode is BeidouMode.BD3
        if isinstance(sentence, bd.Bd3CardQuery | bd.Bd2CardQuery):
            if isinstance(sentence, bd.Bd3CardQuery) != bd3:
                self._stats["wrong_dialect"] += 1
                return
            self._stats["card_queries"] += 1
            self._write(self._card_info())
        elif isinstance(sentence, bd.Bd3Send | bd.Bd2Send):
            if isinstance(sentence, bd.Bd3Send) != bd3:
                self._stats["wrong_dialect"] += 1
                return
            self._write(self._send(sentence))
        elif isinstance(sentence, bd.UnknownSentence):
            self._stats["unknown"] += 1
        else:
            self._stats["wrong_dialect"] += 1  # a terminal's own output sent back to it

    def _card_info(self) -> bd.Sentence:
        card = NO_CARD if self.faults.no_card else self.card_id
        interval = math.ceil(self.interval_s)
        if self.mode is BeidouMode.BD3:
            level_code = 0 if self.level == 5 else self.level  # [15] level, 0 meaning 5
            return bd.Bd3CardInfo(card, interval, level_code)
        return bd.Bd2CardInfo(card, "0", "0", 3, interval, self.level, self.encrypted, 0)

    def _send(self, request: bd.Bd2Send | bd.Bd3Send) -> bd.Sentence:
        if isinstance(request, bd.Bd3Send):
            encoding, express = request.encoding, False
            bits, capacity = 8 * len(request.payload), self.capacity_bits
        else:
            encoding, express = bd.Bd3Encoding(request.mode + 1), request.express
            bits = bd.bd2_message_bits(request.mode, request.payload)
            capacity = self.capacity_bits
            if express:
                capacity = min(capacity, bd.BD2_EXPRESS_BITS)
        now = self._clock()
        cause, wait_s = self._refusal(now, bits, capacity)
        if cause is None:
            self._last_send = now
            message = BeidouMessage(self.card_id, request.recipient, request.payload, encoding,
                                    express, now)
            self._sent.append(message)
            self._stats["accepted"] += 1
            log.info("beidou_sim_sent", card=self.card_id, to=request.recipient,
                     size=len(request.payload))
            if self.sky is not None:
                self.sky.transmit(message)
        else:
            self._stats["refused"] += 1
            self._stats[f"refused_{cause}"] += 1
            log.info("beidou_sim_refused", card=self.card_id, cause=cause, wait_s=wait_s)
        if isinstance(request, bd.Bd3Send):
            reason = _BD3_REASONS[cause] if cause is not None else bd.Bd3Reason.NONE
            return bd.Bd3Feedback(_utc_now(), "TCQ", cause is None,
                                  reason, wait_s)
        suppression = _BD2_SUPPRESSION.get(cause, bd.Bd2Suppression.NONE)
        return bd.Bd2Feedback("TXA", cause is None, cause != "interval", suppression,
                              min(wait_s, 99 * 60 + 59))

    def _refusal(self, now: float, bits: int, capacity: int) -> tuple[str | None, int]:
        """Why a send now is refused, and the seconds to wait; (None, 0) to accept it."""
        faults = self.faults
        for cause, active in (("no_card", faults.no_card), ("silent", faults.silent),
                              ("suppressed", faults.suppressed), ("no_beams", faults.no_beams)):
            if active:
                return cause, 0
        if self._last_send is not None:
            remaining = self._last_send + self.interval_s - now
            if remaining > 0:
                return "interval", max(1, math.ceil(remaining))
        if bits > capacity:
            return "too_long", 0
        return None, 0

    async def _beam_loop(self) -> None:
        """A `$BDPWI` every `pwi_period_s`: a valid time and beams, or none with `no_beams`."""
        assert self.pwi_period_s is not None
        while True:
            if self.faults.no_beams:
                report = bd.BeamReport(dt.time(0))
            else:
                report = bd.BeamReport(_utc_now(hundredths=True), (), _BEAMS)
            self._stats["pwi"] += 1
            self._write(report)
            await asyncio.sleep(self.pwi_period_s)

    def _write(self, sentence: bd.Sentence) -> None:
        faults = self.faults
        if faults.mute:
            self._stats["muted"] += 1
            return
        data = bd.encode(sentence)
        if faults.bad_checksum:
            data = data[:-4] + b"%02X" % (int(data[-4:-2], 16) ^ 0x5A) + data[-2:]
            self._stats["bad_checksum"] += 1
        if faults.garbage:
            # no `$` in the noise: a real line's noise rarely looks like a sentence start
            noise = bytes(self._garbage_rng.choice(_NOISE) for _ in range(faults.garbage))
            data = noise + data
            self._stats["garbage_bytes"] += faults.garbage
        if faults.bad_checksum or faults.garbage:
            # one sentence used up: one bad checksum fewer, the garbage spent
            self.faults = dataclasses.replace(
                faults, bad_checksum=faults.bad_checksum - 1 if faults.bad_checksum else 0,
                garbage=0)
        if self._line is not None and not self._line.write(data):
            self._stats["unwritten"] += 1


_NOISE = bytes(b for b in range(256) if b != ord("$"))
_BD3_REASONS = {"no_card": bd.Bd3Reason.NO_CARD, "silent": bd.Bd3Reason.SILENT,
                "suppressed": bd.Bd3Reason.SUPPRESSED, "no_beams": bd.Bd3Reason.POWER_NOT_LOCKED,
                "interval": bd.Bd3Reason.INTERVAL, "too_long": bd.Bd3Reason.NONE}
# keyed by refusal cause; None (sent) and the other causes suppress nothing
_BD2_SUPPRESSION: dict[str | None, bd.Bd2Suppression] = {
    "silent": bd.Bd2Suppression.RADIO_SILENCE, "suppressed": bd.Bd2Suppression.SYSTEM}


def _utc_now(*, hundredths: bool = False) -> dt.time:
    """UTC time of day, as terminals report it: whole seconds, or to 0.01 s for `$BDPWI`."""
    now = dt.datetime.now(dt.timezone.utc).time()
    return now.replace(microsecond=now.microsecond // 10_000 * 10_000 if hundredths else 0)


__all__ = ["BeidouFaults", "BeidouMessage", "BeidouMode", "BeidouSky",
           "BeidouTerminalSimulator"]
