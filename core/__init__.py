"""What every package uses, Lightning-free: user-input errors, atomic writes and safe loads, random state."""
