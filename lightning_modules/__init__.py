"""Everything a single site does, without NVFlare: data, networks, training, metrics, inference."""
