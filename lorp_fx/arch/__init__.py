"""Model anatomy: the family table, the units and gaps of each residual stream, and eager layer surgery."""
