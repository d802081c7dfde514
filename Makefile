# lazytrace: the two documented entry points (README):
#   make run    set everything up, then trace the default guest and print the invariant report
#   make test   set everything up, then run the test suite (real guests included)
# Both are idempotent: set-up steps that are already done do nothing.

.PHONY: setup run test bench lint

setup:
	./scripts/setup-host.sh

run: setup
	.venv/bin/lazytrace run

# The real-guest tests run on both cloud kernels (6.1 and 6.12) and on Xen with the 6.1 amd64 kernel as dom0
# (its -dbg package is 858 MB; only the vmlinux is kept): fetch them first (idempotent).
test: setup
	.venv/bin/lazytrace kernels fetch debian-6.1-cloud
	.venv/bin/lazytrace kernels fetch debian-6.12-cloud
	.venv/bin/lazytrace kernels fetch debian-6.1-amd64
	.venv/bin/lazytrace xen fetch xen-pv-smp2
	LAZYTRACE_VM_TESTS=1 LAZYTRACE_XEN_TESTS=1 .venv/bin/pytest -v

bench: setup
	.venv/bin/python bench/check_throughput
	.venv/bin/python bench/trace_throughput

lint:
	.venv/bin/ruff check .
