"""The model server: one process per model version (or several sharing a port), speaking the
Open Inference Protocol v2 with dynamic batching."""
