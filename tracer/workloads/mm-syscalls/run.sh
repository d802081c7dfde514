# mm-syscalls: mmap/munmap/mprotect/mremap/madvise and fork of a process with a large mapping,
# one mmstress per CPU in $LT_CPUS.
for cpu in $(echo "$LT_CPUS" | tr , ' '); do
    taskset -c "$cpu" /usr/local/bin/mmstress "$LT_ITERATIONS" &
done
wait
