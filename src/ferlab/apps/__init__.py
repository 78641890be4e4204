"""What users run: the CLI, the study, predict, evaluate, serve, video, export and the Python API."""
