"""The zoom tool served to agents: REST (FastAPI) and MCP, split by concern (see the modules)."""
