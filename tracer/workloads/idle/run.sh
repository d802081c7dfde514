# idle: nothing but the kernel's own activity for a second.
sleep 1
echo "idle: done"
