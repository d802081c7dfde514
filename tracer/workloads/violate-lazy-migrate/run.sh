# violate-lazy-migrate: lazyviolate scenario=lazy-migrate: apply_to_page_range(&init_mm) whose callback
# moves its own task to another CPU (set_cpus_allowed_ptr) inside the lazy region: entered on the first
# CPU of $LT_CPUS, left on the second.
# Expected: LAZY-PREEMPT (preemptible enter), LAZY-NO-SWITCH (the switch away on the first CPU while lazy)
# and LAZY-PAIRING (a lazy_leave without lazy_enter on the second CPU) FAIL at __apply_to_page_range.
# The first CPU's region never closes as far as the trace can tell: everything else in the window
# (this shell, /init's shell that forks the end marker) is kept on the second CPU so that no other task's
# page-table work lands inside it.
set -- $(echo "$LT_CPUS" | tr , ' ')
if [ $# -lt 2 ]; then
    echo "violate-lazy-migrate needs two CPUs (--cpus A,B), got '$LT_CPUS'"
    exit 2
fi
from=$1
to=$2
taskset -p -c "$to" $$ >/dev/null
taskset -p -c "$to" $PPID >/dev/null
init_mm=$(awk '$3 == "init_mm" { print $1 }' /proc/kallsyms)
# The module's own account (pid, CPUs, preempt_count) is evidence the tests compare with the trace: raise
# the console log level around the load so it is printed straight to the console (printk writes the
# serial console synchronously; no dmesg process, and no tty output left to drain at poweroff).
read -r level rest < /proc/sys/kernel/printk
echo 7 > /proc/sys/kernel/printk
status=0
taskset -c "$from" insmod /lib/modules/lazyviolate.ko scenario=lazy-migrate target_cpu="$to" init_mm_addr=0x"$init_mm" || status=$?
echo "$level" > /proc/sys/kernel/printk
if [ $status -eq 0 ]; then
    rmmod lazyviolate
fi
exit $status
