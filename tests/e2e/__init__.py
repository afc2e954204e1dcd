"""End-to-end scenarios: a real (busybox) rootfs, real user namespaces, real containers."""
