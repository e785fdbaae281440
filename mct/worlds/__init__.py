"""The worlds (data distributions) mct distills in, and the registry that maps params.yaml's `kind` to them."""
