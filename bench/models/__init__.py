"""Teacher backbones (a diffusers UNet2DModel, or the official SA/SalUn/SFD DDPM network) and judge classifiers."""
