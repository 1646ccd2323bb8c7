"""Load benchmarks of obs-gateway against nginx (seed and tuned), vmauth and
the direct path; ``make bench`` runs them, bench/README.md explains them."""
