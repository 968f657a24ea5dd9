"""`infermesh sim route`: a deterministic routing simulator over the engine model."""
