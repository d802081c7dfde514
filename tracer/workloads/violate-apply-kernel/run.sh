# violate-apply-kernel: lazyviolate scenario=apply-kernel (guest-kernels/modules/lazyviolate): rewrite the
# PTEs of a vmalloc area with apply_to_page_range(&init_mm) from insmod's process context, preemption
# enabled. A real kernel path (vmap_pfn() does the same): with preempt=full on 6.1/6.12 lazy mode is entered
# preemptible, upstream-known since 691ee97e1a9d ("mm: fix lazy mmu docs and usage", v6.15).
# Expected: LAZY-PREEMPT and LAZY-SETPTE-ATOMIC FAIL at __apply_to_page_range on the first CPU of $LT_CPUS.
cpu=${LT_CPUS%%,*}
init_mm=$(awk '$3 == "init_mm" { print $1 }' /proc/kallsyms)
# The module's own account (pid, CPUs, preempt_count) is evidence the tests compare with the trace: raise
# the console log level around the load so it is printed straight to the console (printk writes the
# serial console synchronously; no dmesg process, and no tty output left to drain at poweroff).
read -r level rest < /proc/sys/kernel/printk
echo 7 > /proc/sys/kernel/printk
status=0
taskset -c "$cpu" insmod /lib/modules/lazyviolate.ko scenario=apply-kernel init_mm_addr=0x"$init_mm" || status=$?
echo "$level" > /proc/sys/kernel/printk
if [ $status -eq 0 ]; then
    rmmod lazyviolate
fi
exit $status
