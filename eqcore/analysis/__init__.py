"""What a prepared model does on data: grid-aligned histograms, QTH/SA hooks, the SA pass, metrics."""
