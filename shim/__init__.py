"""revenant's containerd runtime shim (io.containerd.revenant.v1), checkpoint engine, agent and CLI."""
