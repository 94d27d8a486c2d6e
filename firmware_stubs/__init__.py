"""Simulators that speak the real bytes of field devices on real ports (loopback TCP, ptys).

Modules are imported directly (`from firmware_stubs.modbus_sim import ModbusTcpSimulator`), not
re-exported here, so that `python -m firmware_stubs.modbus_sim` does not find its module already
imported by the package (runpy warns about that).
"""
