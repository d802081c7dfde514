# Test workload: never finish (the hang detector must fire).
echo "hanging"
while true; do sleep 1; done
