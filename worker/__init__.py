"""Model workers: load a LibRecommender model once and answer requests in batches."""
