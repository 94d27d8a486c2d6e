"""Pure codecs for Fieldlink: no I/O, no asyncio, no sockets, no serial ports, no sqlite."""
