//go:build linux

// Package childproc starts the helper processes of tests, the demo and the
// benchmarks (the project's binaries, servers, tcpdump) so that none of
// them outlives its caller and none dies before it.
package childproc

import (
	"fmt"
	"os/exec"
	"runtime"
	"syscall"
)

// Start starts cmd in its own process group (a Ctrl-C at the terminal
// reaches only the caller, which then stops its children in order) with
// SIGKILL as its parent-death signal, so a caller killed by a timeout
// leaves nothing behind. Fields cmd.SysProcAttr already has (a cgroup fd)
// are kept.
//
// The kernel sends the parent-death signal when the forking *thread*
// exits, not the process, and the Go runtime discards threads: every
// goroutine that locks its thread for setns and returns without unlocking
// takes its thread with it (pkg/netns, the SO_REUSEPORT probe). A child
// forked from such a thread is SIGKILLed at a random later moment. So the
// fork happens on a goroutine that keeps its thread locked, and alive,
// until the child has been reaped.
//
// exited, when non-nil, is called with cmd.Wait's result once the child
// has been reaped; it runs on that goroutine. cmd must not use
// StdoutPipe/StderrPipe (Wait would race the reader); give it writers.
func Start(cmd *exec.Cmd, exited func(error)) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		err := cmd.Wait()
		if exited != nil {
			exited(err)
		}
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	return nil
}
