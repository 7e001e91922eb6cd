"""torch.fx graphs: tracing, residual-block discovery, the rewrite pass, and running a graph in pieces."""
