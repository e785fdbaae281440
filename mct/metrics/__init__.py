"""Sample-quality metrics: FID and Frechet distances, k-NN precision/recall, mode statistics, speed."""
