"""KESI (Le et al., BMVC 2020): iterative pruning whose snapshots, retrained with a large LR restart,
become an ensemble of teachers for the final pruned network. See recipe.py."""
