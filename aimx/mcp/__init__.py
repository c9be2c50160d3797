"""The MCP server: the agents' interface, an edge like the command line."""
