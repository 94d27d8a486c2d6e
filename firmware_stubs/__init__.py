"""Simulators that speak the real bytes of field devices on real ports (loopback TCP, ptys).

Modules are imported directly (`from firmware_stubs.modbus_sim import ModbusTcpSimulator`) so
that `python -m firmware_stubs.modbus_sim` runs without a double import.
"""
