# fork-exec: on each CPU in $LT_CPUS, a loop pinned to that CPU that forks and execs short programs
# (fork: copy_pte_range; exec and exit: zap_pte_range; dd: page faults and unmaps).
for cpu in $(echo "$LT_CPUS" | tr , ' '); do
    taskset -c "$cpu" sh -c '
        i=0
        while [ $i -lt "$LT_ITERATIONS" ]; do
            /bin/true
            dd if=/dev/zero of=/dev/null bs=4k count=16 2>/dev/null
            i=$((i + 1))
        done' &
done
wait
echo "fork-exec: $LT_ITERATIONS iterations on cpus $LT_CPUS"
