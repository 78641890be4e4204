"""Settings, errors, files and statistics: what every layer may use."""
