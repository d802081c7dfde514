# violate-unpaired: lazyviolate scenario=unpaired: with preemption disabled, the callback of
# apply_to_existing_page_range(&init_mm) calls apply_to_existing_page_range() again. The trace sees
# enter, enter (nested), leave, leave (no open region): both at __apply_to_page_range.
# Expected: LAZY-PAIRING FAILs (one nested enter, one leave without enter) on the first CPU of $LT_CPUS;
# the guest survives (the lazy pv-ops are NOPs on a native/KVM guest). Under Xen PV the nested enter hits
# enter_lazy()'s BUG_ON (arch/x86/kernel/paravirt.c) and dom0 panics: lazytrace exits 3 and keeps the trace
# up to the panic, whose last lazy event is the nested enter (tests/vm/test_xen_trace.py).
cpu=${LT_CPUS%%,*}
init_mm=$(awk '$3 == "init_mm" { print $1 }' /proc/kallsyms)
# The module's own account (pid, CPUs, preempt_count) is evidence the tests compare with the trace: raise
# the console log level around the load so it is printed straight to the console (printk writes the
# serial console synchronously; no dmesg process, and no tty output left to drain at poweroff).
read -r level rest < /proc/sys/kernel/printk
echo 7 > /proc/sys/kernel/printk
status=0
taskset -c "$cpu" insmod /lib/modules/lazyviolate.ko scenario=unpaired init_mm_addr=0x"$init_mm" || status=$?
echo "$level" > /proc/sys/kernel/printk
if [ $status -eq 0 ]; then
    rmmod lazyviolate
fi
exit $status
