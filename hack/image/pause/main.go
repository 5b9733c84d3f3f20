// Command pause is the pod sandbox's process for the test node's
// containerd: it holds the pod's namespaces by sleeping until SIGTERM or
// SIGINT, and reaps orphaned children (it is PID 1 of a shared PID
// namespace when a pod asks for one).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
