# Test workload: fork/exec forever, announcing each round (for interrupting a traced run mid-window).
i=0
while true; do
    i=$((i + 1))
    for j in 1 2 3 4 5; do /bin/true; done
    echo "busy: round $i"
    sleep 0.2
done
