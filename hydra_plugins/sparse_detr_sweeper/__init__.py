"""sparse-detr's Hydra sweeper (Hydra loads sweepers from the `hydra_plugins` package only)."""
