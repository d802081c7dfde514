# Test workload: crash the kernel on purpose (sysrq 'c'), so the panic path is exercised.
echo "about to panic"
echo c > /proc/sysrq-trigger
sleep 30
