"""What every stage shares and no stage owns: atomic, contained file writes (``files``) and category ids
(``categories``). Torch-free."""
