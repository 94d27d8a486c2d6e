"""The field side: Modbus RTU/TCP transports and buses, the pollers, live point reads and writes,
bus scans, and HJ 212 stations on serial ports."""
