"""Test harness: real containerd nodes, locally built images and storage servers, all on this machine."""
