"""The AT command subset a Tiantong (天通) satellite module speaks for SMS: the host's commands,
and what both directions share (line syntax, errors). The module's answers are in
`protocols.at_responses`.

Commands (host → module) are `AT<name><op><args>` ended by CR (ITU-T V.250 §5.2.1, S3 = 13);
`op` is "" (execute), "?" (read), "=?" (test) or "=" with comma-separated arguments. Answers
(module → host) are lines framed CR LF ... CR LF (V.250 §5.7.1, verbose form), ending in a
final result: `OK`, `ERROR`, `+CMS ERROR: <err>` (3GPP TS 27.005 §3.2.5) or `+CME ERROR:
<err>` (TS 27.007 §9.2). The SMS subset, TS 27.005 in PDU mode (§3.2.3 `AT+CMGF=0`):

- `AT+CMGS=<length>` (§3.5.1): the module answers the prompt `> ` (CR LF `> `), the host
  sends the PDU in hex and Ctrl-Z (0x1A; ESC 0x1B cancels); then `+CMGS: <mr>` and OK;
- `+CMTI: <mem>,<index>` (§3.4.1) announces a stored message; `AT+CMGR=<index>` (§3.4.3)
  answers `+CMGR: <stat>,[<alpha>],<length>` and the PDU on the next line; `AT+CMGD` deletes
  (§3.5.4); `+CMT: [<alpha>],<length>` + PDU line is a message routed directly (§3.4.1);
- `AT+CREG?` (TS 27.007 §7.2) answers `+CREG: <n>,<stat>`; with `AT+CREG=1` the module
  reports `+CREG: <stat>` unsolicited when registration changes; `AT+CSQ` (§8.5) answers
  `+CSQ: <rssi>,<ber>`.

`CommandDecoder` (module side, here) and `protocols.at_responses.ResponseDecoder` (host side)
are h11-style state machines (`feed()` / `next_event()` → event or `NEED_DATA`). Every error on
bad input is an `AtError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from protocols.errors import DetailedError, ProtocolError
from protocols.stream import NEED_DATA, ByteStream, NeedData

CR: Final = b"\r"
CRLF: Final = b"\r\n"
CTRL_Z: Final = 0x1A
ESC: Final = 0x1B
PROMPT: Final = b"> "
DEFAULT_MAX_LINE: Final = 1024  # a PDU of 176 octets is 352 hex digits; generous


class AtError(ProtocolError):
    """Base of every AT command / response decode or encode error."""


class AtFormatError(AtError):
    """A line is not what its name says, or not ASCII; `line` is what arrived (cut short)."""

    def __init__(self, line: str, reason: str) -> None:
        super().__init__(f"{line[:60]!r}: {reason}")
        self.line = line[:200]
        self.reason = reason


class AtLengthError(AtError, DetailedError):
    """A line, or a PDU being entered, is longer than the decoder takes."""

    template = "line over {limit} bytes"
    limit: int


# ---------------------------------------------------------------------------- commands

Op = Literal["", "?", "=?", "="]
_OPS: Final[Mapping[str, Op]] = {"": "", "?": "?", "=?": "=?", "=": "="}
_COMMAND = re.compile(r"AT([+&%$^][A-Z0-9]+|[A-Z]\d*|)(\?|=\?|=)?(.*)", re.IGNORECASE | re.DOTALL)
_NAME = re.compile(r"[+&%$^][A-Z0-9]+|[A-Z]\d*|")
_ARG = re.compile(r'"[ !#-~]*"|[!#-+\--~]*')  # printable ASCII; a comma only inside quotes


@dataclass(frozen=True, slots=True)
class Command:
    """One AT command: `name` ("" for plain AT, "+CMGS", "E0"), `op`, raw `args`."""

    name: str
    op: Op = ""
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise AtFormatError(repr(self.name), "not an AT command name")
        if self.op not in ("", "?", "=?", "="):
            raise AtFormatError(repr(self.op), "not an AT operator")
        if self.args and self.op != "=":
            raise AtFormatError(self.name, "only a set (=) command has arguments")
        for arg in self.args:
            if not isinstance(arg, str) or not _ARG.fullmatch(arg):
                raise AtFormatError(repr(arg), "not a number, a word or a quoted string")

    def int_arg(self, index: int) -> int:
        """Argument `index` as a non-negative integer."""
        try:
            value = self.args[index]
        except IndexError:
            raise AtFormatError(self.name, f"no argument {index}") from None
        if not value.isdigit() or len(value) > 9:
            raise AtFormatError(self.name, f"argument {value!r} is not a number")
        return int(value)


def encode_command(command: Command) -> bytes:
    """`AT<name><op><args>` and CR."""
    text = f"AT{command.name}{command.op}{','.join(command.args)}"
    return text.encode("ascii", "replace") + CR


def cmgs(length: int) -> Command:
    """`AT+CMGS=<length>`: the TPDU octet count, without the SCA (27.005 §3.5.1)."""
    return Command("+CMGS", "=", (str(length),))


def cmgr(index: int) -> Command:
    return Command("+CMGR", "=", (str(index),))  # 27.005 §3.4.3


def cmgd(index: int) -> Command:
    return Command("+CMGD", "=", (str(index),))  # 27.005 §3.5.4


def parse_command(line: str) -> Command:
    """One command line (without its CR); raises only AtError."""
    parsed = _COMMAND.fullmatch(line.strip())
    if parsed is None:
        raise AtFormatError(line, "does not start with AT")
    name, op, rest = parsed.group(1).upper(), _OPS[parsed.group(2) or ""], parsed.group(3)
    if op != "=" and rest:
        raise AtFormatError(line, f"{rest!r} after {op or 'the name'}")
    args = tuple(a.strip() for a in split_args(rest)) if op == "=" and rest else ()
    return Command(name, op, args)


def split_args(text: str) -> list[str]:
    """Comma-separated arguments (maybe empty); a quoted string may hold commas."""
    parts, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


@dataclass(frozen=True, slots=True)
class PduEntry:
    """The hex PDU the host entered after the prompt, ended by Ctrl-Z."""

    pdu: bytes


@dataclass(frozen=True, slots=True)
class PduCancelled:
    """The host pressed ESC instead of sending the PDU."""


class CommandDecoder(ByteStream):
    """The module's side: commands, and after `expect_pdu()` one PDU entry (V.250, 27.005).

    Line feeds and empty lines are skipped. A line that is not a command raises
    AtFormatError once (consumed)."""

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        super().__init__()
        self._max_line = max_line
        self._pdu_mode = False

    def expect_pdu(self) -> None:
        """The prompt went out: what comes next is a hex PDU ended by Ctrl-Z (or ESC)."""
        self._pdu_mode = True

    def next_event(self) -> Command | PduEntry | PduCancelled | Literal[NeedData.NEED_DATA]:
        buf = self._buffer
        if self._pdu_mode:
            end = next((i for i, b in enumerate(buf) if b in (CTRL_Z, ESC)), -1)
            if end < 0:
                if len(buf) > 2 * self._max_line:
                    self._drop(len(buf))
                    self._pdu_mode = False
                    raise AtLengthError(2 * self._max_line)
                return NEED_DATA
            raw, terminator = bytes(buf[:end]), buf[end]
            del buf[: end + 1]
            self._pdu_mode = False
            if terminator == ESC:
                return PduCancelled()
            text = raw.strip(b"\r\n ")
            try:
                return PduEntry(bytes.fromhex(text.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                raise AtFormatError(text.decode("latin-1"), "the PDU is not hex") from None
        while buf and buf[0] in b"\r\n":
            self._drop(1)
        end = buf.find(CR)
        if end < 0:
            if len(buf) > self._max_line:
                self._drop(len(buf))
                raise AtLengthError(self._max_line)
            return NEED_DATA
        raw = bytes(buf[:end])
        del buf[: end + 1]
        if not raw.isascii():
            raise AtFormatError(raw.decode("latin-1"), "not ASCII")
        return parse_command(raw.decode("ascii"))


__all__ = [
    "CR", "CRLF", "CTRL_Z", "DEFAULT_MAX_LINE", "ESC", "NEED_DATA", "PROMPT", "AtError",
    "AtFormatError", "AtLengthError", "Command", "CommandDecoder", "Op", "PduCancelled",
    "PduEntry", "cmgd", "cmgr", "cmgs", "encode_command", "parse_command", "split_args",
]
