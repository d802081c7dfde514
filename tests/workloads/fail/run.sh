# Test workload: exit non-zero.
echo "failing on purpose"
exit 7
