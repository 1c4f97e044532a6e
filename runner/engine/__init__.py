"""Running a sync: pagination, classification, workers, delivery to the destination."""
