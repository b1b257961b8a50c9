"""Base models: families, loading (hub id, folder, single file, builtin:), original layouts, offline models."""
