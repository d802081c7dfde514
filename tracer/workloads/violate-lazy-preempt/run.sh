# violate-lazy-preempt: lazyviolate scenario=lazy-preempt: apply_to_page_range(&init_mm) whose callback
# msleep()s inside the lazy region, so the task is switched out while its CPU is lazy.
# insmod is pinned to the first CPU of $LT_CPUS, so the region is left on the CPU that entered it.
# Expected: LAZY-PREEMPT (lazy_enter at preempt_count 0) and LAZY-NO-SWITCH (__switch_to inside the region)
# FAIL at __apply_to_page_range on that CPU.
cpu=${LT_CPUS%%,*}
init_mm=$(awk '$3 == "init_mm" { print $1 }' /proc/kallsyms)
# The module's own account (pid, CPUs, preempt_count) is evidence the tests compare with the trace: raise
# the console log level around the load so it is printed straight to the console (printk writes the
# serial console synchronously; no dmesg process, and no tty output left to drain at poweroff).
read -r level rest < /proc/sys/kernel/printk
echo 7 > /proc/sys/kernel/printk
status=0
taskset -c "$cpu" insmod /lib/modules/lazyviolate.ko scenario=lazy-preempt sleep_ms=20 init_mm_addr=0x"$init_mm" || status=$?
echo "$level" > /proc/sys/kernel/printk
if [ $status -eq 0 ]; then
    rmmod lazyviolate
fi
exit $status
