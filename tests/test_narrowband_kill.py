"""The narrowband fallback under SIGKILL: the agent is a real process, killed mid-stream.

The guarantee (README, "Narrowband fallback"): an alarm goes by radio at least once while IP
is down, and is sent again only if the agent died between the terminal's acceptance and the
watermark's commit — at most the one frame in flight. The terminals are simulators in this
process on ptys, which the agent process opens like `/dev/ttyUSB1`.
"""

from __future__ import annotations

import socket
from collections import Counter
from functools import partial
from pathlib import Path

from device_profiles import find_profile
from edge_agent.outbox.store import NewRecord, Outbox, read_status
from firmware_stubs.beidou_sim import BeidouSky, BeidouTerminalSimulator
from firmware_stubs.modbus_sim import ModbusTcpSimulator
from protocols.envelope import RecordKind
from protocols.narrowband import AlarmsFrame, decode_frame
from tests.helpers import AgentProcess, until

KEY = bytes(range(40, 72))
CENTRAL_CARD = "0242407"
N_ALARMS = 30
WAIT_S = 60.0


until = partial(until, timeout=WAIT_S)  # this file's waits are longer


def alarm(i: int) -> NewRecord:
    state, level = ("raised", 1 + i % 2) if i % 3 else ("cleared", 0)
    return NewRecord(kind=RecordKind.ALARM, ts_ms=1_795_000_000_000 + i * 1000,
                     point="gas-1/gas_lel", value=20.0 + i,
                     attrs={"alarm_id": "gas-1/gas_lel/high", "rule": "high", "state": state,
                            "level": level})


async def test_kill_9_mid_stream_resends_at_most_the_frame_in_flight(tmp_path: Path) -> None:
    """SIGKILL the agent while its alarms go out frame by frame; after a restart every alarm
    has reached central's terminal, and only alarms of one frame (the one in flight) twice."""
    with socket.socket() as s:  # nobody listens here: IP is down all along
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gas = find_profile("gas-detector-v1")
    sky = BeidouSky()
    async with ModbusTcpSimulator(gas) as modbus, \
            BeidouTerminalSimulator(card_id="4238473", interval_s=0.3, pwi_period_s=0.1,
                                    sky=sky) as gw_terminal, \
            BeidouTerminalSimulator(card_id=CENTRAL_CARD, pwi_period_s=None,
                                    sky=sky) as central_terminal:
        modbus.set_value("gas_lel", 3.0)
        data = tmp_path / "data"
        site = tmp_path / "site.toml"
        site.write_text(
            f'[gateway]\nid = "gw-kill"\ndata_dir = "{data}"\n'
            f'[mqtt]\nport = {dead_port}\n'
            f'[narrowband]\nport = "{gw_terminal.link_path}"\ncentral_card = "{CENTRAL_CARD}"\n'
            f'key = "{KEY.hex()}"\nafter_s = 0\nheartbeat_s = 3600\nmax_payload_bytes = 40\n'
            f'[[devices]]\nid = "gas-1"\nprofile = "gas-detector-v1"\npoll_interval_s = 0.5\n'
            f'transport = {{kind = "tcp", host = "127.0.0.1", port = {modbus.port}}}\n')
        # The alarms are in the outbox before the agent starts (raised during the outage).
        async with Outbox.open(data / "outbox.db") as ob:
            for i in range(N_ALARMS):
                await ob.append([alarm(i)])
            stream = ob.stream
        seqs = set(range(1, N_ALARMS + 1))

        def arrived() -> list[int]:
            got: list[int] = []
            for m in central_terminal.received_messages():
                frame = decode_frame(m.payload, key=KEY, stream=stream)
                if isinstance(frame, AlarmsFrame):
                    got += [e.seq for e in frame.entries]
            return got

        with AgentProcess(site) as agent:
            agent.start()
            # A few frames are through (each holds 2 or 3 alarms at 40 bytes): kill it.
            await until(lambda: len(arrived()) >= 6, "the first frames by BeiDou")
            agent.kill()
            before = len(arrived())
            assert before < N_ALARMS, "killed too late to test anything"
            agent.start()
            await until(lambda: set(arrived()) >= seqs, "every alarm after the restart")
            # The terminal hands the last frame on before the agent has its receipt and moves
            # the watermark: stop only once it has (a stop in between would resend that frame).
            await until(lambda: int(read_status(data / "outbox.db").meta.get(
                "narrowband_sent_seq", 0)) == N_ALARMS, "the watermark at the last alarm")
            assert agent.stop() == 0
    frames = [f for m in central_terminal.received_messages()
              if isinstance(f := decode_frame(m.payload, key=KEY, stream=stream), AlarmsFrame)]
    counts = Counter(arrived())
    twice = sorted(seq for seq, n in counts.items() if n > 1)
    assert set(counts) == seqs and max(counts.values()) <= 2
    # At most the frame the kill caught between the terminal's acceptance and the watermark.
    assert len(twice) <= max(len(f.entries) for f in frames), twice
    status = read_status(data / "outbox.db")
    assert int(status.meta["narrowband_sent_seq"]) == N_ALARMS
