//go:build linux

package benchproc

import (
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// userHZ is the unit of /proc/stat (USER_HZ), 100 on every Linux ABI Go
// supports.
const userHZ = 100

// CPUSetBusy is the non-idle time so far of the CPUs in this process's
// affinity mask (all of the machine's unless taskset pinned it), from
// /proc/stat, whoever used it: every process, ksoftirqd, kworkers. It has
// 10 ms resolution, so take differences over runs of a second or more.
func CPUSetBusy() (time.Duration, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(os.Getpid(), &set); err != nil {
		return 0, fmt.Errorf("sched_getaffinity: %w", err)
	}
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	var total uint64
	for _, line := range strings.Split(string(data), "\n") {
		var cpu int
		var user, nice, system, idle, iowait, irq, softirq, steal uint64
		if !strings.HasPrefix(line, "cpu") || strings.HasPrefix(line, "cpu ") {
			continue
		}
		if _, err := fmt.Sscanf(line, "cpu%d %d %d %d %d %d %d %d %d", &cpu, &user, &nice, &system, &idle, &iowait, &irq, &softirq, &steal); err != nil {
			return 0, fmt.Errorf("parse %q: %w", line, err)
		}
		if set.IsSet(cpu) {
			total += user + nice + system + irq + softirq + steal
		}
	}
	return time.Duration(total) * time.Second / userHZ, nil
}
