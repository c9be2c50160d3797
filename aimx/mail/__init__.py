"""The mail core: pure functions and data over messages; no Twisted, no sockets, no files."""
