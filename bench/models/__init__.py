"""Teacher backbones (class-conditional diffusers UNets) and judge classifiers."""
