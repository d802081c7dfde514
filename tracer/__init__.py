"""lazytrace guest side: kernels, initramfs, QEMU, probes, recorders, trace writer and CLI."""

__version__ = "0.1.0"
