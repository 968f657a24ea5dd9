"""Runtime adapters that ship with the agent (see `generic/`)."""
