# violate-irq-lazy: lazyviolate scenario=irq-lazy: with preemption disabled, the callback of
# apply_to_existing_page_range(&init_mm) arms a pinned hard-irq hrtimer and waits inside the lazy region;
# the timer rewrites a kernel PTE with set_pte_at(&init_mm) from interrupt context while its CPU is lazy.
# Expected: IRQ-IN-LAZY FAILs (set_pte with HARDIRQ in preempt_count inside the region entered at
# __apply_to_page_range) on the first CPU of $LT_CPUS.
cpu=${LT_CPUS%%,*}
init_mm=$(awk '$3 == "init_mm" { print $1 }' /proc/kallsyms)
# The module's own account (pid, CPUs, preempt_count) is evidence the tests compare with the trace: raise
# the console log level around the load so it is printed straight to the console (printk writes the
# serial console synchronously; no dmesg process, and no tty output left to drain at poweroff).
read -r level rest < /proc/sys/kernel/printk
echo 7 > /proc/sys/kernel/printk
status=0
taskset -c "$cpu" insmod /lib/modules/lazyviolate.ko scenario=irq-lazy init_mm_addr=0x"$init_mm" || status=$?
echo "$level" > /proc/sys/kernel/printk
if [ $status -eq 0 ]; then
    rmmod lazyviolate
fi
exit $status
