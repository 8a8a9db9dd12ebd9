"""Sources of the Triton python-backend models; `embedder.triton_repo` copies them into a model repository."""
