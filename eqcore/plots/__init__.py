"""QTH and sensitivity-analysis plots: the seeds' plot API and the renderer behind it."""
