"""Tiantong (天通) satellite module simulator: the AT command port of an SMS modem, on a pty.

`TiantongModuleSimulator` opens a pty pair (`PtyLine`) and answers, on the master side, the AT
subset of `protocols.at_commands` as a 3GPP module does (115200 baud on the real thing); the
gateway opens `.link_path` like `/dev/ttyUSB3`. Modules are linked by one `TiantongNetwork`
(the satellite and its SMS centre), by phone number:

- `AT` / `ATE0` / `ATE1` (echo, on by default as on real modules), `AT+CPIN?` (READY),
  `AT+CMGF=0` (PDU mode; text mode =1 is refused with +CMS ERROR 303), `AT+CNMI=...` (taken),
  `AT+CSQ`, `AT+CREG?` and `AT+CREG=<n>` (n=1: `+CREG: <stat>` when registration changes);
- `AT+CMGS=<length>` answers `> `; the PDU (SCA + SMS-SUBMIT in UCS2, `protocols.sms_pdu`)
  and Ctrl-Z follow; it is checked (length, decodable: else +CMS ERROR 304), sent on the
  network after `send_delay_s`, and answered `+CMGS: <mr>` OK. The receiving module stores
  an SMS-DELIVER (originator = the sender's number, centre time in +08:00) and says
  `+CMTI: "SM",<index>`; `AT+CMGR=<index>` reads it, `AT+CMGD=<index>` deletes it. A message
  for a module that is not registered waits in the network until it is (store and forward);
- anything else is answered ERROR.

Faults (`TiantongFaults`): `registered=False` (registration lost: `+CREG: 0,2` searching,
`+CSQ: 99,99`, a send gets +CMS ERROR 331 no network service), `send_error` (the next
`times` sends fail with this +CMS ERROR code, e.g. 332 network timeout, 500 unknown; None for
`times`: until changed), `silent` (nothing is answered: the host's 5 s timeout), `garbage`
(that many random bytes before the next answer), `rssi`, `send_delay_s`.

As a process: ``python -m firmware_stubs.tiantong_sim --number +8617400000001 --number
+8617400000002 --ready-file /tmp/tt.json`` runs linked modules and prints
`READY modules=NUMBER:PATH,...`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

import structlog

from firmware_stubs import sim_process
from firmware_stubs.errors import SimulatorError
from firmware_stubs.lifecycle import Directory, PtyLinked, cancel_and_wait
from firmware_stubs.pty_line import PtyLine
from protocols import at_commands as atc
from protocols import at_responses as atr
from protocols.sms_pdu import (
    SmsDeliver,
    SmsError,
    SmsSubmit,
    decode_submit,
    encode_address,
    encode_deliver,
)
from protocols.stream import decoded

log = structlog.get_logger(__name__)

BEIJING: Final = timezone(timedelta(hours=8))  # the centre's time stamps (§9.2.3.11 TZ +32)
DEFAULT_SCA = "+8617400000000"  # inferred: the SMS centre a module's SIM names


@dataclass(frozen=True, slots=True)
class TiantongFaults:
    """What goes wrong; `send_error` lasts `times` sends (None: until changed)."""

    registered: bool = True
    send_error: int | None = None
    times: int | None = None
    silent: bool = False
    garbage: int = 0
    rssi: int = 18
    send_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.send_error is not None and not 0 <= self.send_error <= 511:
            raise SimulatorError(f"send_error {self.send_error} is not a +CMS ERROR code")
        if self.times is not None and self.times < 1:
            raise SimulatorError("times must be at least 1, or None")
        if not 0 <= self.rssi <= 31 or self.garbage < 0 or self.send_delay_s < 0:
            raise SimulatorError("rssi is 0..31; garbage and send_delay_s are not negative")


class TiantongNetwork:
    """The satellite SMS network: modules by number; messages wait for unregistered ones."""

    def __init__(self, sca: str = DEFAULT_SCA) -> None:
        self.sca = sca
        self._modules: Directory[str, TiantongModuleSimulator] = Directory(
            "number {} is already on the network")
        self._waiting: dict[str, list[bytes]] = {}
        self.sent: list[tuple[str, SmsSubmit]] = []

    def register(self, module: TiantongModuleSimulator) -> None:
        self._modules.add(module.number, module)

    def unregister(self, module: TiantongModuleSimulator) -> None:
        self._modules.discard(module.number, module)

    def submit(self, sender: str, message: SmsSubmit) -> None:
        """The centre takes `message` from `sender` and delivers it (now or once registered)."""
        self.sent.append((sender, message))
        deliver = SmsDeliver(sender, message.text, datetime.now(BEIJING).replace(microsecond=0),
                             message.concat)
        self._waiting.setdefault(message.destination, []).append(
            encode_deliver(deliver, self.sca))
        self.flush(message.destination)

    def flush(self, number: str) -> None:
        """Hand waiting messages to `number` if its module is registered."""
        module = self._modules.get(number)
        if module is None or not module.faults.registered:
            return
        for pdu in self._waiting.pop(number, []):
            module.receive(pdu)


class TiantongModuleSimulator(PtyLinked):
    """One Tiantong module with its AT port on a pty; an async context manager."""

    def __init__(self, network: TiantongNetwork, number: str, *, echo: bool = True,
                 max_stored: int = 20, seed: int = 0,
                 symlink: str | Path | None = None) -> None:
        try:
            encode_address(number)
        except SmsError as exc:
            raise SimulatorError(f"module number: {exc}") from exc
        self.network = network
        self.number = number
        self.echo = echo
        self.max_stored = max_stored
        self.faults = TiantongFaults()
        self.stored: dict[int, tuple[int, bytes]] = {}  # index -> (stat, PDU)
        self.sent: list[SmsSubmit] = []
        self.control_port: int | None = None
        self._creg_n = 0
        self._pdu_mode = True  # 27.005 §3.2.3: PDU mode is the default
        self._cmgs_length: int | None = None
        self._mr = 0
        self._decoder = atc.CommandDecoder()
        self._rng = random.Random(seed)
        self._symlink = Path(symlink) if symlink is not None else None
        self._line: PtyLine | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.path = ""
        self._stats: dict[str, int] = {
            "commands": 0, "errors": 0, "sends": 0, "send_failures": 0, "received": 0,
            "dropped_full": 0, "silenced": 0, "bad_lines": 0, "garbage_sent": 0,
            "unwritten": 0, "cancelled": 0,
        }

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.network.register(self)
        self._open_line()
        log.info("tiantong_sim_started", path=self.path, number=self.number)

    async def stop(self) -> None:
        self.network.unregister(self)
        await cancel_and_wait(*self._tasks)
        if self._close_line():
            log.info("tiantong_sim_stopped", path=self.path, number=self.number)

    # --- scripting --------------------------------------------------------------------------

    def set_faults(self, faults: TiantongFaults | None = None, **changes: Any) -> None:
        """Replace the faults, or change some (`registered=False`, `send_error=332`)."""
        before = self.faults
        base = faults if faults is not None else before
        self.faults = dataclasses.replace(base, **changes) if changes else base
        log.info("tiantong_sim_faults", number=self.number, faults=repr(self.faults))
        if before.registered != self.faults.registered:
            if self._creg_n == 1:
                self._send(atr.Creg(self._reg_status()))
            if self.faults.registered:
                self.network.flush(self.number)

    inject = set_faults

    def stats(self) -> dict[str, int]:
        return {**self._stats, "garbage_bytes": self._decoder.discarded}

    def receive(self, pdu: bytes) -> None:
        """An SMS-DELIVER from the centre: store it and announce it (+CMTI)."""
        index = next((i for i in range(1, self.max_stored + 1) if i not in self.stored), None)
        if index is None:
            self._stats["dropped_full"] += 1
            return
        self.stored[index] = (0, pdu)  # 27.005 §3.1 <stat> 0: received unread
        self._stats["received"] += 1
        self._send(atr.Cmti("SM", index))

    # --- the line ---------------------------------------------------------------------------

    def _reg_status(self) -> atr.RegStatus:
        return atr.RegStatus.HOME if self.faults.registered else atr.RegStatus.SEARCHING

    def _write(self, data: bytes) -> None:
        if self._line is not None and not self._line.write(data):
            self._stats["unwritten"] += 1

    def _send(self, *responses: atr.Response) -> None:
        out = b""
        if self.faults.garbage:
            out = bytes(self._rng.getrandbits(8) for _ in range(self.faults.garbage))
            self._stats["garbage_sent"] += self.faults.garbage
            self.faults = dataclasses.replace(self.faults, garbage=0)
        self._write(out + b"".join(atr.encode_response(r) for r in responses))

    def _on_readable(self) -> None:
        if not (data := self._read_line()):
            return
        if self.faults.silent:
            self._stats["silenced"] += 1
            return
        self._decoder.feed(data)
        # Typed here: mypy would join the event kinds into `object`.
        events: Iterator[atc.Command | atc.PduEntry | atc.PduCancelled | atc.AtError] = decoded(
            self._decoder.next_event, atc.AtError)
        for event in events:
            if isinstance(event, atc.AtError):
                self._stats["bad_lines"] += 1
                log.debug("tiantong_sim_bad_line", number=self.number, error=str(event))
                self._cmgs_length = None
                self._send(atr.Result(False))
            elif isinstance(event, atc.Command):
                self._stats["commands"] += 1
                if self.echo:
                    self._write(atc.encode_command(event))
                self._command(event)
            elif isinstance(event, atc.PduCancelled):
                self._stats["cancelled"] += 1
                self._cmgs_length = None
                self._send(atr.Result(True))
            else:
                self._pdu(event)

    def _command(self, c: atc.Command) -> None:
        try:
            self._answer(c)
        except atc.AtError:
            self._error()

    def _error(self, code: int | None = None) -> None:
        self._stats["errors"] += 1
        self._send(atr.Result(False) if code is None else atr.CmsErrorResult(code))

    def _answer(self, c: atc.Command) -> None:
        ok = atr.Result(True)
        match (c.name, c.op):
            case ("", ""):
                self._send(ok)
            case ("E0" | "E1", ""):
                self.echo = c.name == "E1"
                self._send(ok)
            case ("+CPIN", "?"):
                self._send(atr.InfoLine("+CPIN: READY"), ok)
            case ("+CMGF", "="):
                mode = c.int_arg(0)
                if mode != 0:
                    self._error(atr.CmsError.OPERATION_NOT_SUPPORTED)
                    return
                self._pdu_mode = True
                self._send(ok)
            case ("+CMGF", "?"):
                self._send(atr.InfoLine(f"+CMGF: {0 if self._pdu_mode else 1}"), ok)
            case ("+CNMI", "="):
                self._send(ok)
            case ("+CSQ", ""):
                registered = self.faults.registered
                self._send(atr.Csq(self.faults.rssi if registered else 99, 99 if not registered
                                   else 0), ok)
            case ("+CREG", "?"):
                self._send(atr.Creg(self._reg_status(), self._creg_n), ok)
            case ("+CREG", "="):
                n = c.int_arg(0)
                if n > 2:
                    self._error()
                    return
                self._creg_n = n
                self._send(ok)
            case ("+CMGS" | "+CMGR" | "+CMGD", "="):
                self._message_command(c)
            case _:
                self._error()

    def _message_command(self, c: atc.Command) -> None:
        """AT+CMGS=, AT+CMGR= and AT+CMGD=: send, read and delete a short message."""
        ok = atr.Result(True)
        match c.name:
            case "+CMGS":
                length = c.int_arg(0)
                if not 1 <= length <= 164:
                    self._error(atr.CmsError.INVALID_PDU_PARAMETER)
                    return
                self._cmgs_length = length
                self._decoder.expect_pdu()
                self._send(atr.Prompt())
            case "+CMGR":
                index = c.int_arg(0)
                if index not in self.stored:
                    self._error(atr.CmsError.INVALID_MEMORY_INDEX)
                    return
                stat, pdu = self.stored[index]
                self.stored[index] = (1, pdu)  # now read
                self._send(atr.Cmgr(stat, len(pdu) - 1 - pdu[0], pdu), ok)
            case "+CMGD":
                if self.stored.pop(c.int_arg(0), None) is None:
                    self._error(atr.CmsError.INVALID_MEMORY_INDEX)
                    return
                self._send(ok)

    def _pdu(self, entry: atc.PduEntry) -> None:
        length, self._cmgs_length = self._cmgs_length, None
        self._stats["sends"] += 1
        try:
            _, message = decode_submit(entry.pdu)
            if length is None or entry.pdu[0] + 1 + length != len(entry.pdu):
                raise SmsError("the TPDU length does not match AT+CMGS")
        except SmsError:
            self._stats["send_failures"] += 1
            self._error(atr.CmsError.INVALID_PDU_PARAMETER)
            return
        faults = self.faults
        if faults.send_error is not None:
            if faults.times is not None:
                left = faults.times - 1
                self.faults = dataclasses.replace(faults, times=left or None,
                                                  send_error=faults.send_error if left
                                                  else None)
            self._stats["send_failures"] += 1
            self._error(faults.send_error)
            return
        if not faults.registered:
            self._stats["send_failures"] += 1
            self._error(atr.CmsError.NO_NETWORK_SERVICE)
            return
        mr, self._mr = self._mr, (self._mr + 1) & 0xFF
        task = asyncio.get_running_loop().create_task(
            self._deliver(message, mr, faults.send_delay_s), name=f"tiantong_sim.send[{mr}]")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, message: SmsSubmit, mr: int, delay: float) -> None:
        await asyncio.sleep(delay)
        self.sent.append(message)
        self.network.submit(self.number, message)
        self._send(atr.Cmgs(mr), atr.Result(True))


# --- process entry --------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = sim_process.simulator_parser(
        "tiantong_sim", "Simulate Tiantong satellite SMS modules (AT commands) on ptys, linked by "
        "one simulated network.",
        "--number +8617400000001 --number +8617400000002 --ready-file /tmp/tt.json")
    parser.add_argument("--number", action="append", required=True,
                        help="a module's phone number; repeat for more modules")
    parser.add_argument("--no-echo", action="store_true", help="start with ATE0")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="once open, write {number: pty path} as JSON to this file")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    network = TiantongNetwork()
    modules = sim_process.SimulatorGroup(
        (n, TiantongModuleSimulator(network, n, echo=not args.no_echo)) for n in args.number)
    await sim_process.serve_until_signal(
        modules, sim_process.announce_group("modules", args.ready_file))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT; exit 0, or 1 on bad settings."""
    return sim_process.run(_serve(_parse_args(argv)), (SimulatorError, OSError))


__all__ = ["TiantongFaults", "TiantongModuleSimulator", "TiantongNetwork", "main"]

if __name__ == "__main__":
    sys.exit(main())
