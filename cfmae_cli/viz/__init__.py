"""Pictures of what the model does: reconstruction grids (and, later, attention maps)."""
